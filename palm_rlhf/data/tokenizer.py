"""Tokenizers behind one protocol: raw UTF-8 bytes (the enwik8 vocabulary) or SentencePiece.

Each saves `tokenizer.json` (+ `tokenizer.model`); `load_tokenizer` rebuilds it and
`tokenizer_fingerprint` lets later stages refuse a checkpoint made with another tokenizer.
"""

import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, Union, runtime_checkable

import sentencepiece as spm
from beartype import beartype

from palm_rlhf.checkpoint import PathLike, atomic_write_bytes

CONFIG_NAME = "tokenizer.json"
MODEL_NAME = "tokenizer.model"


@runtime_checkable
class Tokenizer(Protocol):
    """What the training stages need from a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: PathLike) -> None: ...


def _write_atomic(directory: PathLike, name: str, payload: bytes) -> None:
    atomic_write_bytes(Path(directory) / name, payload)


def _write_config(directory: PathLike, config: dict) -> None:
    _write_atomic(directory, CONFIG_NAME, json.dumps(config, indent=2).encode("utf-8"))


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; `vocab_size = 256`, as for enwik8.

    `pad_id = eos_id = 0`: the NUL byte never occurs in real text, so it is free to mark the end
    of a sequence and to fill padding. For that reason `encode` refuses text containing "\\x00";
    `encode_bytes`/`decode_bytes` are the lossless path for arbitrary bytes.
    """

    vocab_size = 256
    pad_id = 0
    eos_id = 0

    @beartype
    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ints; ValueError if it holds NUL (it would read as EOS)."""
        position = text.find("\x00")
        if position >= 0:
            raise ValueError(
                f"text contains a NUL character at position {position}; id 0 is reserved for "
                "end-of-sequence/padding in the byte tokenizer (use encode_bytes for raw bytes)"
            )
        return list(text.encode("utf-8"))

    @beartype
    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of `encode`; invalid UTF-8 becomes U+FFFD. Nothing is stripped."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @beartype
    def encode_bytes(self, data: bytes) -> list[int]:
        """Arbitrary bytes (NUL and invalid UTF-8 included) to ids."""
        return list(data)

    @beartype
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids to bytes, exactly; ValueError names the first id outside 0..255."""
        try:
            return bytes(ids)
        except ValueError:
            position, token = next((p, t) for p, t in enumerate(ids) if not 0 <= t < 256)
            raise ValueError(f"token id {token} at position {position} is outside 0..255") from None

    @beartype
    def save(self, directory: PathLike) -> None:
        _write_config(directory, {"type": "byte", "vocab_size": self.vocab_size})

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _sentences(text_files: Sequence[PathLike], errors: list) -> Iterator[str]:
    """Non-empty lines of .txt/.gz files. A read error (invalid UTF-8 is reported with file and
    line) is appended to `errors` and ends the stream, because sentencepiece would replace an
    exception raised inside its iterator by a bare RuntimeError."""
    try:
        for path in map(Path, text_files):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as handle:
                for line_number, raw in enumerate(handle, start=1):
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError as error:
                        raise ValueError(f"{path}:{line_number}: invalid UTF-8 ({error})") from None
                    if line:
                        yield line
    except (OSError, ValueError) as error:
        errors.append(error)


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) behind the `Tokenizer` protocol."""

    @beartype
    def __init__(self, model_file: PathLike):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"sentencepiece model file {model_file} does not exist")
        self.model_proto = model_file.read_bytes()
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self.processor.get_piece_size()
        self.pad_id = self.processor.pad_id()
        self.eos_id = self.processor.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"sentencepiece model {model_file} defines no pad or eos piece "
                f"(pad_id={self.pad_id}, eos_id={self.eos_id}); train it with both enabled"
            )

    @classmethod
    @beartype
    def train(
        cls,
        text_files: Sequence[PathLike],
        directory: PathLike,
        vocab_size: int = 8000,
        model_type: Literal["bpe", "unigram"] = "bpe",
        character_coverage: float = 0.9995,
        max_sentences: int = 2_000_000,
        **options,
    ) -> "SentencePieceTokenizer":
        """Train offline on the lines of `text_files` and save into `directory`.

        Ids 0..3 are pad, unk, bos, eos; byte fallback lets any text encode. Normalisation is
        the identity and whitespace is kept, so `decode(encode(text)) == text`. At most
        `max_sentences` lines (sampled) are used. Extra `options` go to SentencePieceTrainer.
        """
        if not text_files:
            raise ValueError("no text files given to train the tokenizer on")
        reader_errors: list[Exception] = []
        model, special_ids = io.BytesIO(), dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(text_files, reader_errors),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                **special_ids,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                minloglevel=2,
                **options,
            )
        except RuntimeError:
            if reader_errors:
                raise reader_errors[0] from None
            raise
        if reader_errors:
            raise reader_errors[0]
        _write_atomic(directory, MODEL_NAME, model.getvalue())
        tokenizer = cls(Path(directory) / MODEL_NAME)
        tokenizer.save(directory)
        return tokenizer

    @beartype
    def encode(self, text: str) -> list[int]:
        """Text to piece ids; characters outside the vocabulary fall back to byte pieces."""
        return self.processor.encode(text, out_type=int)

    @beartype
    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; ValueError names the first id outside 0..vocab_size-1."""
        ids = [int(token) for token in ids]
        bad = next((p for p, token in enumerate(ids) if not 0 <= token < self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"token id {ids[bad]} at position {bad} is outside 0..{self.vocab_size - 1}"
            )
        return self.processor.decode(ids)

    @beartype
    def save(self, directory: PathLike) -> None:
        _write_atomic(directory, MODEL_NAME, self.model_proto)
        config = {
            "type": "sentencepiece",
            "vocab_size": self.vocab_size,
            "model_file": MODEL_NAME,
            "model_sha256": hashlib.sha256(self.model_proto).hexdigest(),
        }
        _write_config(directory, config)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


@beartype
def load_tokenizer(directory: PathLike) -> Union[ByteTokenizer, SentencePieceTokenizer]:
    """Rebuild the tokenizer saved in `directory` from its `tokenizer.json`."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no tokenizer saved in {directory}: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    kind = config.get("type") if isinstance(config, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind != "sentencepiece":
        raise ValueError(f"{config_path}: unknown tokenizer type {kind!r}")
    model_path = config_path.parent / MODEL_NAME
    tokenizer = SentencePieceTokenizer(model_path)
    expected = config.get("model_sha256")
    if expected is not None and expected != hashlib.sha256(tokenizer.model_proto).hexdigest():
        raise ValueError(f"{model_path} does not match the sha256 recorded in {config_path}")
    return tokenizer


@beartype
def tokenizer_fingerprint(tokenizer: Union[ByteTokenizer, SentencePieceTokenizer]) -> str:
    """sha256 of the tokenizer type and its model bytes; equal fingerprints, identical ids."""
    if isinstance(tokenizer, ByteTokenizer):
        return hashlib.sha256(b"byte\x00256").hexdigest()
    return hashlib.sha256(b"sentencepiece\x00" + tokenizer.model_proto).hexdigest()
