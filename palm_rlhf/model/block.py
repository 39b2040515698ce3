"""The PaLM parallel block (Chowdhery et al. 2022, section 2), one forward for every pass.

    x + Attention(LN(x)) + SwiGLU-FF(LN(x))

One LayerNorm'd input goes through a single fused projection, split into the queries, the
shared key and value (multi-query attention) and the two SwiGLU halves; the attention and
feed-forward outputs are added to the residual together.

The same `ParallelBlock.forward` runs a training or prompt pass over n tokens and the
single-token decode step against a KV cache (`decode.py`): what differs is carried by
`BlockInputs` (the rotation factors of the new positions, the mask, the cache) and only the
attention kernel is chosen by it (`attention.py`: SDPA or the written-out reference over n
queries, or `cached_step_attention` for one query per row against the cache).
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.model.attention import (
    KVCache,
    PrefixKeys,
    cached_step_attention,
    reference_attention,
    sdpa_attention,
)
from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.cpu_tuning import project
from palm_rlhf.model.lora import add_output_adapters


class BlockInputs(NamedTuple):
    """What every block of one forward reads besides the hidden states."""

    # cos and signed sin (b or 1, n, r, d) of the new positions, xPos folded in: r is heads + 1
    # (each query head, then the shared key) with xPos, else 1 (`RotaryEmbedding.factors`)
    rotation: tuple[Tensor, Tensor]
    mask: Optional[Tensor] = None  # (b or 1, 1, n, j) bool, True where query i sees key j
    square_causal: bool = False  # causal over the n new tokens only: SDPA needs no mask
    cache: Optional[KVCache] = None  # keys and values of earlier tokens; the new ones go in
    # one new token per row against `cache`, attending its slots below `keys_end` (None: the
    # whole buffer, whose bias hides empty slots: what the compiled step does)
    decoding: bool = False
    keys_end: Optional[int] = None
    row_blocks: int = 1  # row blocks of the weight products (`cpu_tuning.row_blocks`)
    # a group's shared prefix (`shared_prefix.py`): its pass records each layer's keys and
    # values there, the pass over the rest of the columns attends them first
    prefix: Optional[PrefixKeys] = None


def add_input_adapters(
    parts: tuple[Tensor, ...], normed: Tensor, lora: nn.ModuleDict, heads_dim: int
) -> tuple[Tensor, ...]:
    """(qk, v, ff_value, ff_gate), the fused projection's parts, with each LoRA target that
    reads the normed input added: q and k to the two ends of qk (the first `heads_dim`
    features are the queries), v, and ff_in's two halves. In place when no graph is recorded
    (decoding: the parts are views of one fresh projection), else out of place."""
    qk, v, ff_value, ff_gate = parts
    add = torch.Tensor.add_ if not torch.is_grad_enabled() else torch.add
    if "q" in lora or "k" in lora:
        deltas = [
            lora[name](normed) if name in lora else normed.new_zeros(*normed.shape[:-1], size)
            for name, size in (("q", heads_dim), ("k", qk.shape[-1] - heads_dim))
        ]
        qk = add(qk, torch.cat(deltas, dim=-1))
    if "v" in lora:
        v = add(v, lora["v"](normed))
    if "ff_in" in lora:
        value_delta, gate_delta = lora["ff_in"](normed).chunk(2, dim=-1)
        ff_value, ff_gate = add(ff_value, value_delta), add(ff_gate, gate_delta)
    return qk, v, ff_value, ff_gate


class ParallelBlock(nn.Module):
    """x + Attention(LN(x)) + SwiGLU-FF(LN(x)), with one fused input projection."""

    def __init__(self, config: PaLMConfig, index: int = 0):
        super().__init__()
        self.config = config
        self.index = index  # this block's layer in a KV cache
        dim, dim_head = config.dim, config.dim_head
        self.fused_dims = (config.attn_inner_dim, dim_head, dim_head, config.ff_inner_dim * 2)
        # the output's parts: q and k together, v, the SwiGLU value and gate halves
        inner = config.ff_inner_dim
        self.split_dims = (config.attn_inner_dim + dim_head, dim_head, inner, inner)
        # the LoRA targets that read the normed input: where each lands in the fused output
        starts = accumulate(self.fused_dims, initial=0)
        self.fused_slices = {
            name: slice(start, start + size)
            for name, start, size in zip(("q", "k", "v", "ff_in"), starts, self.fused_dims)
        }
        self.norm = nn.LayerNorm(dim, bias=False)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(config.attn_inner_dim, dim, bias=False)
        self.ff_out = nn.Linear(config.ff_inner_dim, dim, bias=False)
        if config.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))

    @property
    def scale(self) -> float:
        """The attention logits' scale: qk_scale on unit-norm q, k, else 1 / sqrt(dim_head)."""
        c = self.config
        return c.qk_scale if c.qk_rmsnorm else c.dim_head**-0.5

    def forward(
        self, x: Tensor, inputs: BlockInputs, lora: Optional[nn.ModuleDict] = None
    ) -> Tensor:
        """x (b, n, dim) -> (b, n, dim); `lora` this block's adapters of a scope, if any.
        Reshapes are torch's own views, not einops patterns: in the decode step each pattern
        would cost ~10 us per call."""
        heads, dim_head = self.config.heads, self.config.dim_head
        normed = self.norm(x)
        # (b, n, h*d + d + d + 2*ff): q | k | v | ff value half | ff gate half
        proj = project(normed, self.fused_attn_ff_proj, inputs.row_blocks)
        # one split into every part (backward assembles the projection's gradient with one
        # copy); queries and the shared key stay adjacent: one (b, n, h + 1, d) tensor
        # rotates both
        parts = proj.split(self.split_dims, dim=-1)
        if lora is not None:
            parts = add_input_adapters(parts, normed, lora, self.config.attn_inner_dim)
        qk, v, ff_value, ff_gate = parts  # v: (b, n, d)
        qk = qk.unflatten(-1, (heads + 1, dim_head))
        if self.config.qk_rmsnorm:
            scales = torch.cat((self.q_scale.expand(heads, dim_head), self.k_scale[None]))
            qk = F.normalize(qk, dim=-1) * scales
        # rotary (+ xPos): t * cos + rotate_half(t) * sin, rotate_half folded into a roll and
        # the sign of sin's first half
        cos, sin = inputs.rotation
        if cos.dtype != qk.dtype:  # a check, not a no-op cast: the decode step counts calls
            cos, sin = cos.to(qk.dtype), sin.to(qk.dtype)
        qk = torch.addcmul(qk * cos, qk.roll(dim_head // 2, dims=-1), sin)
        q, k = qk[..., :heads, :], qk[..., heads, :]  # (b, n, h, d), (b, n, d)
        out = self.attend(q, k, v, inputs)  # (b, n, h*d)

        ff_hidden = F.silu(ff_gate) * ff_value
        if self.training:
            ff_hidden = F.dropout(ff_hidden, self.config.ff_dropout)
        attn_out = project(out, self.attn_out, inputs.row_blocks)
        ff_out = project(ff_hidden, self.ff_out, inputs.row_blocks)
        attn_out, ff_out = add_output_adapters(lora, out, attn_out, ff_hidden, ff_out)
        return x + attn_out + ff_out

    def attend(self, q: Tensor, k: Tensor, v: Tensor, inputs: BlockInputs) -> Tensor:
        """q (b, n, h, d), the new k, v (b, n, d) -> (b, n, h*d), through the cache if any."""
        c, cache = self.config, inputs.cache
        if inputs.decoding:  # n = 1 against the cache, shapes that never change
            out = cached_step_attention(
                q[:, 0], k, v, cache, self.index, inputs.keys_end, self.scale, c.flash_attn
            )
            return out.flatten(1)[:, None]  # (b, h, d) -> (b, 1, h*d)
        if cache is not None:
            k, v = cache.update(self.index, k, v)
        elif inputs.prefix is not None:
            k, v = inputs.prefix.keys_values(self.index, k, v)
        q = q.transpose(1, 2)  # (b, h, n, d)
        dropout = c.attn_dropout if self.training else 0.0
        if c.flash_attn:
            out = sdpa_attention(q, k, v, inputs.mask, inputs.square_causal, self.scale, dropout)
        else:
            out = reference_attention(q, k, v, inputs.mask, self.scale, dropout, self.training)
        return rearrange(out, "b h n d -> b n (h d)")
