"""Pretraining text: enwik8 / raw-text readers and the datasets that cut them into chunks.

Everything here is byte-level: a split is a 1-D `torch.uint8` tensor of raw bytes, and a
training example is `seq_len + 1` consecutive tokens (inputs are the first `seq_len`, targets
the last `seq_len`).
"""

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import NamedTuple

import torch
from beartype import beartype
from torch.utils.data import Dataset

from palm_rlhf.checkpoint import PathLike


class Splits(NamedTuple):
    """Train/validation/test byte streams, each a 1-D uint8 tensor (n,)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def _read(path: Path, size: int = -1) -> bytes:
    """Up to `size` bytes (all when -1) of a raw or gzipped file; a damaged .gz names the file."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            return handle.read(size)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: damaged gzip file ({error})") from None


def _as_tensor(data: bytes) -> torch.Tensor:
    # bytearray is writable, so frombuffer shares its memory without a copy or a warning
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@beartype
def read_enwik8(
    path: PathLike,
    train_bytes: int = 90_000_000,
    valid_bytes: int = 5_000_000,
    test_bytes: int = 5_000_000,
) -> Splits:
    """The standard enwik8 split of a raw (or gzipped) byte file.

    Bytes [0, train) are training, [train, train+valid) validation and the next `test_bytes`
    the test split (95M-100M for the real file). Bytes past the sum are ignored.
    """
    if min(train_bytes, valid_bytes, test_bytes) < 0:
        raise ValueError("split sizes must be non-negative")
    path = Path(path)
    required = train_bytes + valid_bytes + test_bytes
    data = _read(path, required)
    if len(data) < required:
        raise ValueError(
            f"{path} holds {len(data):,} bytes (uncompressed) but the split needs "
            f"{required:,} = {train_bytes:,} train + {valid_bytes:,} valid + {test_bytes:,} test"
        )
    tokens = _as_tensor(data)
    valid_end = train_bytes + valid_bytes
    return Splits(tokens[:train_bytes], tokens[train_bytes:valid_end], tokens[valid_end:required])


@beartype
def read_text_corpus(
    path: PathLike, valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> Splits:
    """A .txt or .gz text file as raw bytes, split at the end into validation and test.

    With n bytes, test is the final round(n * test_fraction) bytes, validation the
    round(n * valid_fraction) bytes before it, and training everything earlier. Each split
    with a positive fraction must hold at least 2 bytes (one input and its target).
    """
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            f"need valid_fraction, test_fraction >= 0 with sum < 1, got "
            f"{valid_fraction} and {test_fraction}"
        )
    path = Path(path)
    data = _read(path)
    num_bytes = len(data)
    num_test = round(num_bytes * test_fraction)
    num_valid = round(num_bytes * valid_fraction)
    num_train = num_bytes - num_valid - num_test
    sizes = {"train": (num_train, 1.0), "valid": (num_valid, valid_fraction)}
    sizes["test"] = (num_test, test_fraction)
    for name, (size, fraction) in sizes.items():
        if fraction > 0 and size < 2:
            raise ValueError(
                f"{path} holds only {num_bytes} bytes: too small to give the {name} split "
                f"at least 2 bytes (it would get {size})"
            )
    tokens = _as_tensor(data)
    valid_end = num_train + num_valid
    return Splits(tokens[:num_train], tokens[num_train:valid_end], tokens[valid_end:])


@beartype
def load_pretraining_data(data_dir: PathLike) -> tuple[Splits, str]:
    """enwik8 from `data_dir/enwik8.gz` if present, else the bundled `corpus.txt.gz`.

    Returns the splits and a one-line description for logs.
    """
    data_dir = Path(data_dir)
    enwik8, corpus = data_dir / "enwik8.gz", data_dir / "corpus.txt.gz"
    if enwik8.is_file():
        splits, source = read_enwik8(enwik8), f"enwik8 ({enwik8})"
    elif corpus.is_file():
        splits, source = read_text_corpus(corpus), f"text corpus ({corpus})"
    else:
        raise FileNotFoundError(
            f"no pretraining data: looked for {enwik8} and then {corpus}; neither exists"
        )
    sizes = " / ".join(f"{len(split):,}" for split in splits)
    return splits, f"{source}: {sizes} bytes train / valid / test"


def _check_tokens(data: torch.Tensor, seq_len: int) -> None:
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D token tensor, got shape {tuple(data.shape)}")
    if data.dtype not in (torch.uint8, torch.int32, torch.int64):
        raise ValueError(f"data must hold uint8 or integer tokens, got dtype {data.dtype}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if data.numel() < seq_len + 1:
        raise ValueError(
            f"data holds {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )


def _check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index out of range for a dataset of {length} items")
    return index


class RandomChunkDataset(Dataset):
    """`num_samples` random windows of `seq_len + 1` tokens, each a LongTensor (seq_len + 1,).

    The offset of item i comes from a generator seeded by a hash of (seed, i) alone, so an item
    does not depend on which items were read before it: resuming by skipping batches, or
    sharding the indices over processes, sees exactly the same data as one uninterrupted run.
    """

    @beartype
    def __init__(self, data: torch.Tensor, seq_len: int, num_samples: int, seed: int = 0):
        _check_tokens(data, seq_len)
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.data, self.seq_len, self.num_samples, self.seed = data, seq_len, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, index: int) -> int:
        """Start of item `index`, uniform over [0, len(data) - seq_len - 1]."""
        index = _check_index(index, self.num_samples)
        key = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        high = self.data.numel() - self.seq_len  # exclusive bound of valid offsets
        return int(torch.randint(high, (1,), generator=generator))

    def __getitem__(self, index: int) -> torch.Tensor:
        start = self.offset(index)
        return self.data[start : start + self.seq_len + 1].long()


class SequentialChunkDataset(Dataset):
    """Consecutive windows of `seq_len + 1` tokens with stride `seq_len`, for evaluation.

    Item k covers tokens [k * seq_len, (k + 1) * seq_len]; neighbours share one token, so the
    targets of all items together are tokens 1 .. len(self) * seq_len, each exactly once. The
    last `(len(data) - 1) % seq_len` tokens, too few for a full window, are left out.
    """

    @beartype
    def __init__(self, data: torch.Tensor, seq_len: int):
        _check_tokens(data, seq_len)
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        start = _check_index(index, len(self)) * self.seq_len
        return self.data[start : start + self.seq_len + 1].long()
