"""Tuning for one kind of hardware: x86 CPUs running float32 products through MKL.

It serves the decode step (`decode.py`), where a few rows (one token per sequence) go
through every weight. Such a product is a read of the weight, and MKL runs it on one
thread: about 5-7 GB/s on our 2-core CPU (8-10 from an (in, out) copy of the weight), while a
read-only pass over memory reaches 13-18 GB/s with both cores. Split into row blocks, the
same product becomes one batched call that MKL spreads over its threads: 13-16 GB/s
(`benchmarks/bench_products.py` measures each method on the machine at hand).

Everything else (GPUs, which have their own GEMV; bfloat16, which a CPU emulates; weights
small enough that a batched call's start costs more than it saves) gets the plain product.
The block calls `project` wherever it applies a weight, so a decode step on another
machine needs no change here: `row_blocks` returns 1 and `project` is the Linear itself.

Whether the split pays depends on the CPU's MKL, not only on its size: on an Intel Xeon with
AMX (2 cores) the plain product reads 26-37 GB/s and the split 10-16 (`bench_products.py`),
the reverse of the AMD EPYC above. So the first product of each (weight shape, rows, blocks,
threads) times both methods and keeps the faster for the rest of the process (`MEASURE`); a
compiled step, which cannot time itself, keeps the split.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

# weights smaller than this keep the plain product: a batched call costs ~20 us more to start
ROW_BLOCKS_MIN_BYTES = 512 * 2**10
# blocks per MKL thread: two balance the load when one thread is slowed
BLOCKS_PER_THREAD = 2
# time both products once per shape and keep the faster (False: always split, for tests)
MEASURE = True
_FASTER_SPLIT: dict[tuple, bool] = {}  # (out, in, rows, blocks, threads) -> split is faster


def row_blocks(device: torch.device, dtype: torch.dtype) -> int:
    """How many blocks of output rows `project` splits a weight into (1: no split): float32
    on the CPU only, `BLOCKS_PER_THREAD` per thread."""
    if device.type != "cpu" or dtype != torch.float32:
        return 1
    return BLOCKS_PER_THREAD * torch.get_num_threads()


def row_block_product(x: Tensor, weight: Tensor, blocks: int) -> Tensor:
    """x (b, in) @ weight (out, in)^T as one batched product over `blocks` row blocks of the
    weight (a view of it: no copy); blocks must divide out. Plain views, not einops: this runs
    three times per block per token, and the patterns cost ~10 us each at this size."""
    out, inputs = weight.shape
    columns = x.t().expand(blocks, inputs, x.shape[0])  # (c, in, b), no copy
    product = torch.bmm(weight.view(blocks, out // blocks, inputs), columns)  # (c, o, b)
    # (b, out) row-major: a column-major result would follow every later op, and batched
    # attention products fall back to one small product per row on such strides
    return product.view(out, -1).t().contiguous()


def project(x: Tensor, linear: nn.Linear, blocks: int) -> Tensor:
    """linear(x), (..., in) -> (..., out), for a bias-free Linear: `row_block_product` when
    blocks (reduced to a divisor of out) is above 1 and the weight is contiguous and at least
    `ROW_BLOCKS_MIN_BYTES`, else the module itself. The module's own weight is read inside the
    block's forward, so a sharded model reads its gathered weight."""
    if blocks == 1:
        return linear(x)
    weight = linear.weight
    blocks = math.gcd(weight.shape[0], blocks)
    small = weight.numel() * weight.element_size() < ROW_BLOCKS_MIN_BYTES
    if blocks == 1 or small or not weight.is_contiguous():
        return linear(x)
    rows = x.reshape(-1, x.shape[-1])  # (b..., in) -> (rows, in), a view
    if not split_is_faster(rows, linear, blocks):
        return linear(x)
    return row_block_product(rows, weight, blocks).view(*x.shape[:-1], -1)


def split_is_faster(rows: Tensor, linear: nn.Linear, blocks: int) -> bool:
    """Whether `row_block_product` beats the Linear for this shape on this machine: measured
    on the first call (best of 3 each, a few ms for a large weight) and remembered."""
    if not MEASURE or torch.compiler.is_compiling():
        return True
    weight = linear.weight
    key = (*weight.shape, rows.shape[0], blocks, torch.get_num_threads())
    if key not in _FASTER_SPLIT:
        split = _best_time(lambda: row_block_product(rows, weight, blocks))
        _FASTER_SPLIT[key] = split < _best_time(lambda: linear(rows))
    return _FASTER_SPLIT[key]


def _best_time(product, repeats: int = 3) -> float:
    product()  # warm: first-call allocations and kernel selection
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best
