"""Load checkpoints of the reference project, palm-rlhf-pytorch 0.8.0, into our PaLM.

The reference writes weights with ``torch.save(module.state_dict(), path)`` (``.pt``: a zip
archive, or a bare pickle from torch < 1.6). We read such files with ``torch.load(...,
weights_only=True)``, which only rebuilds tensors and plain containers and refuses anything
that would run code. Our own files are safetensors (`palm_rlhf.checkpoint`).

Mapping rules, reference name -> ours (``i`` a layer, ``s`` a LoRA scope):

    token_emb.weight                          token_emb.weight
    to_logits.weight                          (dropped: tied to token_emb, must be equal)
    layers.i.fn.norm.gamma   (+ 1)            layers.i.norm.weight     (LayerNorm stores
    norm.gamma               (+ 1)            norm.weight               gamma - 1, zero init)
    layers.i.fn.norm.beta, norm.beta          (dropped: a zero buffer, must be zero)
    layers.i.fn.fused_attn_ff_proj.weight     layers.i.fused_attn_ff_proj.weight  (same order:
                                              q (heads*dim_head), k, v (dim_head each),
                                              feed-forward value half then gate half)
    layers.i.fn.attn_out.weight               layers.i.attn_out.weight
    layers.i.fn.ff_out.2.weight               layers.i.ff_out.weight
    layers.i.fn.q_scale, k_scale              layers.i.q_scale, k_scale  (qk_rmsnorm)
    layers.i.fn.rotary_emb.inv_freq, .scale   (dropped: persistent buffers in the reference,
                                              recomputed here; checked against ours)
    finetune_modules.s.i.{0,1,2,3}.{A,B}      finetune_modules.s.i.{q,k,v,o}.{A,B}

The config comes from the shapes: ``num_tokens, dim`` from the embedding, ``depth`` from the
layer count, ``heads * dim_head`` from ``attn_out``, ``dim * ff_mult`` from ``ff_out``,
``dim_head`` from what is left of the fused projection (``2 * dim_head`` for k and v),
``qk_rmsnorm`` from ``q_scale``, each scope's LoRA rank from ``A``. Not in the file, so
passed in: ``rotary_xpos_scale_base`` (the reference's default, 512) and ``causal`` (True).
The reference's attention scale is always ``dim_head ** -0.5``, also with qk_rmsnorm (its
``qk_scale`` is never used), so that is the ``qk_scale`` we set.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from palm_rlhf.model.config import PaLMConfig

PathLike = Union[str, Path]
REFERENCE_XPOS_SCALE_BASE = 512  # palm-rlhf-pytorch's default rotary_xpos_scale_base
LORA_SLOTS = ("q", "k", "v", "o")  # the reference's per-layer ModuleList order
EXPECTED = (
    "expected a palm-rlhf-pytorch checkpoint written by torch.save (.pt: a zip archive or a "
    "pickle) or a palm_rlhf safetensors file"
)


class ReferenceCheckpointError(ValueError):
    """A file that is not a loadable reference or palm_rlhf checkpoint."""


# ----------------------------------------------------------------------------- file formats


def checkpoint_format(path: PathLike) -> str:
    """ "torch" (a torch.save zip or pickle) or "safetensors", from the file's first bytes.

    Anything else raises ReferenceCheckpointError saying what the file looks like instead.
    """
    path = Path(path)
    if not path.exists():
        raise ReferenceCheckpointError(f"{path} does not exist; {EXPECTED}")
    if path.is_dir():
        raise ReferenceCheckpointError(f"{path} is a directory; {EXPECTED}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch"  # a pickle (PROTO opcode): torch.save's legacy format
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= size:
            return "safetensors"
    raise ReferenceCheckpointError(f"{path} is {_describe(head, size)}; {EXPECTED}")


def _describe(head: bytes, size: int) -> str:
    if size == 0:
        return "an empty file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the weights were never downloaded)"
    if head[:1] == b"\x80":
        return "a pickle of an unknown protocol"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"an unrecognised binary file of {size} bytes (starts with {head[:8].hex()})"
    kind = "JSON" if text.lstrip()[:1] in "{[" else "text"
    return f"a {kind} file of {size} bytes starting {text[:40]!r}"


def read_torch_state_dict(path: PathLike) -> dict[str, Tensor]:
    """Read a torch.save'd state dict safely (weights_only: no pickled code runs)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure here means "refused"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ReferenceCheckpointError(
            f"refusing to load {path}: it is corrupt, truncated, or holds objects that would "
            f"run code when unpickled ({type(err).__name__}: {first}); {EXPECTED}"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ReferenceCheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; {EXPECTED}"
        )
    return dict(state)


