import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm_rlhf.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards hex zebras quietly "
    "Über café naïve 東京 Ωmega? yes! (maybe) 42 x=y+1; end."
).split()


def write_corpus(path, seed, num_lines=200):
    """A few KB of varied text drawn from a fixed word list."""
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(num_lines)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    corpus = write_corpus(directory / "corpus.txt", seed=0)
    SentencePieceTokenizer.train([corpus], directory, vocab_size=320, model_type="bpe")
    return directory


# ---- byte tokenizer ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary())
def test_byte_round_trip_of_arbitrary_bytes(data):
    tok = ByteTokenizer()
    ids = tok.encode_bytes(data)
    assert ids == [b for b in data]
    assert tok.decode_bytes(ids) == data


@settings(max_examples=100, deadline=None)
@given(st.text().filter(lambda s: "\x00" not in s))
def test_byte_text_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_encoding_is_utf8():
    tok = ByteTokenizer()
    # "é" is U+00E9 -> 0xC3 0xA9; "€" is U+20AC -> 0xE2 0x82 0xAC
    assert tok.encode("aé€") == [97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert tok.decode([104, 105, 0xE2, 0x82, 0xAC]) == "hi€"
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (256, 0, 0)
    assert isinstance(tok, Tokenizer)


def test_byte_decode_replaces_invalid_utf8_without_stopping():
    tok = ByteTokenizer()
    # a lone continuation byte is invalid; decoding carries on past it and past NUL
    assert tok.decode([97, 0x80, 98, 0, 99]) == "a\ufffdb\x00c"


def test_byte_encode_rejects_nul_naming_position():
    with pytest.raises(ValueError, match="position 3"):
        ByteTokenizer().encode("abc\x00def")


def test_byte_decode_rejects_out_of_range_ids():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="token id 256 at position 2"):
        tok.decode([1, 2, 256])
    with pytest.raises(ValueError, match="token id -1 at position 0"):
        tok.decode_bytes([-1, 5])


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "byte"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(ByteTokenizer())


# ---- sentencepiece ----------------------------------------------------------------------


def test_sentencepiece_trained_model_layout(sp_dir):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model")
    config = json.loads((sp_dir / "tokenizer.json").read_text())
    assert config["type"] == "sentencepiece" and config["vocab_size"] == 320
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (320, 0, 3)
    assert isinstance(tok, Tokenizer)
    # frequent words become single pieces: a word-level model uses fewer ids than bytes
    text = "the quick brown fox jumps over a lazy dog"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_sentencepiece_round_trip_any_text(sp_dir, text):
    # identity normalisation + byte fallback: unseen characters (and whitespace runs) survive
    tok = load_tokenizer(sp_dir)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_sentencepiece_round_trip_non_ascii(sp_dir):
    tok = load_tokenizer(sp_dir)
    for text in ["Über café 東京", "  two  spaces\tand tab\n", "unseen: ∂ 😀 ß"]:
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_decode_rejects_out_of_range(sp_dir):
    tok = load_tokenizer(sp_dir)
    with pytest.raises(ValueError, match="token id 320 at position 1"):
        tok.decode([5, 320])
    with pytest.raises(ValueError, match="token id -2 at position 0"):
        tok.decode([-2])


def test_sentencepiece_save_load_gives_identical_ids(sp_dir, tmp_path):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model")
    tok.save(tmp_path / "copy")
    loaded = load_tokenizer(tmp_path / "copy")
    assert isinstance(loaded, SentencePieceTokenizer)
    text = "seven wizards hex zebras — Ωmega 東京!"
    assert loaded.encode(text) == tok.encode(text)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


def test_fingerprints_differ_between_tokenizers(sp_dir, tmp_path):
    other_corpus = write_corpus(tmp_path / "other.txt", seed=1, num_lines=150)
    other = SentencePieceTokenizer.train([other_corpus], tmp_path / "other", vocab_size=310)
    fingerprints = {
        tokenizer_fingerprint(ByteTokenizer()),
        tokenizer_fingerprint(load_tokenizer(sp_dir)),
        tokenizer_fingerprint(other),
    }
    assert len(fingerprints) == 3


def test_train_reads_gzip(tmp_path):
    import gzip

    plain = write_corpus(tmp_path / "c.txt", seed=2)
    packed = tmp_path / "c.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    from_plain = SentencePieceTokenizer.train([plain], tmp_path / "a", vocab_size=320)
    from_gzip = SentencePieceTokenizer.train([packed], tmp_path / "b", vocab_size=320)
    assert tokenizer_fingerprint(from_plain) == tokenizer_fingerprint(from_gzip)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_detects_swapped_model(sp_dir, tmp_path):
    load_tokenizer(sp_dir).save(tmp_path / "a")
    other = write_corpus(tmp_path / "o.txt", seed=3)
    SentencePieceTokenizer.train([other], tmp_path / "b", vocab_size=320)
    (tmp_path / "a" / "tokenizer.model").write_bytes(
        (tmp_path / "b" / "tokenizer.model").read_bytes()
    )
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(tmp_path / "a")


def test_train_reports_invalid_utf8_with_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff byte\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: invalid UTF-8"):
        SentencePieceTokenizer.train([bad], tmp_path / "out", vocab_size=320)


def test_train_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        SentencePieceTokenizer.train([tmp_path / "nowhere.txt"], tmp_path / "out", vocab_size=320)
