import gzip

import pytest
import torch

from palm_rlhf.data.corpus import (
    RandomChunkDataset,
    SequentialChunkDataset,
    Splits,
    load_pretraining_data,
    read_enwik8,
    read_text_corpus,
)


def random_bytes(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8).tolist())


def as_tensor(data):
    return torch.tensor(list(data), dtype=torch.uint8)


# ---- readers ----------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_enwik8_splits_are_exact_slices(tmp_path, compressed):
    raw = random_bytes(1000)
    path = tmp_path / ("enwik8.gz" if compressed else "enwik8")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    splits = read_enwik8(path, train_bytes=900, valid_bytes=50, test_bytes=50)
    assert isinstance(splits, Splits)
    assert all(split.dtype == torch.uint8 and split.ndim == 1 for split in splits)
    assert torch.equal(splits.train, as_tensor(raw[:900]))
    assert torch.equal(splits.valid, as_tensor(raw[900:950]))
    assert torch.equal(splits.test, as_tensor(raw[950:1000]))


def test_enwik8_ignores_bytes_past_the_split(tmp_path):
    raw = random_bytes(120, seed=1)
    (tmp_path / "e.gz").write_bytes(gzip.compress(raw))
    splits = read_enwik8(tmp_path / "e.gz", train_bytes=80, valid_bytes=10, test_bytes=10)
    assert torch.equal(splits.test, as_tensor(raw[90:100]))


def test_enwik8_too_short_names_sizes(tmp_path):
    (tmp_path / "e.gz").write_bytes(gzip.compress(random_bytes(999)))
    with pytest.raises(ValueError, match=r"holds 999 bytes.*needs 1,000"):
        read_enwik8(tmp_path / "e.gz", train_bytes=900, valid_bytes=50, test_bytes=50)


def test_text_corpus_split_fractions(tmp_path):
    raw = ("".join(chr(97 + i % 26) for i in range(1000)) + "é").encode("utf-8")  # 1002 bytes
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(raw))
    splits = read_text_corpus(tmp_path / "c.txt.gz", valid_fraction=0.1, test_fraction=0.05)
    # round(1002 * 0.05) = 50 test bytes at the end, round(1002 * 0.1) = 100 valid before them
    assert [len(s) for s in splits] == [852, 100, 50]
    assert torch.equal(splits.train, as_tensor(raw[:852]))
    assert torch.equal(splits.valid, as_tensor(raw[852:952]))
    assert torch.equal(splits.test, as_tensor(raw[952:]))


def test_text_corpus_plain_file_and_zero_fractions(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"hello world")
    splits = read_text_corpus(tmp_path / "c.txt", valid_fraction=0.0, test_fraction=0.0)
    assert bytes(splits.train.tolist()) == b"hello world"
    assert len(splits.valid) == len(splits.test) == 0


def test_text_corpus_empty_or_small_names_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt"):
        read_text_corpus(tmp_path / "empty.txt")
    (tmp_path / "small.txt").write_bytes(b"x" * 20)  # 5% of 20 bytes is 1 byte: too few
    with pytest.raises(ValueError, match=r"small.txt holds only 20 bytes"):
        read_text_corpus(tmp_path / "small.txt")
    with pytest.raises(ValueError, match="sum < 1"):
        read_text_corpus(tmp_path / "small.txt", valid_fraction=0.5, test_fraction=0.5)


def test_load_pretraining_data_prefers_enwik8(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"enwik8.gz.*corpus.txt.gz"):
        load_pretraining_data(tmp_path)
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(b"some text\n" * 100))
    splits, description = load_pretraining_data(tmp_path)
    assert "corpus.txt.gz" in description
    assert [len(s) for s in splits] == [900, 50, 50]
    (tmp_path / "enwik8.gz").write_bytes(gzip.compress(b"\x00"))  # present but too short
    with pytest.raises(ValueError, match="enwik8.gz holds 1 bytes"):
        load_pretraining_data(tmp_path)


# ---- datasets ---------------------------------------------------------------------------


def test_random_chunks_are_deterministic_slices():
    data = torch.arange(200) % 256  # long tensor; value == position, so a chunk shows its offset
    dataset = RandomChunkDataset(data, seq_len=16, num_samples=50, seed=3)
    assert len(dataset) == 50
    offsets = set()
    for index in range(len(dataset)):
        chunk = dataset[index]
        assert chunk.dtype == torch.long and chunk.shape == (17,)
        start = int(chunk[0])
        assert 0 <= start <= 200 - 17
        assert torch.equal(chunk, data[start : start + 17])
        offsets.add(start)
    assert len(offsets) > 25  # offsets really vary across items
    # same (seed, index) -> same chunk, whatever was read before and in a fresh object
    again = RandomChunkDataset(data, seq_len=16, num_samples=50, seed=3)
    assert [int(again[i][0]) for i in reversed(range(50))] == [
        int(dataset[i][0]) for i in reversed(range(50))
    ]
    other = RandomChunkDataset(data, seq_len=16, num_samples=50, seed=4)
    assert [int(other[i][0]) for i in range(50)] != [int(dataset[i][0]) for i in range(50)]