# ----------------------------------------------------------------------------- state dicts


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under `prefix` (e.g. "palm." of a RewardModel, "actor_palm." of an
    RLHFTrainer.save file), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _layer_count(state: dict[str, Tensor]) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.fn\.", k))}
    if not found or found != set(range(len(found))):
        raise ReferenceCheckpointError(
            f"no reference PaLM layers (layers.<i>.fn.*) found; keys start {sorted(state)[:6]}"
        )
    return len(found)


def infer_reference_config(
    state: dict[str, Tensor],
    rotary_xpos_scale_base: Optional[int] = REFERENCE_XPOS_SCALE_BASE,
    **overrides,
) -> PaLMConfig:
    """Our PaLMConfig for a reference PaLM state dict, from its tensor shapes."""
    if "token_emb.weight" not in state:
        prefixes = sorted({k.split("token_emb.weight")[0] for k in state if "token_emb" in k})
        hint = f" (found it under prefix {prefixes}: pass prefix=)" if prefixes else ""
        raise ReferenceCheckpointError(
            f"not a reference PaLM state dict: no token_emb.weight{hint}"
        )
    num_tokens, dim = state["token_emb.weight"].shape
    depth = _layer_count(state)
    attn_inner = state["layers.0.fn.attn_out.weight"].shape[1]
    ff_inner = state["layers.0.fn.ff_out.2.weight"].shape[1]
    fused = state["layers.0.fn.fused_attn_ff_proj.weight"].shape[0]
    kv = fused - attn_inner - 2 * ff_inner
    if kv <= 0 or kv % 2 or attn_inner % (kv // 2) or ff_inner % dim:
        raise ReferenceCheckpointError(
            f"inconsistent reference shapes: fused projection {fused} rows, attention inner "
            f"{attn_inner}, feed-forward inner {ff_inner}, dim {dim}"
        )
    dim_head = kv // 2
    qk_rmsnorm = "layers.0.fn.q_scale" in state
    values = dict(
        num_tokens=num_tokens,
        dim=dim,
        depth=depth,
        dim_head=dim_head,
        heads=attn_inner // dim_head,
        ff_mult=ff_inner // dim,
        qk_rmsnorm=qk_rmsnorm,
        rotary_xpos_scale_base=rotary_xpos_scale_base,
    )
    if qk_rmsnorm:
        values["qk_scale"] = dim_head**-0.5  # the reference's Attention ignores its qk_scale
    ranks = {spec["r"] for spec in reference_lora_specs(state).values()}
    if len(ranks) == 1:
        values["lora_r"] = ranks.pop()
    values.update(overrides)
    return PaLMConfig(**values)


def reference_architecture(config: PaLMConfig, state: dict[str, Tensor]) -> PaLMConfig:
    """`config` switched to the architecture a reference PaLM with `state`'s weights had, so
    that loading the file into a model of `config` gives the reference's logits.

    The reference's PaLM always applies xPos when causal (its `use_xpos` is not a PaLM
    keyword) and always scales attention by `dim_head ** -0.5`; neither is in the file, so
    they are set here: xPos at `config`'s scale base if it has one, else at the reference's
    default (512), and `qk_scale` to `dim_head ** -0.5` under qk_rmsnorm. What the file does
    decide (shapes, qk_rmsnorm) and the rotary base (always 10000 there) must already match:
    otherwise one line names the keywords to build the model with."""
    xpos = config.rotary_xpos_scale_base or REFERENCE_XPOS_SCALE_BASE
    file = infer_reference_config(
        state, xpos if config.causal else None, causal=config.causal, lora_r=config.lora_r
    )
    wanted = {
        name: file_value for name, (file_value, _) in config.shape_mismatch(file.to_dict()).items()
    }
    if config.rotary_base != file.rotary_base:
        wanted["rotary_base"] = file.rotary_base
    if wanted:
        keywords = ", ".join(f"{name}={value!r}" for name, value in wanted.items())
        raise ReferenceCheckpointError(
            f"this palm-rlhf-pytorch state dict was written by a PaLM with {keywords}: "
            f"build the model with PaLM(..., {keywords}) to load it"
        )
    return replace(
        config, rotary_xpos_scale_base=file.rotary_xpos_scale_base, qk_scale=file.qk_scale
    )


def reference_lora_specs(state: dict[str, Tensor]) -> dict[str, dict]:
    specs = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"finetune_modules\.([^.]+)\.0\.0\.A", key)
        if match:
            specs[match.group(1)] = {"r": tensor.shape[1], "alpha": None, "targets": LORA_SLOTS}
    return specs


