"""Loading a trained model for the next stage: weights and the tokenizer that travels with them.

Every stage's checkpoint folder holds `model.safetensors` and `tokenizer.json` (+ model file);
`load_base` accepts that folder, a run folder (its `latest`), or a weights file, and refuses a
tokenizer that maps text to other ids than the one the model was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from palm_rlhf.checkpoint import find_weights
from palm_rlhf.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from palm_rlhf.model.palm import PaLM


class TokenizerMismatchError(ValueError):
    """A stage was given a tokenizer other than the one its checkpoint was trained with."""


def check_tokenizer(folder: Path, tokenizer, source: str) -> None:
    """Refuse `tokenizer` when `folder` stores a different one (compared by fingerprint)."""
    if not (folder / "tokenizer.json").is_file():
        return
    stored = load_tokenizer(folder)
    if tokenizer_fingerprint(stored) != tokenizer_fingerprint(tokenizer):
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {folder} was trained with {stored!r} (its tokenizer.json), "
            f"but this stage uses {tokenizer!r} from {source}; the two map text to different "
            f"ids. Drop --tokenizer to use the checkpoint's own, or start from a checkpoint "
            f"trained with this tokenizer."
        )


def load_base(
    path, tokenizer_dir=None, base_scope: Optional[str] = None, log: Callable = print
) -> tuple[PaLM, Any]:
    """The model to fine-tune and its tokenizer, from a checkpoint folder or weights file.

    The tokenizer is the one stored beside the weights; `tokenizer_dir` may name one too, and
    must then be identical. LoRA scopes in the checkpoint are folded into the weights (a base
    is used as its previous stage trained it); with several, `base_scope` picks the one.
    """
    weights = find_weights(path)
    model = PaLM.from_pretrained(weights)
    scopes = model.finetune_scopes
    if scopes:
        chosen = base_scope or (scopes[0] if len(scopes) == 1 else None)
        if chosen not in scopes:
            raise ValueError(
                f"{weights} carries LoRA scopes {list(scopes)}; pass --base-scope to pick the "
                "one to fold into the weights"
            )
        model.merge_finetune_params(chosen)
        for other in model.finetune_scopes:
            model.remove_finetune_params(other)
        log(f"folded LoRA scope {chosen!r} of {weights} into the base weights")
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        check_tokenizer(weights.parent, tokenizer, str(tokenizer_dir))
    elif (weights.parent / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(weights.parent)
    else:
        raise FileNotFoundError(
            f"no tokenizer.json beside {weights}; pass --tokenizer with the folder of the "
            "tokenizer this model was trained with"
        )
    if tokenizer.vocab_size > model.num_tokens:
        raise TokenizerMismatchError(
            f"{tokenizer!r} has {tokenizer.vocab_size} ids but the model at {weights} embeds "
            f"only {model.num_tokens}"
        )
    return model, tokenizer
