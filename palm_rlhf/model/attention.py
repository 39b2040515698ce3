"""Multi-query attention: rotary embeddings, the fast (SDPA) and reference paths, the KV cache.

PaLM (Chowdhery et al. 2022, section 2) shares one key/value head between all query heads
(multi-query attention, Shazeer 2019). Shapes used throughout:

    q: (b, h, i, d)   queries, h heads
    k, v: (b, j, d)   the single shared key/value head
    key_mask: (b, j)  True for real tokens, False for padding

The decoding cache therefore stores (b, j, d) per layer, `heads` times less than multi-head.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) over the full head dimension.

    With `xpos_scale_base`, also xPos (Sun et al. 2022, arXiv:2212.10554): queries are scaled
    by zeta^((m - c) / scale_base) and keys by its inverse, zeta_i = (2i/d + 0.4) / 1.4 per
    frequency, so q_m . k_n decays with m - n; the centre c cancels (it only keeps the powers
    small), as in the reference project, which centres on seq_len // 2.
    """

    def __init__(self, dim_head: int, base: float = 10000.0, xpos_scale_base: Optional[int] = None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.xpos_scale_base = xpos_scale_base
        steps = torch.arange(0, dim_head, 2, dtype=torch.float32)
        zeta = (steps + 0.4 * dim_head) / (1.4 * dim_head)
        self.register_buffer("xpos_zeta", zeta, persistent=False)  # not saved: our files unchanged

    def xpos(self, positions: Tensor, center: int) -> Optional[Tensor]:
        """Query scale (..., n, d) float32 for `positions` (keys use its inverse); None if off."""
        if self.xpos_scale_base is None:
            return None
        power = (positions.to(torch.float32) - center) / self.xpos_scale_base
        scale = self.xpos_zeta ** power[..., None]  # (..., n, d/2)
        return torch.cat((scale, scale), dim=-1)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (n,) or (b, n) integer positions -> cos, sin of shape (..., n, d), float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., n, d/2)
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def factors(self, positions: Tensor, rows: int, center: int) -> tuple[Tensor, Tensor]:
        """Rotation factors of `positions` (n,) or (b, n): cos and a signed sin, each (..., n,
        r, d) float32, such that for features t (..., n, r, d) at those positions
        t * cos + t.roll(d / 2, -1) * sin is t rotated (t * cos + rotate_half(t) * sin).

        rotate_half(t) is t with its halves swapped and the first one negated, so the sign
        moves onto the first half of sin. With xPos the scale is folded in too: rows 0..r-2
        are query heads (scaled by `xpos`), the last row the shared key (scaled by its
        inverse); without xPos r is 1 (every row is rotated alike) whatever `rows` says."""
        cos, sin = self(positions)  # (..., n, d)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[..., None, :], sin[..., None, :]  # (..., n, 1, d)
        scale = self.xpos(positions, center)
        if scale is None:
            return cos, sin
        queries = repeat(scale, "... d -> ... r d", r=rows - 1)
        per_row = torch.cat((queries, scale[..., None, :] ** -1), dim=-2)  # (..., n, r, d)
        return cos * per_row, sin * per_row

    def table(self, max_len: int, rows: int, center: int) -> Tensor:
        """`factors` of every position below `max_len`, stacked for the decode step's lookup:
        (max_len, 2, r, d) float32, cos then signed sin."""
        positions = torch.arange(max_len, device=self.inv_freq.device)
        return torch.stack(self.factors(positions, rows, center), dim=1)


def attention_mask(
    num_queries: int,
    num_keys: int,
    causal: bool,
    key_mask: Optional[Tensor],
    device: torch.device,
) -> Optional[Tensor]:
    """Boolean mask (b or 1, 1, i, j), True where query i may attend key j; None if all allowed.

    The queries are the last `num_queries` of the `num_keys` positions (a KV cache holds the
    earlier ones). A query always sees its own key, so a padding query never has an empty row
    (which would give NaN); real queries never see padding keys.
    """
    offset = num_keys - num_queries
    if key_mask is None and (not causal or num_queries == 1):
        return None  # nothing to hide: a single new query may see every cached key
    query_index = torch.arange(num_queries, device=device)[:, None] + offset
    key_index = torch.arange(num_keys, device=device)[None, :]
    mask = None
    if causal:
        mask = key_index <= query_index  # (i, j)
    if key_mask is not None:
        padded = rearrange(key_mask, "b j -> b 1 1 j")
        mask = padded if mask is None else padded & mask
        mask = mask | (key_index == query_index)
    elif mask is not None:
        mask = mask[None, None]
    return mask