def test_random_chunks_reach_both_ends_of_uint8_data():
    data = torch.arange(12, dtype=torch.uint8)
    dataset = RandomChunkDataset(data, seq_len=9, num_samples=200)
    # only offsets 0, 1, 2 fit a 10-token window; all three must occur
    assert {int(dataset[i][0]) for i in range(200)} == {0, 1, 2}
    assert dataset[-1].tolist() == dataset[199].tolist()
    with pytest.raises(IndexError):
        dataset[200]


def test_random_chunks_reject_short_data():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        RandomChunkDataset(torch.zeros(16, dtype=torch.uint8), seq_len=16, num_samples=4)
    with pytest.raises(ValueError, match="1-D"):
        RandomChunkDataset(torch.zeros(4, 8, dtype=torch.uint8), seq_len=3, num_samples=4)


def test_sequential_chunks_cover_data_in_order():
    data = torch.arange(23, dtype=torch.uint8)
    dataset = SequentialChunkDataset(data, seq_len=5)
    assert len(dataset) == 4  # (23 - 1) // 5; the last 2 tokens cannot fill a window
    chunks = [dataset[i] for i in range(len(dataset))]
    assert chunks[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert chunks[3].tolist() == [15, 16, 17, 18, 19, 20]
    # the targets (all but the first token) of consecutive chunks tile tokens 1..20 exactly once
    targets = torch.cat([chunk[1:] for chunk in chunks])
    assert torch.equal(targets, torch.arange(1, 21))
    assert all(chunk.dtype == torch.long for chunk in chunks)
    with pytest.raises(IndexError):
        dataset[4]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        SequentialChunkDataset(data[:5], seq_len=5)


def test_datasets_batch_with_dataloader():
    data = torch.arange(100, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(RandomChunkDataset(data, 8, 10, seed=1), batch_size=4)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(4, 9), (4, 9), (2, 9)]
    # skipping the first batch (resume) yields the same later batches
    resumed = torch.utils.data.Subset(RandomChunkDataset(data, 8, 10, seed=1), range(4, 10))
    assert torch.equal(next(iter(torch.utils.data.DataLoader(resumed, batch_size=4))), batches[1])


def test_damaged_gzip_names_file(tmp_path):
    packed = gzip.compress(random_bytes(1000))
    (tmp_path / "cut.txt.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="cut.txt.gz: damaged gzip"):
        read_text_corpus(tmp_path / "cut.txt.gz")
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="fake.gz: damaged gzip"):
        read_enwik8(tmp_path / "fake.gz", train_bytes=5, valid_bytes=1, test_bytes=1)


# ---- records that cannot be encoded ------------------------------------------------------


def _encode_short(record):
    if len(record.response) > 3:
        raise ValueError("the response is too long")
    return [record.response]


def test_an_unencodable_record_is_named_by_its_file_and_line(tmp_path):
    from palm_rlhf.data.examples import encode_file
    from palm_rlhf.data.records import RecordError, RecordWarning, read_sft

    path = tmp_path / "d.jsonl"
    lines = ['{"prompt": "p", "response": "ok"}', "", '{"prompt": "p", "response": "long"}']
    path.write_text("\n".join(lines) + "\n")
    records = read_sft(path)
    with pytest.raises(RecordError, match=rf"^{path}:3: the response is too long$"):
        encode_file(path, records, _encode_short, "raise", "SFT")
    with pytest.warns(RecordWarning) as caught:
        assert encode_file(path, records, _encode_short, "skip", "SFT") == [["ok"]]
    assert str(caught[0].message) == (
        f"skipped 1 SFT record in {path} that could not be encoded: "
        f"{path}:3: the response is too long"
    )
    # where the reader dropped a malformed line, a record's index no longer gives its line
    path.write_text("\n".join(['{"prompt": "p"}', *lines]) + "\n")
    with pytest.warns(RecordWarning):
        records = read_sft(path, on_error="skip")
    with pytest.warns(RecordWarning, match=rf"{path} record 2: the response is too long"):
        encode_file(path, records, _encode_short, "skip", "SFT")
