"""PaLM: a decoder-only transformer as in Chowdhery et al. 2022, section 2.

Token embeddings, a stack of parallel blocks (`block.py`: one fused input projection for
multi-query attention and SwiGLU, their outputs added to the residual together), a final
LayerNorm and the output projection tied to the embeddings. Rotary positions, no biases.

The model knows nothing of devices, processes or optimisers: trainers own those. Its options
are the fields of `PaLMConfig`, declared once there: `PaLM(...)` binds its keywords against
the signature derived from them (`keywords.py`).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

from palm_rlhf.model.attention import KVCache, RotaryEmbedding, attention_mask
from palm_rlhf.model.block import BlockInputs, ParallelBlock
from palm_rlhf.model.config import PaLMConfig, check_token_ids
from palm_rlhf.model.cpu_tuning import row_blocks
from palm_rlhf.model.decode import compiled_decode, decode_step
from palm_rlhf.model.keywords import (
    POSITIONAL,
    bind_call,
    checked,
    field_parameters,
    pop_option,
)
from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS, make_scope
from palm_rlhf.model.sampling import generate
from palm_rlhf.model.shared_prefix import (
    SharedPrefix,
    check_shared_prefix,
    expand_prefix,
    no_prefix,
    shared_prefix_forward,
)
from palm_rlhf.model.weights import load_palm_into, palm_from_pretrained, save_palm

__all__ = ["PaLM", "ParallelBlock", "check_token_ids"]


class PaLM(nn.Module):
    """Decoder-only PaLM. `palm(seq)` -> logits (b, n, num_tokens); `return_loss=True` -> loss."""

    def __init__(self, *args, **kwargs):
        """See `PaLMConfig` for the options (`inspect.signature(PaLM)` lists them with their
        defaults); `finetune_scopes` names LoRA scopes to add at once."""
        super().__init__()
        values = bind_call("PaLM", PaLM.__signature__, args, kwargs)
        finetune_scopes = pop_option("PaLM", PaLM.__signature__, values, "finetune_scopes")
        self.config = config = PaLMConfig(**checked("PaLM", PaLMConfig, values))
        self.num_tokens, self.dim, self.causal = config.num_tokens, config.dim, config.causal
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.rotary = self._rotary(config)
        self.layers = nn.ModuleList(ParallelBlock(config, i) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, bias=False)
        if config.init_std is not None:
            for layer in self.layers.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=config.init_std)
        # recompute each block's activations in the backward pass instead of keeping them (less
        # memory, one more forward per block); a training choice, so not part of the config
        self.checkpoint_activations = False
        self.finetune_modules = nn.ModuleDict()
        # scope -> {"r", "alpha", "targets"}, saved with the weights
        self.lora_specs: dict[str, dict] = {}
        for scope in finetune_scopes:
            self.add_finetune_params(scope)

    @staticmethod
    def _rotary(config: PaLMConfig) -> RotaryEmbedding:
        return RotaryEmbedding(config.dim_head, config.rotary_base, config.rotary_xpos_scale_base)

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
        """Switch to `config`, which may differ from the current one in anything but the
        weights' shapes (rates, rotary positions, attention scale: the blocks read them from
        it); returns the model."""
        mismatched = self.config.shape_mismatch(config.to_dict())
        if mismatched:
            raise ValueError(f"use_config cannot change the model's shape: {mismatched}")
        rotary_changed = (config.rotary_base, config.rotary_xpos_scale_base) != (
            self.config.rotary_base,
            self.config.rotary_xpos_scale_base,
        )
        self.config = config
        for layer in self.layers:
            layer.config = config
        if rotary_changed:  # its buffers are derived, not saved: rebuilt where the model is
            self.rotary = self._rotary(config).to(self.device)
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
        shared_prefix: Optional[tuple[int, int]] = None,
    ):
        """x: (b, n) token ids. mask: (b, n) bool, True for real tokens (padding is False); a
        non-causal model (an encoder) also takes negative ids as padding, as the reference does.

        With `return_loss`, x is split into inputs x[:, :-1] and targets x[:, 1:]; targets equal
        to `cross_entropy_ignore_index` or masked out are not counted.

        `shared_prefix=(group_size, length)`: the rows come in contiguous groups of
        `group_size` whose first `length` tokens are equal (checked), and those run once per
        group (`shared_prefix.py`); the outputs are the plain forward's. Causal, unpadded (or
        right-padded) rows only.
        """
        if shared_prefix is not None:
            shared_prefix = SharedPrefix(*shared_prefix)
            no_prefix(
                mask=mask,
                cache=cache,
                extra_embed=extra_embed,
                return_loss=return_loss,
            )
            if not self.causal:
                raise ValueError(
                    "shared_prefix needs a causal model: an encoder's prefix sees the rest"
                )
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
        if shared_prefix is not None:
            return self._shared_prefix_forward(
                x, shared_prefix, scope, return_only_embedding, return_logits_with_embedding
            )
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

        # xPos centre: any fixed value works (it cancels in q.k); a cache fixes it for all steps
        center = (cache.max_len if cache is not None else n) // 2
        rotation = self.rotary.factors(positions, self.config.heads + 1, center)
        inputs = BlockInputs(rotation, attn_mask, square_causal, cache)
        h = self.token_emb(x)
        if extra_embed is not None:
            h = h + extra_embed
        h = self._run_layers(h, inputs, loras)
        if cache is not None:
            cache.advance(mask, n)
        return self.norm(h)

    def _run_layers(self, h: Tensor, inputs: BlockInputs, loras) -> Tensor:
        """Every block over hidden states h (b, n, dim), each with its LoRA adapters."""
        # only a pass that will run backward has activations worth dropping; a cached pass
        # writes the cache, which a recomputation must not repeat
        recomputed = (
            self.checkpoint_activations and inputs.cache is None and torch.is_grad_enabled()
        )
        for index, layer in enumerate(self.layers):
            lora = loras[index] if loras is not None else None
            # non-reentrant checkpointing restores the RNG state, so dropout masks repeat
            if recomputed:
                h = recompute(layer, h, inputs, lora, use_reentrant=False)
            else:
                h = layer(h, inputs, lora)
        return h

    def _shared_prefix_forward(
        self, x: Tensor, shared: SharedPrefix, scope, only_embedding: bool, with_embedding: bool
    ):
        """`forward` with `shared_prefix`: the same outputs, each prefix run once per group."""
        check_shared_prefix(x, shared)
        loras = self._scope_layers(scope)
        head, tail = shared_prefix_forward(
            self, x, shared, lambda h, inputs: self._run_layers(h, inputs, loras)
        )
        group = shared.group_size
        if only_embedding:
            return expand_prefix(head, tail, group)
        # the prefix's logits once per group too, then repeated
        logits = expand_prefix(self.to_logits(head), self.to_logits(tail), group)
        return (logits, expand_prefix(head, tail, group)) if with_embedding else logits

    def _decode(self, x, loras, extra_embed, cache: KVCache) -> Tensor:
        """One new token per row through `decode.decode_step` (compiled if the cache asks)."""
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


# a PaLM option that is not part of its config: the scopes are saved with the weights instead
SCOPES = Union[tuple[str, ...], list[str]]
PaLM.__signature__ = inspect.Signature(
    [
        *field_parameters(PaLMConfig),
        inspect.Parameter("finetune_scopes", POSITIONAL, default=(), annotation=SCOPES),
    ]
)
