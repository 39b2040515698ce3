"""The single-token decode step: one new token per row against a filled KV cache.

At batch 1 a decode step reads every weight once and does little arithmetic, so on a CPU its
time is the weights' read time plus a few microseconds of dispatch per tensor operation. The
general forward (`ParallelBlock.forward`) builds positions, rotary factors and masks for any
number of new tokens; here everything that does not depend on the token is made once per
cache (`KVCache.rotary_table`, `KVCache.attn_bias`) and a block is about a dozen operations:

    LayerNorm -> fused projection -> rotate q and k together (3 ops, one table lookup per
    step) -> write k, v into the cache in place -> baddbmm / softmax / bmm against the cache
    -> attention and feed-forward output projections added to the residual

On the CPU in float32 the three weight products are batched products over row blocks of the
weights (`project`), which MKL spreads over its threads where a plain few-row product runs on
one; this alone makes a step 1.2-1.4x faster at dims 256 and 512 on our 2-core machine.

The arithmetic is the general forward's (the same products, rotations and softmax, up to
rounding), so a cached decode matches the uncached forward; tests/test_decode.py checks it,
with LoRA scopes, left-padded prompts, xPos and qk-RMSNorm.

`compiled_decode()` is the same function through `torch.compile` (opt-in: the compile takes
tens of seconds). It attends over the whole preallocated cache (the bias hides slots not yet
written), so every step has the same shapes and compiles once per cache shape.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm_rlhf.model.attention import KVCache
from palm_rlhf.model.lora import add_output_adapters


def row_blocks(device: torch.device, dtype: torch.dtype) -> int:
    """How many blocks of output rows `project` splits a weight into (1: no split).

    A few-row product x @ W^T is a read of W. MKL runs it on one thread: about 5-7 GB/s on our
    2-core CPU (8-10 from an (in, out) copy of W), while a read-only pass over memory reaches
    13-18 GB/s with both cores. Split into row blocks, the same product becomes one batched
    call that MKL spreads over its threads: 13-16 GB/s (benchmarks/bench_products.py). Two
    blocks per thread balance the load. Float32 on the CPU only: GPUs have their own GEMV,
    and bf16 here is emulated."""
    if device.type != "cpu" or dtype != torch.float32:
        return 1
    return 2 * torch.get_num_threads()


# weights smaller than this keep the plain product: a batched call costs ~20 us more to start
ROW_BLOCKS_MIN_BYTES = 512 * 2**10


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
    """linear(x), (b, in) -> (b, out), for a bias-free Linear: `row_block_product` when blocks
    (reduced to a divisor of out) is above 1 and the weight is contiguous and at least
    `ROW_BLOCKS_MIN_BYTES`, else the module itself. The module's own weight is read inside the
    block's forward, so a sharded model reads its gathered weight."""
    weight = linear.weight
    blocks = math.gcd(weight.shape[0], blocks)
    small = weight.numel() * weight.element_size() < ROW_BLOCKS_MIN_BYTES
    if blocks == 1 or small or not weight.is_contiguous():
        return linear(x)
    return row_block_product(x, weight, blocks)