# Below this many keys, SDPA's bf16 backward on CPU runs 2-3x slower than its fp32 one (torch
# 2.13, AVX-512 BF16 without AMX, 2 threads, causal, 8 query heads, forward + backward: 128 rows
# of 32 keys 33.5 vs 11.5 ms, 32 rows of 128 keys 42.9 vs 19.7 ms); at 512 keys they take the
# same time, at 1024 bf16 is 15% faster. `benchmarks/bench_attention.py` prints the table.
CPU_BF16_BACKWARD_MIN_KEYS = 512


def fp32_for_backward(q: Tensor, num_keys: int) -> bool:
    """Whether a bf16 attention that will be differentiated on CPU runs faster in fp32 (above):
    the inputs are cast up and the output back down, so callers see bf16 either way."""
    return (
        q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.requires_grad
        and torch.is_grad_enabled()
        and num_keys < CPU_BF16_BACKWARD_MIN_KEYS
    )


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    causal_no_cache: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Fast path: `scaled_dot_product_attention` with the shared head broadcast (GQA, 1 group);
    in fp32 where that is faster (`fp32_for_backward`)."""
    k = rearrange(k, "b j d -> b 1 j d")
    v = rearrange(v, "b j d -> b 1 j d")
    options = dict(dropout_p=dropout_p, scale=scale, enable_gqa=True)
    if causal_no_cache and mask is None:
        # the square causal case lets SDPA pick its fused kernel (no materialised mask)
        options["is_causal"] = True
    else:
        options["attn_mask"] = mask
    if not fp32_for_backward(q, k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, **options)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs down again
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
    return out.to(q.dtype)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Reference path written out: softmax(q k^T * scale + mask) v, softmax in float32."""
    sim = torch.einsum("b h i d, b j d -> b h i j", q, k) * scale
    if mask is not None:
        sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
    attn = sim.float().softmax(dim=-1).to(q.dtype)
    attn = F.dropout(attn, p=dropout_p, training=training)
    return torch.einsum("b h i j, b j d -> b h i d", attn, v)


def cached_step_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache,
    layer: int,
    keys_end: Optional[int],
    scale: float,
    flash_attn: bool,
) -> Tensor:
    """One new query per row against the cache: q (b, h, d), the new k, v (b, 1, d), written
    to `cache.slot` of `layer` in place -> (b, h, d). Attends the slots below `keys_end` (None:
    the whole buffer, as the compiled step does), `cache.attn_bias` (-inf on padding and on
    slots not written yet) added to the logits. Batched products, not SDPA: at one query a
    fused kernel saves nothing and its dispatch costs more. The softmax runs in at least
    float32 (SDPA's precision), in float32 exactly when `flash_attn` is off (the reference
    path's)."""
    keys, values = cache.keys[layer], cache.values[layer]  # (b, max_len, d)
    keys.index_copy_(1, cache.slot, k.to(keys.dtype))
    values.index_copy_(1, cache.slot, v.to(values.dtype))
    keys, values = keys[:, :keys_end], values[:, :keys_end]
    bias = cache.attn_bias[:, :, :keys_end]  # (b, 1, j)
    scores = torch.baddbmm(bias.to(q.dtype), q, keys.transpose(1, 2).to(q.dtype), alpha=scale)
    exact = scores.dtype if flash_attn else torch.float32
    attn = scores.softmax(dim=-1, dtype=torch.promote_types(exact, torch.float32))
    return torch.bmm(attn.to(values.dtype), values)