def _expect_equal(name: str, found: Tensor, expected: Tensor, what: str) -> None:
    if found.shape != expected.shape or not torch.allclose(found.float(), expected, atol=1e-6):
        raise ReferenceCheckpointError(f"{name} is not {what}; cannot map it to this PaLM")


def map_reference_state_dict(state: dict[str, Tensor], config: PaLMConfig) -> dict[str, Tensor]:
    """Pure: a reference PaLM state dict -> our PaLM's state dict (names, LayerNorm gain).

    Every reference tensor is either mapped or checked and dropped (tied output weight, zero
    LayerNorm beta, rotary buffers); an unknown key raises, so nothing is silently lost.
    """
    out: dict[str, Tensor] = {}
    half = torch.arange(0, config.dim_head, 2, dtype=torch.float32)
    inv_freq = 1.0 / (config.rotary_base ** (half / config.dim_head))
    zeta = (half + 0.4 * config.dim_head) / (1.4 * config.dim_head)
    layer_rules = {
        "norm.gamma": "norm.weight",
        "fused_attn_ff_proj.weight": "fused_attn_ff_proj.weight",
        "attn_out.weight": "attn_out.weight",
        "ff_out.2.weight": "ff_out.weight",
        "q_scale": "q_scale",
        "k_scale": "k_scale",
    }
    for key, tensor in state.items():
        if key == "token_emb.weight":
            out[key] = tensor
        elif key == "to_logits.weight":
            _expect_equal(key, tensor, state["token_emb.weight"].float(), "tied to token_emb")
        elif key == "norm.gamma":
            out["norm.weight"] = tensor.float() + 1  # in float32: no rounding of the gain
        elif key.endswith("norm.beta"):
            _expect_equal(key, tensor, torch.zeros_like(tensor, dtype=torch.float32), "zero")
        elif m := re.fullmatch(r"layers\.(\d+)\.fn\.(.+)", key):
            index, rest = m.groups()
            if rest == "rotary_emb.inv_freq":
                _expect_equal(
                    key, tensor, inv_freq, f"the rotary frequencies of base {config.rotary_base}"
                )
            elif rest == "rotary_emb.scale":
                _expect_equal(key, tensor, zeta, "the xPos scale of this head dimension")
            elif rest in layer_rules:
                value = tensor.float() + 1 if rest == "norm.gamma" else tensor
                out[f"layers.{index}.{layer_rules[rest]}"] = value
            else:
                raise ReferenceCheckpointError(f"unknown reference PaLM tensor {key}")
        elif m := re.fullmatch(r"finetune_modules\.([^.]+)\.(\d+)\.([0-3])\.([AB])", key):
            scope, index, slot, name = m.groups()
            out[f"finetune_modules.{scope}.{index}.{LORA_SLOTS[int(slot)]}.{name}"] = tensor
        else:
            raise ReferenceCheckpointError(f"unknown reference PaLM tensor {key}")
    return out