def decode_block(
    block: nn.Module,
    x: Tensor,
    cache: KVCache,
    layer: int,
    lora: Optional[nn.ModuleDict],
    rotation: tuple[Tensor, Tensor],
    keys_end: Optional[int],
    blocks: int = 1,
) -> Tensor:
    """One ParallelBlock for one new token per row: x (b, dim) -> (b, dim). Reshapes here are
    torch's own views, not einops patterns: each pattern costs ~10 us per call in this loop.

    rotation: cos and signed sin (b, r, d) of each row's position (`RotaryEmbedding.table`).
    The new key and value go to `cache.slot`; attention reads the cache up to `keys_end`
    (None: the whole buffer, as the compiled step does). `blocks`: the products' row blocks
    (`row_blocks`)."""
    heads, dim_head = block.config.heads, block.config.dim_head
    normed = block.norm(x)
    # (b, h*d + d + d + 2*ff): q | k | v | ff halves
    proj = project(normed, block.fused_attn_ff_proj, blocks)
    if lora is not None:
        for name, part in block.fused_slices.items():
            if name in lora:
                proj[:, part] += lora[name](normed)
    split = (heads + 1) * dim_head
    # queries and the shared key are adjacent: one (b, h + 1, d) tensor rotates them together
    qk = proj[:, :split].unflatten(1, (heads + 1, dim_head))
    if block.config.qk_rmsnorm:
        scales = torch.cat((block.q_scale.expand(heads, dim_head), block.k_scale[None]))
        qk = F.normalize(qk, dim=-1) * scales
    cos, sin = (t.to(qk.dtype) for t in rotation)
    qk = torch.addcmul(qk * cos, qk.roll(dim_head // 2, dims=-1), sin)
    q, k = qk[:, :heads], qk[:, heads:]  # (b, h, d), (b, 1, d)
    v = proj[:, None, split : split + dim_head]  # (b, 1, d)

    keys, values = cache.keys[layer], cache.values[layer]  # (b, max_len, d)
    keys.index_copy_(1, cache.slot, k.to(keys.dtype))
    values.index_copy_(1, cache.slot, v.to(values.dtype))
    keys, values = keys[:, :keys_end], values[:, :keys_end]
    bias = cache.attn_bias[:, :, :keys_end]  # (b, 1, j): -inf on padding and empty slots
    scores = torch.baddbmm(bias.to(q.dtype), q, keys.transpose(1, 2).to(q.dtype), alpha=block.scale)
    # softmax in at least float32 (SDPA's precision); in float32 exactly on the reference path
    exact = torch.float32 if not block.config.flash_attn else scores.dtype
    attn = scores.softmax(dim=-1, dtype=torch.promote_types(exact, torch.float32))
    attn = attn.to(values.dtype)
    out = torch.bmm(attn, values).flatten(1)  # (b, h, d) -> (b, h*d)

    ff_value, ff_gate = proj[:, split + dim_head :].chunk(2, dim=-1)
    ff_hidden = F.silu(ff_gate) * ff_value
    attn_out = project(out, block.attn_out, blocks)
    ff_out = project(ff_hidden, block.ff_out, blocks)
    attn_out, ff_out = add_output_adapters(lora, out, attn_out, ff_hidden, ff_out)
    return x + attn_out + ff_out


def decode_step(
    model: nn.Module,
    tokens: Tensor,
    loras: Optional[nn.ModuleList],
    extra_embed: Optional[Tensor],
    cache: KVCache,
    keys_end: Optional[int] = None,
) -> Tensor:
    """tokens (b, 1) -> final normed hidden states (b, 1, dim), the new keys and values
    written to `cache`. Each block is called as a module (its forward hands over to
    `decode_block`) (whose Python-side bookkeeping, `register`/`advance`, the caller does:
    this function reads only the cache's tensors, so a compiled copy never recompiles)."""
    x = model.token_emb(tokens)
    if extra_embed is not None:
        x = x + extra_embed
    x = x[:, 0]  # (b, 1, e) -> (b, e)
    rotation = cache.rotary_table.index_select(0, cache.num_real).unbind(1)  # cos, sin (b, r, d)
    # under autocast the modules' own products, which autocast runs in bf16 as forward does
    blocks = 1 if torch.is_autocast_enabled(x.device.type) else cache.row_blocks
    for index, block in enumerate(model.layers):
        lora = loras[index] if loras is not None else None
        decode = (rotation, keys_end, blocks)
        x = block(x, lora=lora, cache=cache, layer_index=index, decode=decode)
    return model.norm(x)[:, None]


@cache
def compiled_decode() -> Callable[..., Tensor]:
    """`decode_step` through `torch.compile`, made on first use and shared by every model
    (dynamo keeps one compiled graph per model, LoRA scope and cache shape).

    Inductor turns a one-column product into its own reduction loop and, by default, inlines
    the pointwise work before it (the LayerNorm, the residual sums) into that loop, computing
    it again for every output row. `realize_opcount_threshold=1` (this compile only) stores
    such results once instead: 10-25% faster steps at dims 256 and 512 here."""
    return torch.compile(decode_step, dynamic=False, options={"realize_opcount_threshold": 1})