class KVCache:
    """Preallocated key/value cache for all layers, one shared head per layer.

    Buffers are (layers, b, max_len, d); `update` writes the new keys/values of one layer and
    returns views over everything cached so far. After a forward pass the model calls
    `advance(n)`. The cache also tracks the key padding mask and, per row, how many real tokens
    came before, so rotary positions stay right for left-padded prompts.

    For the single-token decode step (`model/decode.py`) it also keeps, as tensors that never
    change shape: `attn_bias` (b, 1, max_len), 0 on real cached keys and -inf on padding and
    on slots not written yet; `slot` (1,), the slot the next token is written to; and
    `rotary_table` (max_len, 2, r, d), every position's rotation (`RotaryEmbedding.table`).
    `compile` asks the model to run that step through `torch.compile`; `row_blocks` is how
    many row blocks that step splits each weight product into (`cpu_tuning.row_blocks`).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        dim_head: int,
        device,
        dtype,
        rotary_table: Optional[Tensor] = None,
        compile: bool = False,
        row_blocks: int = 1,
    ):
        self.max_len = max_len
        self.keys = torch.zeros(num_layers, batch, max_len, dim_head, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.attn_bias = torch.full((batch, 1, max_len), float("-inf"), device=device, dtype=dtype)
        self.num_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.rotary_table = rotary_table
        self.compile = compile
        self.row_blocks = row_blocks
        self.length = 0
        self.has_padding = False

    def positions(self, new_mask: Optional[Tensor], num_new: int) -> Tensor:
        """Rotary positions (b, n) of the next `num_new` tokens (padding gets the next one too)."""
        if new_mask is None:
            steps = torch.arange(num_new, device=self.num_real.device)
            return self.num_real[:, None] + steps
        return self.num_real[:, None] + (new_mask.long().cumsum(dim=-1) - 1).clamp(min=0)

    def register(self, new_mask: Optional[Tensor], num_new: int):
        if self.length + num_new > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {num_new} new tokens > "
                f"max_len {self.max_len}"
            )
        bias = self.attn_bias[:, 0, self.length : self.length + num_new]
        bias.zero_()
        if new_mask is not None:
            self.key_mask[:, self.length : self.length + num_new] = new_mask
            bias.masked_fill_(~new_mask, float("-inf"))
            self.has_padding = self.has_padding or not bool(new_mask.all())

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[1]
        self.keys[layer, :, self.length : end] = k
        self.values[layer, :, self.length : end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def current_key_mask(self, num_new: int) -> Optional[Tensor]:
        if not self.has_padding:
            return None
        return self.key_mask[:, : self.length + num_new]

    def advance(self, new_mask: Optional[Tensor], num_new: int):
        self.num_real += num_new if new_mask is None else new_mask.sum(dim=-1)
        self.length += num_new
        self.slot.fill_(self.length)

    def repeat_rows(self, times: int) -> KVCache:
        """A cache of `times` copies of each row, in contiguous rows (row i -> rows i * times
        ... i * times + times - 1): prompts prefilled once per group, then decoded per row."""
        twin = copy.copy(self)
        for name in ("keys", "values"):  # (layers, b, max_len, d)
            setattr(twin, name, getattr(self, name).repeat_interleave(times, dim=1))
        for name in ("key_mask", "attn_bias", "num_real"):
            setattr(twin, name, getattr(self, name).repeat_interleave(times, dim=0))
        twin.slot = self.slot.clone()
        return twin


class PrefixKeys:
    """Each layer's keys and values of a prefix shared by groups of rows (`shared_prefix.py`):
    recorded by the prefix pass, then put (repeated over each group) before the new tokens'
    own by the pass over the rest of the columns, through `attending()`. The two passes hold
    different objects, so a block recomputed in the backward pass (activation checkpointing)
    does what it did in the forward."""

    def __init__(self, group_size: int, keys: Optional[dict] = None):
        self.group_size = group_size
        self.recording = keys is None
        self.keys: dict[int, tuple[Tensor, Tensor]] = {} if keys is None else keys

    def attending(self) -> PrefixKeys:
        """The same keys, for the pass over the rest of the columns."""
        return PrefixKeys(self.group_size, self.keys)

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The new k, v (rows, n, d) -> every key and value these queries attend."""
        if self.recording:
            self.keys[layer] = (k, v)
            return k, v
        prefix = (repeat(t, "p j d -> (p g) j d", g=self.group_size) for t in self.keys[layer])
        return tuple(torch.cat((old, new), dim=1) for old, new in zip(prefix, (k, v)))
