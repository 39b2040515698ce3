"""The single-token decode step: one new token per row against a filled KV cache.

At batch 1 a decode step reads every weight once and does little arithmetic, so on a CPU its
time is the weights' read time plus a few microseconds of dispatch per tensor operation. The
general forward (`ParallelBlock.forward`) builds positions, rotary factors and masks for any
number of new tokens; here everything that does not depend on the token is made once per
cache (`KVCache.rotary_table`, `KVCache.attn_bias`) and a block is about a dozen operations:

    LayerNorm -> fused projection -> rotate q and k together (3 ops, one table lookup per
    step) -> write k, v into the cache in place -> baddbmm / softmax / bmm against the cache
    -> attention and feed-forward output projections added to the residual

The arithmetic is the general forward's (the same products, rotations and softmax, up to
rounding), so a cached decode matches the uncached forward; tests/test_decode.py checks it,
with LoRA scopes, left-padded prompts, xPos and qk-RMSNorm.

`compiled_decode()` is the same function through `torch.compile` (opt-in: the compile takes
tens of seconds). It attends over the whole preallocated cache (the bias hides slots not yet
written), so every step has the same shapes and compiles once per cache shape.
"""

from __future__ import annotations

from functools import cache
from itertools import accumulate
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.model.attention import KVCache
from palm_rlhf.model.lora import add_output_adapters

# LoRA targets that read the block's normed input, and the fused projection's part they adapt
FUSED_TARGETS = ("q", "k", "v", "ff_in")


# the weight copy is made only for models whose block weights fit this (a 1024 x 16 PaLM is ~1 GB)
INPUT_MAJOR_MAX_BYTES = 512 * 2**20


def input_major_weights(model: nn.Module) -> Optional[list[tuple[Tensor, ...]]]:
    """Per block, copies of the fused, attention-out and feed-forward-out weights laid out
    (in, out), contiguous; None where they would not help.

    A one-row product x @ W^T streams W; MKL's float32 kernel streams an (in, out) layout about
    twice as fast as nn.Linear's (out, in) once the weights no longer fit the caches (about
    12 vs 6 GB/s on our 2-core CPU; benchmarks/bench_decode.py). Only for float32 weights on
    the CPU (bf16 is the other way round) of at most `INPUT_MAJOR_MAX_BYTES` (the copy doubles
    the weights' memory while the cache lives), held as plain tensors (a sharded parameter is
    gathered by its wrapper inside forward only, so it keeps its own layout). The copies are a
    snapshot: they belong to one cache, made after the weights were last changed."""
    params = [p for block in model.layers for p in block.parameters()]
    plain = all(type(p.data) is torch.Tensor for p in params)
    if not plain or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return None
    if torch.is_autocast_enabled("cpu"):  # the step would read autocast's bf16 copies instead
        return None
    if sum(p.numel() * p.element_size() for p in params) > INPUT_MAJOR_MAX_BYTES:
        return None  # a large model would double a large footprint: keep its own layout
    linears = ("fused_attn_ff_proj", "attn_out", "ff_out")
    with torch.no_grad():
        return [
            tuple(getattr(block, name).weight.t().contiguous() for name in linears)
            for block in model.layers
        ]


# several rows multiply weights at least this large as (W x^T)^T (see `project`)
FEW_ROWS_MIN_BYTES = 4 * 2**20


def project(x: Tensor, linear: nn.Linear, weight_t: Optional[Tensor]) -> Tensor:
    """linear(x) (b, in) -> (b, out) for a bias-free Linear. Where the (in, out) copy of its
    weight exists (float32 on the CPU), one row reads the copy; several rows compute
    (W x^T)^T from the module's own (out, in) weight once it is large (`FEW_ROWS_MIN_BYTES`):
    MKL's kernel for a few-row x @ W_t runs far below bandwidth there (512 x 4736 at 4 rows:
    2.9 ms against 0.6 ms this way), while on cache-sized weights it is the faster one."""
    if weight_t is None:
        return linear(x)
    if x.shape[0] == 1 or weight_t.numel() * weight_t.element_size() < FEW_ROWS_MIN_BYTES:
        return x @ weight_t
    return (linear.weight @ x.t()).t()


def decode_block(
    block: nn.Module,
    x: Tensor,
    cache: KVCache,
    layer: int,
    lora: Optional[nn.ModuleDict],
    rotation: tuple[Tensor, Tensor],
    keys_end: Optional[int],
    weights_t: tuple[Optional[Tensor], ...] = (None, None, None),
) -> Tensor:
    """One ParallelBlock for one new token per row: x (b, dim) -> (b, dim).

    rotation: cos and signed sin (b, r, d) of each row's position (`RotaryEmbedding.table`).
    The new key and value go to `cache.slot`; attention reads the cache up to `keys_end`
    (None: the whole buffer, as the compiled step does). `weights_t`: the block's
    `input_major_weights`, or Nones to use the modules' own weights."""
    heads, dim_head = block.config.heads, block.config.dim_head
    fused_t, attn_out_t, ff_out_t = weights_t
    normed = block.norm(x)
    # (b, h*d + d + d + 2*ff): q | k | v | ff halves
    proj = project(normed, block.fused_attn_ff_proj, fused_t)
    if lora is not None:
        starts = list(accumulate(block.fused_dims, initial=0))
        for name, start, end in zip(FUSED_TARGETS, starts, starts[1:]):
            if name in lora:
                proj[:, start:end] += lora[name](normed)
    split = (heads + 1) * dim_head
    # queries and the shared key are adjacent: one (b, h + 1, d) tensor rotates them together
    qk = rearrange(proj[:, :split], "b (r d) -> b r d", d=dim_head)
    if block.config.qk_rmsnorm:
        scales = torch.cat((block.q_scale.expand(heads, dim_head), block.k_scale[None]))
        qk = F.normalize(qk, dim=-1) * scales
    cos, sin = (t.to(qk.dtype) for t in rotation)
    qk = torch.addcmul(qk * cos, qk.roll(dim_head // 2, dims=-1), sin)
    q, k = qk[:, :heads], qk[:, heads:]  # (b, h, d), (b, 1, d)
    v = rearrange(proj[:, split : split + dim_head], "b d -> b 1 d")

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
    out = rearrange(torch.bmm(attn, values), "b h d -> b (h d)")  # (b, h*d)

    ff_value, ff_gate = proj[:, split + dim_head :].chunk(2, dim=-1)
    ff_hidden = F.silu(ff_gate) * ff_value
    attn_out = project(out, block.attn_out, attn_out_t)
    ff_out = project(ff_hidden, block.ff_out, ff_out_t)
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
    x = rearrange(x, "b 1 e -> b e")
    rotation = cache.rotary_table.index_select(0, cache.num_real).unbind(1)  # cos, sin (b, r, d)
    # under autocast the modules' own weights, which autocast casts to bf16 as it does in forward
    weights = None if torch.is_autocast_enabled(x.device.type) else cache.decode_weights
    for index, block in enumerate(model.layers):
        lora = loras[index] if loras is not None else None
        block_weights = weights[index] if weights is not None else (None, None, None)
        decode = (rotation, keys_end, block_weights)
        x = block(x, lora=lora, cache=cache, layer_index=index, decode=decode)
    return rearrange(model.norm(x), "b e -> b 1 e")


@cache
def compiled_decode() -> Callable[..., Tensor]:
    """`decode_step` through `torch.compile`, made on first use and shared by every model
    (dynamo keeps one compiled graph per model, LoRA scope and cache shape)."""
    return torch.compile(decode_step, dynamic=False)
