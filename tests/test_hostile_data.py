"""Property-based tests: whatever a data file or a string holds, the loaders and tokenizers
either return correct data or raise an error that names the file and line — never an
unexplained traceback."""

import json
import re
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palm_rlhf.data.collate import encode_prompt_response
from palm_rlhf.data.records import RecordError, read_comparisons, read_ratings, read_sft
from palm_rlhf.data.tokenizer import ByteTokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(
    ["prompt", "response", "rating", "chosen", "rejected", "responses", "ranking", "other"]
)
records = st.dictionaries(keys, json_values | st.text(min_size=1, max_size=30), max_size=5)
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=60),  # anything at all: invalid UTF-8, NUL bytes, half a JSON object
    st.just(b""),
    st.just(b"   "),
    st.text(max_size=10).map(lambda t: ("x" * 5000 + t).encode()),  # huge lines
)


def write(tmp_dir: Path, content: list[bytes]) -> Path:
    path = tmp_dir / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in content))
    return path


@SETTINGS
@given(content=st.lists(lines, min_size=1, max_size=6))
def test_readers_load_or_name_file_and_line(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), content)
        for reader in (read_sft, read_comparisons, lambda p: read_ratings(p, num_bins=5)):
            try:
                loaded = reader(path)
            except RecordError as error:
                message = str(error)
                match = re.search(rf"{re.escape(str(path))}:(\d+)", message)
                if match:
                    assert 1 <= int(match.group(1)) <= len(content)
                else:  # only a file with no records at all may fail without a line number
                    assert str(path) in message and "no" in message.lower()
                continue
            assert loaded, "a reader returned no records without raising"
            for record in loaded:
                for field in record:
                    assert field is not None


@SETTINGS
@given(text=st.text(max_size=200))
def test_byte_tokenizer_round_trips_text_or_refuses_nul(text):
    tokenizer = ByteTokenizer()
    if "\x00" in text:
        try:
            tokenizer.encode(text)
        except ValueError as error:
            assert "NUL" in str(error) or "position" in str(error)
            return
        raise AssertionError("NUL was accepted although it is the EOS id")
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids) and tokenizer.decode(ids) == text


@SETTINGS
@given(
    prompt=st.text(min_size=1, max_size=120),
    response=st.text(min_size=1, max_size=60),
    max_len=st.integers(2, 80),
)
def test_encoding_truncates_prompt_left_or_refuses(prompt, response, max_len):
    tokenizer = ByteTokenizer()
    if "\x00" in prompt + response:
        return
    try:
        ids, num_prompt = encode_prompt_response(tokenizer, prompt, response, max_len)
    except ValueError as error:
        assert "token" in str(error)  # names the lengths involved
        return
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    assert len(ids) <= max_len and ids[num_prompt:] == response_ids
    assert ids[:num_prompt] == tokenizer.encode(prompt)[-num_prompt:]
    assert torch.tensor(ids).max() < 256