def palm_from_reference_state_dict(
    cls,
    state: dict[str, Tensor],
    rotary_xpos_scale_base: Optional[int] = REFERENCE_XPOS_SCALE_BASE,
    **config_overrides,
):
    """Build our PaLM (`cls`, with the file's LoRA scopes) holding a reference state dict's
    weights. `cls` is passed in so this module never imports the model (the model imports it)."""
    config = infer_reference_config(state, rotary_xpos_scale_base, **config_overrides)
    mapped = map_reference_state_dict(state, config)
    model = cls.from_config(config)
    for scope, spec in reference_lora_specs(state).items():
        model.add_finetune_params(scope, lora_r=spec["r"], targets=spec["targets"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ReferenceCheckpointError(f"reference state dict lacks {missing[:5]}")
    for key, tensor in mapped.items():
        if tensor.shape != expected[key].shape:
            raise ReferenceCheckpointError(
                f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()})
    return model


def reference_reward_head(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The non-PaLM tensors of a reference RewardModel state dict, in our RewardModel's names
    ("head.weight", "head.bias", "prompt_embed", "response_embed"). The reference's scalar
    head has no bias (a zero one is returned); its binned head has one."""
    if "to_pred.weight" in state:
        weight, bias = state["to_pred.weight"], state["to_pred.bias"]
    elif "to_pred.0.weight" in state:
        weight = state["to_pred.0.weight"]
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    else:
        raise ReferenceCheckpointError(
            f"not a reference RewardModel state dict (no to_pred): {json.dumps(sorted(state)[:6])}"
        )
    return {
        "head.weight": weight,
        "head.bias": bias,
        "prompt_embed": state["prompt_embed"],
        "response_embed": state["response_embed"],
    }


def split_reference_reward_state(state: dict[str, Tensor]) -> dict:
    """Pure: a reference RewardModel state dict -> the parts our RewardModel is built from.

    Returns ``palm`` (the reference PaLM state dict without LoRA scopes: feed it to
    `palm_from_reference_state_dict`), ``base`` (the same in our PaLM's names), ``tensors``
    (head, prompt/response embeddings and LoRA scope in the names of our RewardModel's
    checkpoints: "head.weight", "prompt_embed", "lora.0.q.A", ...), ``num_binned_output`` (0
    for the scalar head), ``scope`` (the reward LoRA scope's name, or None) and ``lora_r``.
    """
    tensors = reference_reward_head(state)
    palm_state = strip_prefix(state, "palm.")
    specs = reference_lora_specs(palm_state)
    if len(specs) > 1:
        raise ReferenceCheckpointError(
            f"a reference RewardModel has one LoRA scope; found {sorted(specs)}"
        )
    scope = next(iter(specs), None)
    reference_base = {k: v for k, v in palm_state.items() if not k.startswith("finetune_")}
    mapped = map_reference_state_dict(palm_state, infer_reference_config(reference_base))
    if scope is not None:
        lora = strip_prefix(mapped, f"finetune_modules.{scope}.")
        tensors.update({f"lora.{k}": v for k, v in lora.items()})
    bins = tensors["head.weight"].shape[0]
    return {
        "palm": reference_base,
        "base": {k: v for k, v in mapped.items() if not k.startswith("finetune_")},
        "tensors": tensors,
        "num_binned_output": bins if bins > 1 else 0,
        "scope": scope,
        "lora_r": specs[scope]["r"] if scope is not None else None,
    }
