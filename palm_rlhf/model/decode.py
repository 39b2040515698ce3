"""The single-token decode step: one new token per row against a filled KV cache.

At batch 1 a decode step reads every weight once and does little arithmetic, so on a CPU its
time is the weights' read time plus a few microseconds of dispatch per tensor operation.
Everything that does not depend on the token is made once per cache (`KVCache.rotary_table`,
`KVCache.attn_bias`), so a step looks up its rotation factors and then runs each block's own
forward (`block.ParallelBlock.forward`, the same code as a training pass) with
`BlockInputs(decoding=True)`: its attention is `attention.cached_step_attention`, which writes
the new key and value into the cache in place and attends it with batched products. On a CPU
in float32 the weight products are split into row blocks (`cpu_tuning.py`).

Blocks are called as modules, so a wrapper's hooks on a block (FSDP's gathers) run for a
decode step as for any forward. tests/test_decode.py checks that cached decoding matches the
uncached forward with LoRA scopes, left-padded prompts, xPos and qk-RMSNorm.

`compiled_decode()` is the same function through `torch.compile` (opt-in). It attends over
the whole preallocated cache (the bias hides slots not yet written), so every step has the
same shapes and compiles once per cache shape.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from palm_rlhf.model.attention import KVCache
from palm_rlhf.model.block import BlockInputs


def decode_step(
    model: nn.Module,
    tokens: Tensor,
    loras: Optional[nn.ModuleList],
    extra_embed: Optional[Tensor],
    cache: KVCache,
    keys_end: Optional[int] = None,
) -> Tensor:
    """tokens (b, 1) -> final normed hidden states (b, 1, dim), the new keys and values
    written to `cache`. The cache's Python-side bookkeeping (`register`/`advance`) is the
    caller's: this function reads only the cache's tensors, so a compiled copy never
    recompiles."""
    x = model.token_emb(tokens)
    if extra_embed is not None:
        x = x + extra_embed
    # each row's rotation at its own position: (b, 1, r, d) cos, signed sin
    cos, sin = cache.rotary_table.index_select(0, cache.num_real)[:, None].unbind(2)
    # under autocast the modules' own products, which autocast runs in bf16 as forward does
    blocks = 1 if torch.is_autocast_enabled(x.device.type) else cache.row_blocks
    inputs = BlockInputs(
        (cos, sin), cache=cache, decoding=True, keys_end=keys_end, row_blocks=blocks
    )
    for index, block in enumerate(model.layers):
        x = block(x, inputs, loras[index] if loras is not None else None)
    return model.norm(x)


@cache
def compiled_decode() -> Callable[..., Tensor]:
    """`decode_step` through `torch.compile`, made on first use and shared by every model
    (dynamo keeps one compiled graph per model, LoRA scope and cache shape).

    Inductor turns a one-column product into its own reduction loop and, by default, inlines
    the pointwise work before it (the LayerNorm, the residual sums) into that loop, computing
    it again for every output row. `realize_opcount_threshold=1` (this compile only) stores
    such results once instead (benchmarks/bench_decode.py measures the compiled step)."""
    return torch.compile(decode_step, dynamic=False, options={"realize_opcount_threshold": 1})
