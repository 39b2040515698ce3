"""PaLM: a decoder-only transformer as in Chowdhery et al. 2022, section 2.

Each block reads one LayerNorm'd input into a single fused projection that is split into the
queries, the shared key and value (multi-query attention), and the two SwiGLU halves; the
attention and feed-forward outputs are added to the residual together (the "parallel"
formulation). Rotary positions, no biases, input and output embeddings tied.

The model knows nothing of devices, processes or optimisers: trainers own those.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

from palm_rlhf.model.attention import (
    KVCache,
    RotaryEmbedding,
    apply_rotary,
    attention_mask,
    reference_attention,
    sdpa_attention,
)
from palm_rlhf.model.config import PaLMConfig, check_token_ids
from palm_rlhf.model.decode import (
    compiled_decode,
    decode_block,
    decode_step,
    row_blocks,
)
from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS, add_output_adapters, make_scope
from palm_rlhf.model.sampling import generate
from palm_rlhf.model.weights import load_palm_into, palm_from_pretrained, save_palm


class ParallelBlock(nn.Module):
    """x + Attention(LN(x)) + SwiGLU-FF(LN(x)), with one fused input projection."""

    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = config
        dim, dim_head = config.dim, config.dim_head
        self.fused_dims = (config.attn_inner_dim, dim_head, dim_head, config.ff_inner_dim * 2)
        # the output is split with both SwiGLU halves apart (value, gate), not split then
        # chunked: backward then assembles the projection's gradient with one copy, not two
        self.split_dims = (*self.fused_dims[:3], config.ff_inner_dim, config.ff_inner_dim)
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
        self.scale = config.qk_scale if config.qk_rmsnorm else dim_head**-0.5

    def forward(
        self,
        x: Tensor,
        cos: Optional[Tensor] = None,
        sin: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        square_causal: bool = False,
        lora: Optional[nn.ModuleDict] = None,
        cache: Optional[KVCache] = None,
        layer_index: int = 0,
        xpos: Optional[Tensor] = None,
        decode: Optional[tuple] = None,
    ) -> Tensor:
        """x (b, n, dim) -> (b, n, dim). `decode` = (rotation, keys_end, row blocks):
        x is (b, dim), one new token per row, through `decode.decode_block` (called from here,
        so a wrapper's hooks on this block, FSDP's gathers, run for it as for any forward)."""
        if decode is not None:
            return decode_block(self, x, cache, layer_index, lora, *decode)
        normed = self.norm(x)
        q, k, v, ff_value, ff_gate = self.fused_attn_ff_proj(normed).split(self.split_dims, -1)
        if lora is not None:
            q, k, v = (
                t + lora[name](normed) if name in lora else t
                for t, name in ((q, "q"), (k, "k"), (v, "v"))
            )
            if "ff_in" in lora:
                lora_value, lora_gate = lora["ff_in"](normed).chunk(2, dim=-1)
                ff_value, ff_gate = ff_value + lora_value, ff_gate + lora_gate

        q = rearrange(q, "b n (h d) -> b h n d", h=self.config.heads)
        if self.config.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale

        # cos/sin are (n, d) for shared positions or (b, n, d) per row; queries carry a head axis
        q_cos, q_sin = (cos, sin) if cos.dim() == 2 else (cos[:, None], sin[:, None])
        q, k = apply_rotary(q, q_cos, q_sin), apply_rotary(k, cos, sin)
        if xpos is not None:  # xPos: queries scaled up, keys down, by position (before caching)
            q = q * (xpos if xpos.dim() == 2 else xpos[:, None]).to(q.dtype)
            k = k * (xpos**-1).to(k.dtype)

        if cache is not None:
            k, v = cache.update(layer_index, k, v)

        dropout = self.config.attn_dropout if self.training else 0.0
        if self.config.flash_attn:
            out = sdpa_attention(q, k, v, mask, square_causal, self.scale, dropout)
        else:
            out = reference_attention(q, k, v, mask, self.scale, dropout, self.training)
        out = rearrange(out, "b h n d -> b n (h d)")

        attn_out = self.attn_out(out)
        ff_hidden = F.dropout(F.silu(ff_gate) * ff_value, self.config.ff_dropout, self.training)
        ff_out = self.ff_out(ff_hidden)
        attn_out, ff_out = add_output_adapters(lora, out, attn_out, ff_hidden, ff_out)
        return x + attn_out + ff_out


class PaLM(nn.Module):
    """Decoder-only PaLM. `palm(seq)` -> logits (b, n, num_tokens); `return_loss=True` -> loss."""

    @beartype
    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        causal: bool = True,
        flash_attn: bool = True,
        attn_dropout: Union[int, float] = 0.0,
        ff_dropout: Union[int, float] = 0.0,
        qk_rmsnorm: bool = False,
        qk_scale: Union[int, float] = 8.0,
        lora_r: int = 8,
        rotary_base: Union[int, float] = 10000.0,
        rotary_xpos_scale_base: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        cross_entropy_ignore_index: int = 0,
        finetune_scopes: Union[tuple[str, ...], list[str]] = (),
    ):
        super().__init__()
        self.config = PaLMConfig(
            num_tokens=num_tokens,
            dim=dim,
            depth=depth,
            dim_head=dim_head,
            heads=heads,
            ff_mult=ff_mult,
            causal=causal,
            flash_attn=flash_attn,
            attn_dropout=float(attn_dropout),
            ff_dropout=float(ff_dropout),
            qk_rmsnorm=qk_rmsnorm,
            qk_scale=float(qk_scale),
            lora_r=lora_r,
            rotary_base=float(rotary_base),
            rotary_xpos_scale_base=rotary_xpos_scale_base,
            max_seq_len=max_seq_len,
            cross_entropy_ignore_index=cross_entropy_ignore_index,
        )
        self.num_tokens, self.dim, self.causal = num_tokens, dim, causal
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.rotary = RotaryEmbedding(dim_head, rotary_base, rotary_xpos_scale_base)
        self.layers = nn.ModuleList(ParallelBlock(self.config) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, bias=False)
        # recompute each block's activations in the backward pass instead of keeping them (less
        # memory, one more forward per block); a training choice, so not part of the config
        self.checkpoint_activations = False
        self.finetune_modules = nn.ModuleDict()
        self.lora_specs: dict[
            str, dict
        ] = {}  # scope -> {"r", "alpha", "targets"}, saved with weights
        for scope in finetune_scopes:
            self.add_finetune_params(scope)

    @classmethod
    def from_config(cls, config: PaLMConfig) -> PaLM:
        return cls(**config.to_dict())

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    # the reference keeps these hyperparameters as attributes; here they live in the config
    @property
    def dim_head(self) -> int:
        return self.config.dim_head

    @property
    def heads(self) -> int:
        return self.config.heads

    @property
    def lora_r(self) -> int:
        return self.config.lora_r

    @property
    def cross_entropy_ignore_index(self) -> int:
        return self.config.cross_entropy_ignore_index

    def set_dropout(self, dropout: Union[int, float]) -> PaLM:
        """Set attention and feed-forward dropout of every layer to `dropout` (the reference's
        `set_dropout`, which sets every dropout in its layers); returns the model. The config
        records the new rates, so a saved model keeps them."""
        dropout = float(dropout)
        return self.use_config(replace(self.config, attn_dropout=dropout, ff_dropout=dropout))

    def use_config(self, config: PaLMConfig) -> PaLM:
        """Switch to `config`, which may differ from the current one in its rates only (the
        blocks read their dropout from it); returns the model."""
        mismatched = self.config.shape_mismatch(config.to_dict())
        if mismatched:
            raise ValueError(f"use_config cannot change the model's shape: {mismatched}")
        self.config = config
        for layer in self.layers:
            layer.config = config
        return self

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        return_loss: bool = False,
        disable_lora: bool = False,
        finetune_scope: Optional[str] = None,
        extra_embed: Optional[Tensor] = None,
        return_only_embedding: bool = False,
        return_logits_with_embedding: bool = False,
        mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ):
        """x: (b, n) token ids. mask: (b, n) bool, True for real tokens (padding is False); a
        non-causal model (an encoder) also takes negative ids as padding, as the reference does.

        With `return_loss`, x is split into inputs x[:, :-1] and targets x[:, 1:]; targets equal
        to `cross_entropy_ignore_index` or masked out are not counted.
        """
        if not self.causal and mask is None and isinstance(x, Tensor) and bool((x < 0).any()):
            # the reference's encoder convention: negative ids are padding to mask out
            mask = x >= 0
            x = x.masked_fill(~mask, 0)
        check_token_ids(x, self.num_tokens)
        if mask is not None and (mask.shape != x.shape or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool tensor of the same shape as seq {tuple(x.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if return_loss:
            if x.shape[1] < 2:
                raise ValueError(
                    "return_loss needs sequences of at least 2 tokens (input + target)"
                )
            x, labels = x[:, :-1], x[:, 1:]
            label_mask = None
            if mask is not None:
                mask, label_mask = mask[:, :-1], mask[:, 1:]
        limit = self.config.max_seq_len
        total = x.shape[1] + (cache.length if cache is not None else 0)
        if limit is not None and total > limit:
            raise ValueError(f"sequence of {total} tokens is longer than max_seq_len={limit}")

        scope = None if disable_lora else finetune_scope
        embeds = self.embed(
            x, mask=mask, finetune_scope=scope, extra_embed=extra_embed, cache=cache
        )
        if return_only_embedding:
            return embeds
        logits = self.to_logits(embeds)
        if not return_loss:
            return (logits, embeds) if return_logits_with_embedding else logits

        ignore = labels == self.config.cross_entropy_ignore_index
        if label_mask is not None:
            ignore = ignore | ~label_mask
        labels = labels.masked_fill(ignore, -100)
        return F.cross_entropy(rearrange(logits, "b n c -> b c n"), labels, ignore_index=-100)

    def to_logits(self, embeds: Tensor) -> Tensor:
        """Tied output projection: logits = embeds @ token_emb^T."""
        return F.linear(embeds, self.token_emb.weight)

    def embed(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        finetune_scope: Optional[str] = None,
        extra_embed: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """Final normed hidden states (b, n, dim); no input checks (callers validate)."""
        n = x.shape[1]
        loras = self._scope_layers(finetune_scope)
        if cache is not None and n == 1 and mask is None and not self.training:
            return self._decode(x, loras, extra_embed, cache)
        if cache is not None:
            cache.register(mask, n)
            positions = cache.positions(mask, n)
            key_mask = cache.current_key_mask(n)
            num_keys = cache.length + n
        else:
            if mask is None:
                positions = torch.arange(n, device=x.device)
            else:
                positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            key_mask, num_keys = mask, n
        # the fast path handles square causal attention without a materialised mask
        square_causal = (
            self.causal and key_mask is None and num_keys == n and self.config.flash_attn
        )
        attn_mask = None
        if not square_causal:
            attn_mask = attention_mask(n, num_keys, self.causal, key_mask, x.device)

        cos, sin = self.rotary(positions)
        # xPos centre: any fixed value works (it cancels in q.k); a cache fixes it for all steps
        xpos = self.rotary.xpos(positions, (cache.max_len if cache is not None else n) // 2)
        h = self.token_emb(x)
        if extra_embed is not None:
            h = h + extra_embed
        # only a pass that will run backward has activations worth dropping; a cached pass
        # writes the cache, which a recomputation must not repeat
        recomputed = self.checkpoint_activations and cache is None and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            lora = loras[index] if loras is not None else None
            args = (h, cos, sin, attn_mask, square_causal, lora, cache, index, xpos)
            # non-reentrant checkpointing restores the RNG state, so dropout masks repeat
            h = recompute(layer, *args, use_reentrant=False) if recomputed else layer(*args)
        if cache is not None:
            cache.advance(mask, n)
        return self.norm(h)

    def _decode(self, x, loras, extra_embed, cache: KVCache) -> Tensor:
        """One new token per row through `model/decode.py` (compiled if the cache asks)."""
        cache.register(None, 1)
        if cache.compile and not torch.is_grad_enabled():  # sampling runs without autograd
            h = compiled_decode()(self, x, loras, extra_embed, cache)
        else:  # eager: attend over the filled slots only
            h = decode_step(self, x, loras, extra_embed, cache, keys_end=cache.length + 1)
        cache.advance(None, 1)
        return h

    def init_cache(
        self,
        batch: int,
        max_len: int,
        dtype: Optional[torch.dtype] = None,
        compile: bool = False,
    ) -> KVCache:
        """A KV cache for `batch` rows of up to `max_len` tokens. `compile=True` runs the
        single-token decode steps through `torch.compile` (the first step compiles: tens of
        seconds; see benchmarks/bench_decode.py for when it pays)."""
        config = self.config
        dtype = dtype or self.token_emb.weight.dtype
        table = self.rotary.table(max_len, config.heads + 1, max_len // 2).to(dtype)
        blocks = row_blocks(self.device, self.layers[0].fused_attn_ff_proj.weight.dtype)
        return KVCache(
            config.depth,
            batch,
            max_len,
            config.dim_head,
            self.device,
            dtype,
            table,
            compile,
            blocks,
        )

    # ---------------------------------------------------------------- LoRA scopes

    @property
    def finetune_scopes(self) -> tuple[str, ...]:
        return tuple(self.finetune_modules.keys())

    def free_scope_name(self, wanted: str) -> str:
        """`wanted` if no scope has that name yet, else the first free `wanted-k`, k >= 1."""
        name, k = wanted, 0
        while name in self.finetune_modules:
            k += 1
            name = f"{wanted}-{k}"
        return name

    def _scope_layers(self, scope: Optional[str]):
        if scope is None:
            return None
        if scope not in self.finetune_modules:
            raise KeyError(
                f"finetune scope {scope!r} not found; scopes are {list(self.finetune_scopes)}"
            )
        return self.finetune_modules[scope]

    def add_finetune_params(
        self,
        scope: str,
        lora_r: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        exist_ok: bool = False,
    ) -> nn.ModuleList:
        """Add a named LoRA scope (zero-initialised, so the model's outputs are unchanged)."""
        if scope in self.finetune_modules:
            if exist_ok:
                return self.finetune_modules[scope]
            raise ValueError(
                f"finetune scope {scope!r} already exists; pass exist_ok=True to reuse it"
            )
        c = self.config
        r = lora_r or c.lora_r
        dims = {
            "q": (c.dim, c.attn_inner_dim),
            "k": (c.dim, c.dim_head),
            "v": (c.dim, c.dim_head),
            "o": (c.attn_inner_dim, c.dim),
            "ff_in": (c.dim, c.ff_inner_dim * 2),
            "ff_out": (c.ff_inner_dim, c.dim),
        }
        modules = make_scope(c.depth, dims, r, lora_alpha, tuple(targets))
        self.finetune_modules[scope] = modules.to(self.token_emb.weight)
        self.lora_specs[scope] = {"r": r, "alpha": lora_alpha, "targets": list(targets)}
        return self.finetune_modules[scope]

    def remove_finetune_params(self, scope: str) -> nn.ModuleList:
        self._scope_layers(scope)
        self.lora_specs.pop(scope)
        return self.finetune_modules.pop(scope)

    def finetune_parameters(self, scope: str = "default") -> list[nn.Parameter]:
        return list(self._scope_layers(scope).parameters())

    def palm_parameters(self) -> list[nn.Parameter]:
        """The base model's parameters, without any LoRA scope."""
        adapter_ids = {id(p) for p in self.finetune_modules.parameters()}
        return [p for p in self.parameters() if id(p) not in adapter_ids]

    @torch.no_grad()
    def merge_finetune_params(self, scope: str) -> None:
        """Fold a scope's adapters into the base weights and remove the scope."""
        layers = self.remove_finetune_params(scope)
        for block, lora in zip(self.layers, layers):
            for name, adapter in lora.items():
                delta = adapter.weight.T.to(block.attn_out.weight.dtype)  # (out, in) like nn.Linear
                if name in block.fused_slices:
                    block.fused_attn_ff_proj.weight[block.fused_slices[name]] += delta
                elif name == "o":
                    block.attn_out.weight += delta
                else:
                    block.ff_out.weight += delta

    # ---------------------------------------------------------------- sampling and saving

    def generate(self, seq_len: int, prompt: Optional[Tensor] = None, **kwargs) -> Tensor:
        """Sample until `seq_len` total tokens, prompt included (at least one new token), top-k
        filtered with `filter_thres=0.9` by default as in the reference; see
        `model.sampling.generate` for every keyword."""
        return generate(self, seq_len, prompt, **kwargs)

    def save(self, path: Union[str, Path], scopes: Optional[tuple[str, ...]] = None) -> Path:
        """Write weights + config (+ LoRA scope specs) atomically to one safetensors file."""
        return save_palm(self, path, scopes=scopes)

    def load(self, path: Union[str, Path], strict: bool = True) -> PaLM:
        """Load weights saved by `save`, refusing a different config or a corrupt file."""
        load_palm_into(self, path, strict=strict)
        return self

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], map_location: str = "cpu") -> PaLM:
        return palm_from_pretrained(cls, path, map_location=map_location)
