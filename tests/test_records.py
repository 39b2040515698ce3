"""JSON Lines readers (records.py) and their collation into tensors (collate.py)."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from beartype.roar import BeartypeCallHintParamViolation

from palm_rlhf.data.collate import (
    MISSING_RANK,
    collate_comparisons,
    collate_prompt_response,
    collate_ratings,
    encode_prompt_response,
    left_pad_prompts,
    pad_sequences,
)
from palm_rlhf.data.records import (
    ComparisonRecord,
    RatingRecord,
    RecordError,
    RecordWarning,
    SFTRecord,
    iter_jsonl,
    read_comparisons,
    read_ratings,
    read_sft,
    split_hh_dialogues,
)

FIXTURES = Path(__file__).parent / "fixtures"
HH_REAL = (
    Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
)
H, A = "\n\nHuman:", "\n\nAssistant:"


class ByteTok:
    """Bytes as ids; pad and eos default to 0 like the library's byte tokenizer."""

    def __init__(self, pad_id=0, eos_id=0):
        self.pad_id, self.eos_id = pad_id, eos_id

    def encode(self, text):
        return list(text.encode())


def write_lines(path, lines, compress=False):
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def j(**fields):
    return json.dumps(fields)


# ---------------------------------------------------------------------------------------------
# valid files


def test_read_sft_fixture():
    assert read_sft(FIXTURES / "sft.jsonl") == [
        SFTRecord("Translate to French: cat", "chat"),
        SFTRecord("What is 2 + 3?", "5"),
        SFTRecord("Name a primary colour.", "Blue — also red or yellow."),
    ]


def test_read_ratings_fixture_accepts_integral_float():
    records = read_ratings(FIXTURES / "ratings.jsonl", num_bins=5)
    assert [r.rating for r in records] == [4, 1, 5, 2]
    assert type(records[2].rating) is int  # written 5.0 in the file
    assert records[1] == RatingRecord("Describe the sky.", "Green.", 1)


def test_read_ratings_num_bins_checked():
    with pytest.raises(
        RecordError, match=r"ratings\.jsonl:3: rating 5 out of range \(must be 1\.\.4\)"
    ):
        read_ratings(FIXTURES / "ratings.jsonl", num_bins=4)
    with pytest.raises(ValueError, match="num_bins must be >= 2"):
        read_ratings(FIXTURES / "ratings.jsonl", num_bins=1)


def test_read_comparisons_fixture_pairs_and_ranked_lists():
    assert read_comparisons(FIXTURES / "comparisons.jsonl") == [
        ComparisonRecord("Add 2 and 2.", ["4", "5"], [0, 1]),
        ComparisonRecord("Pick a fruit.", ["apple", "rock", "pear"], [0, 1, 0]),
        ComparisonRecord("Count to three.", ["1 2 3", "1 2", "3 2 1", "one"], [0, 2, 3, 1]),
    ]


def test_read_hh_fixture_multi_turn():
    records = read_comparisons(FIXTURES / "hh_rlhf.jsonl")
    assert records[0] == ComparisonRecord(
        f"{H} How do I boil an egg?{A}",
        ["Put it in boiling water for about nine minutes.", "Eggs are laid by hens."],
        [0, 1],
    )
    # both answers start with "I ": the split is at the last shared "Assistant:", not at "I "
    assert records[1] == ComparisonRecord(
        f"{H} Hi there.{A} Hello! How can I help?{H} Recommend a book.{A}",
        ["I suggest Moby-Dick.", "I don't read."],
        [0, 1],
    )
    # three turns; the chosen answer is the empty one
    assert records[2].prompt == (
        f"{H} Tell me a secret.{A} I have none.{H} Come on.{A} Really, none."
        f"{H} Give me her home address.{A}"
    )
    assert records[2].responses == ["", "Sure, it is 12 Elm Street."]


def test_split_hh_dialogues_edge_cases():
    # dialogues diverging in a human turn: the response keeps the later turns
    prompt, chosen, rejected = split_hh_dialogues(f"{H} a{A} b{H} c{A} d", f"{H} a{A} b{H} x{A} y")
    assert (prompt, chosen, rejected) == (f"{H} a{A}", f"b{H} c{A} d", f"b{H} x{A} y")
    # only one leading space is stripped
    assert split_hh_dialogues(f"{H} a{A}  two", f"{H} a{A} one")[1:] == (" two", "one")
    with pytest.raises(ValueError, match="share no prefix"):
        split_hh_dialogues(f"{H} a{A} b", f"{H} z{A} b")  # differ before any "Assistant:"


def test_blank_lines_skipped_but_counted(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ["", j(prompt="p", response="r"), "  \t", j(x=1)])
    assert [n for n, _ in iter_jsonl(path)] == [2, 4]
    with pytest.raises(RecordError, match=r'x\.jsonl:4: missing key "prompt"'):
        read_sft(path)


def test_gzip_bom_and_crlf(tmp_path):
    lines = [j(prompt="p1", response="r1"), j(prompt="p2", response="r2")]
    gz = write_lines(tmp_path / "a.jsonl.gz", lines, compress=True)
    crlf = tmp_path / "b.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    expected = [SFTRecord("p1", "r1"), SFTRecord("p2", "r2")]
    assert read_sft(gz) == expected
    assert read_sft(str(crlf)) == expected


# ---------------------------------------------------------------------------------------------
# malformed files: every defect names file:line and what is wrong

GOOD_SFT = j(prompt="p", response="r")
GOOD_RATING = j(prompt="p", response="r", rating=2)
GOOD_CMP = j(prompt="p", chosen="a", rejected="b")

SFT_DEFECTS = [
    ('{"prompt": "p", "response": ', "invalid JSON"),
    ('["p", "r"]', "expected a JSON object, got array"),
    ("17", "expected a JSON object, got integer"),
    (j(prompt="p"), 'missing key "response"'),
    (j(prompt=3, response="r"), 'key "prompt" must be a string, not integer'),
    (j(prompt=None, response="r"), 'key "prompt" must be a string, not null'),
    (j(prompt="p", response=["r"]), 'key "response" must be a string, not array'),
    (j(prompt=" \n ", response="r"), 'key "prompt" is empty'),
    (j(prompt="p", response=""), 'key "response" is empty'),
    (b'{"prompt": "caf\xe9", "response": "r"}', "invalid UTF-8 at byte offset 15"),
]


@pytest.mark.parametrize("bad, message", SFT_DEFECTS)
def test_sft_defect_reported_with_line(tmp_path, bad, message):
    # two good lines and a blank one before the defect: it is on line 4
    path = write_lines(tmp_path / "sft.jsonl", [GOOD_SFT, "", GOOD_SFT, bad, GOOD_SFT])
    with pytest.raises(RecordError) as info:
        read_sft(path)
    assert f"{path}:4: " in str(info.value)
    assert message in str(info.value)


RATING_DEFECTS = [
    (j(prompt="p", response="r"), 'missing key "rating"'),
    (j(prompt="p", response="r", rating=0), "rating 0 out of range (must be 1..5)"),
    (j(prompt="p", response="r", rating=6), "rating 6 out of range (must be 1..5)"),
    (j(prompt="p", response="r", rating=True), 'key "rating" must be an integer, not boolean'),
    (j(prompt="p", response="r", rating="3"), 'key "rating" must be an integer, not string'),
    (j(prompt="p", response="r", rating=3.5), 'key "rating" must be an integer, not 3.5'),
    ('{"prompt": "p", "response": "r", "rating": NaN}', 'key "rating" must be an integer, not nan'),
]


@pytest.mark.parametrize("bad, message", RATING_DEFECTS)
def test_rating_defect_reported_with_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "r.jsonl", [GOOD_RATING, bad])
    with pytest.raises(RecordError) as info:
        read_ratings(path, num_bins=5)
    assert f"{path}:2: {message}" in str(info.value)


def test_rating_without_num_bins_only_needs_positive(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [j(prompt="p", response="r", rating=99)])
    assert read_ratings(path)[0].rating == 99
    write_lines(path, [GOOD_RATING, GOOD_RATING, j(prompt="p", response="r", rating=-1)])
    with pytest.raises(RecordError, match=r"r\.jsonl:3: rating -1 out of range \(must be >= 1\)"):
        read_ratings(path)


COMPARISON_DEFECTS = [
    (j(prompt="p", chosen="a"), 'missing key "rejected"'),
    (j(prompt="p", chosen="a", rejected="a"), "chosen and rejected responses are identical"),
    (j(prompt="", chosen="a", rejected="b"), 'key "prompt" is empty'),
    (j(prompt="p", responses=["a"], ranking=[0]), '"responses" must hold at least 2 items, got 1'),
    (
        j(prompt="p", responses=["a", "b"], ranking=[0]),
        '"ranking" has 1 items but "responses" has 2',
    ),
    (
        j(prompt="p", responses=["a", 5], ranking=[0, 1]),
        '"responses"[1] must be a string, not integer',
    ),
    (j(prompt="p", responses="ab", ranking=[0, 1]), 'key "responses" must be an array, not string'),
    (j(prompt="p", responses=["a", "b"]), 'missing key "ranking"'),
    (j(prompt="p", responses=["a", "b"], ranking=[0, -1]), "ranks >= 0"),
    (j(prompt="p", responses=["a", "b"], ranking=[0, 1.5]), '"ranking"[1] must be an integer'),
    (j(prompt="p", responses=["a", "b"], ranking=[1, 1]), "all responses are tied"),
    (j(prompt="p", responses=["a", "b"], ranking=[0, 1], chosen="a"), "use one form"),
    (j(responses=["a", "b"], ranking=[0, 1]), 'missing key "prompt"'),
    (j(chosen=f"{H} a{A} b", rejected=f"{H} z{A} b"), "HH-RLHF record without a prompt"),
    (j(chosen="no dialogue here", rejected="no dialogue there"), "share no prefix"),
]


@pytest.mark.parametrize("bad, message", COMPARISON_DEFECTS)
def test_comparison_defect_reported_with_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "c.jsonl.gz", [GOOD_CMP, GOOD_CMP, bad], compress=True)
    with pytest.raises(RecordError) as info:
        read_comparisons(path)
    assert f"{path}:3: " in str(info.value)
    assert message in str(info.value)


def test_empty_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(RecordError, match=r"empty\.jsonl: no SFT records found"):
        read_sft(empty)
    blank = write_lines(tmp_path / "blank.jsonl.gz", ["", "  "], compress=True)
    with pytest.raises(RecordError, match=r"blank\.jsonl\.gz: no comparison records found"):
        read_comparisons(blank)


def test_corrupt_gzip_is_a_record_error(tmp_path):
    lines = [GOOD_SFT] * 200
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match=r"cut\.jsonl\.gz:\d+: corrupt gzip data"):
        read_sft(path)


def test_skip_mode_warns_with_count_and_lines(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [GOOD_CMP, "{oops", GOOD_CMP, j(prompt="p")])
    with pytest.warns(RecordWarning, match=r"skipped 2 malformed comparison") as caught:
        records = read_comparisons(path, on_error="skip")
    assert len(records) == 2
    message = str(caught[0].message)
    assert f"{path}:2: invalid JSON" in message
    assert f'{path}:4: missing key "chosen"' in message
    # the warning points at this file (the caller), not at records.py or a beartype wrapper
    assert caught[0].filename == __file__, caught[0].filename
    bad_only = write_lines(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.warns(RecordWarning), pytest.raises(RecordError, match="1 malformed line"):
        read_sft(bad_only, on_error="skip")
    with pytest.raises(ValueError, match="on_error must be one of"):
        read_sft(path, on_error="ignore")


# ---------------------------------------------------------------------------------------------
# the real HH-RLHF file (in ../shared beside the repository; skipped where absent)


@pytest.fixture(scope="module")
def hh_real():
    if not HH_REAL.exists():
        pytest.skip(f"{HH_REAL} not present")
    return read_comparisons(HH_REAL), [obj for _, obj in iter_jsonl(HH_REAL)]


def test_real_hh_all_pairs_split_exactly(hh_real):
    records, raw = hh_real
    assert len(records) == len(raw) == 2312
    for record, obj in zip(records, raw):
        assert record.prompt.endswith(A) and record.prompt.startswith(H)
        # the split loses exactly one space per dialogue, and nothing else
        assert record.prompt + " " + record.responses[0] == obj["chosen"]
        assert record.prompt + " " + record.responses[1] == obj["rejected"]
        assert not any(H in r for r in record.responses)  # only the final turn differs
    # 4 real pairs prefer the empty answer; README: chosen is longer in 44.3% of pairs
    assert sum(r.responses[0] == "" for r in records) == 4
    longer = sum(len(r.responses[0]) > len(r.responses[1]) for r in records) / len(records)
    assert abs(longer - 0.443) < 5e-4


def test_real_hh_collates_with_truncated_prompts(hh_real):
    records = hh_real[0][:16]
    tok = ByteTok()
    batch = collate_comparisons(tok, records, max_len=2600)
    assert batch.tokens.shape[:2] == (16, 2) and batch.tokens.shape[2] <= 2600
    for i, record in enumerate(records):
        for k, response in enumerate(record.responses):
            ids = batch.tokens[i, k]
            response_ids = ids[batch.mask[i, k] & ~batch.prompt_mask[i, k]].tolist()
            prompt_ids = ids[batch.prompt_mask[i, k]].tolist()
            assert response_ids == list(response.encode()) + [0]
            assert record.prompt.encode().endswith(bytes(prompt_ids)) and prompt_ids


# ---------------------------------------------------------------------------------------------
# encoding and collation


def test_encode_prompt_response_no_truncation():
    ids, num_prompt = encode_prompt_response(ByteTok(eos_id=9), "ab", "cd", max_len=10)
    assert ids == [97, 98, 99, 100, 9] and num_prompt == 2
    ids, num_prompt = encode_prompt_response(ByteTok(), "ab", "cd", max_len=4, add_eos=False)
    assert ids == [97, 98, 99, 100] and num_prompt == 2


def test_encode_truncates_prompt_from_the_left_only():
    # response + eos = 3 tokens; max_len 5 leaves 2 for the prompt: its last two bytes "ef"
    ids, num_prompt = encode_prompt_response(ByteTok(), "abcdef", "xy", max_len=5)
    assert ids == [101, 102, 120, 121, 0] and num_prompt == 2
    # the tightest fit keeps one prompt token
    ids, num_prompt = encode_prompt_response(ByteTok(), "abcdef", "xy", max_len=4)
    assert ids == [102, 120, 121, 0] and num_prompt == 1


def test_encode_rejects_what_cannot_fit():
    with pytest.raises(
        ValueError, match=r"response takes 3 tokens with eos.*\(6 tokens\).*max_len=3"
    ):
        encode_prompt_response(ByteTok(), "abcdef", "xy", max_len=3)
    with pytest.raises(ValueError, match="prompt encodes to 0 tokens"):
        encode_prompt_response(ByteTok(), "", "xy", max_len=8)
    with pytest.raises(ValueError, match="response encodes to 0 tokens"):
        encode_prompt_response(ByteTok(), "p", "", max_len=8, add_eos=False)
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        encode_prompt_response(ByteTok(), "p", "r", max_len=1)


def test_pad_sequences_both_sides():
    tokens, mask = pad_sequences([[5, 6, 7], [8]], pad_id=1)
    assert tokens.tolist() == [[5, 6, 7], [8, 1, 1]] and tokens.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [True, False, False]] and mask.dtype == torch.bool
    tokens, mask = left_pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_sequences([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="no sequences"):
        pad_sequences([], pad_id=0)
    with pytest.raises(ValueError, match="side must be"):
        pad_sequences([[1]], pad_id=0, side="middle")


def test_collate_prompt_response_hand_checked():
    # pad = eos = 0: the mask, not the ids, tells the final eos from padding
    batch = collate_prompt_response(ByteTok(), [("ab", "c"), ("d", "e")], max_len=10)
    assert batch.tokens.tolist() == [[97, 98, 99, 0], [100, 101, 0, 0]]
    assert batch.mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert batch.prompt_mask.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_collate_truncation_masks_are_exact():
    pairs = [("0123456789", "ab"), ("xy", "abcdef"), ("q", "r")]
    batch = collate_prompt_response(ByteTok(eos_id=255), pairs, max_len=8)
    assert batch.tokens.shape == (3, 8)
    assert batch.mask.sum(-1).tolist() == [8, 8, 3]
    assert batch.prompt_mask.sum(-1).tolist() == [5, 1, 1]
    assert not (batch.prompt_mask & ~batch.mask).any()
    for (prompt, response), ids, mask, prompt_mask in zip(pairs, *batch):
        # the prompt is a left-cut suffix at the front; the response follows in full, then eos
        n_prompt = int(prompt_mask.sum())
        assert (
            prompt_mask[:n_prompt].all()
            and bytes(ids[:n_prompt].tolist()) == prompt.encode()[-n_prompt:]
        )
        assert ids[mask & ~prompt_mask].tolist() == list(response.encode()) + [255]
        assert (ids[~mask] == 0).all()
    with pytest.raises(ValueError, match=r"pair 1: the response takes 8 tokens"):
        collate_prompt_response(ByteTok(), [("p", "r"), ("p", "abcdefg")], max_len=8)


def test_collate_comparisons_hand_checked():
    records = [
        ComparisonRecord("p", ["ab", "c"], [0, 1]),
        ComparisonRecord("q", ["x", "yz", "w"], [1, 0, 1]),
    ]
    batch = collate_comparisons(ByteTok(pad_id=7, eos_id=3), records, max_len=10)
    p, q, a, b, c, x, y, z, w = (ord(ch) for ch in "pqabcxyzw")
    assert batch.tokens.tolist() == [
        [[p, a, b, 3], [p, c, 3, 7], [7, 7, 7, 7]],
        [[q, x, 3, 7], [q, y, z, 3], [q, w, 3, 7]],
    ]
    T, F = True, False
    assert batch.mask.tolist() == [
        [[T, T, T, T], [T, T, T, F], [F, F, F, F]],
        [[T, T, T, F], [T, T, T, T], [T, T, T, F]],
    ]
    assert batch.prompt_mask.tolist() == [
        [[T, F, F, F], [T, F, F, F], [F, F, F, F]],
        [[T, F, F, F], [T, F, F, F], [T, F, F, F]],
    ]
    assert batch.ranking.tolist() == [[0, 1, MISSING_RANK], [1, 0, 1]]
    assert batch.ranking.dtype == torch.long
    assert batch.response_mask.tolist() == [[T, T, F], [T, T, T]]


def test_collate_comparisons_errors_name_the_item():
    records = [
        ComparisonRecord("p", ["a", "b"], [0, 1]),
        ComparisonRecord("p", ["abcd", "b"], [0, 1]),
    ]
    with pytest.raises(ValueError, match="comparison record 1, response 0: the response takes 5"):
        collate_comparisons(ByteTok(), records, max_len=5)
    with pytest.raises(ValueError, match="comparison record 0: needs >= 2 responses"):
        collate_comparisons(ByteTok(), [ComparisonRecord("p", ["a", "b"], [0])], max_len=5)


def test_collate_ratings_hand_checked():
    records = [RatingRecord("hi", "yo", 5), RatingRecord("h", "!", 1)]
    batch = collate_ratings(ByteTok(), records, max_len=16)
    assert batch.tokens.tolist() == [[104, 105, 121, 111, 0], [104, 33, 0, 0, 0]]
    assert batch.mask.sum(-1).tolist() == [5, 3]
    assert batch.prompt_mask.sum(-1).tolist() == [2, 1]
    # the file's human 1..K rating r becomes the class index r - 1 (RewardModel's labels)
    assert batch.labels.tolist() == [4, 0] and batch.labels.dtype == torch.long


def test_tokenizer_without_pad_id_is_refused():
    class NoPad:
        eos_id = 0

        def encode(self, text):
            return list(text.encode())

    with pytest.raises(BeartypeCallHintParamViolation):
        collate_prompt_response(NoPad(), [("p", "r")], max_len=8)


def test_read_prompts_from_every_format(tmp_path):
    from palm_rlhf.data.records import read_prompts

    assert read_prompts(FIXTURES / "sft.jsonl") == [
        r.prompt for r in read_sft(FIXTURES / "sft.jsonl")
    ]
    assert (
        read_prompts(FIXTURES / "hh_rlhf.jsonl")[1]
        == f"{H} Hi there.{A} Hello! How can I help?{H} Recommend a book.{A}"
    )
    path = write_lines(tmp_path / "p.jsonl", [j(prompt="a"), j(text="b")])
    with pytest.raises(RecordError, match=r'p\.jsonl:2: missing key "prompt"'):
        read_prompts(path)


def test_json_error_column_is_the_real_one(tmp_path):
    # a line cut short: the error is at its end, not at "column 1" of a next line
    line = '{"prompt": "p", "response": "r"'
    path = write_lines(tmp_path / "cut.jsonl", [line])
    with pytest.raises(
        RecordError, match=f"cut.jsonl:1: invalid JSON: .* at column {len(line) + 1}$"
    ):
        read_sft(path)
    path = write_lines(tmp_path / "mid.jsonl", ['{"prompt": "p", "response": }'])
    with pytest.raises(RecordError, match="at column 29"):
        read_sft(path)


@pytest.mark.parametrize("text", ['[{"prompt": "p", "response": "r"}]', '[\n  {"prompt": "p"}\n]'])
def test_a_json_array_file_gets_a_jq_hint(tmp_path, text):
    path = tmp_path / "data.json"
    path.write_text(text + "\n")
    with pytest.raises(RecordError, match=r"data.json:1: .*this file is a JSON array .*jq -c"):
        read_sft(path)
    with pytest.raises(RecordError, match="JSON array"):
        list(iter_jsonl(path))


def test_skip_summary_counts_every_line_and_names_the_first_five(tmp_path):
    lines = [GOOD_SFT] + [j(prompt=f"p{i}") for i in range(7)]  # lines 2..8 lack "response"
    path = write_lines(tmp_path / "s.jsonl", lines)
    with pytest.warns(RecordWarning) as caught:
        assert len(read_sft(path, on_error="skip")) == 1
    shown = "; ".join(f'{path}:{n}: missing key "response"' for n in range(2, 7))
    assert str(caught[0].message) == (
        f"skipped 7 malformed SFT records in {path}: {shown}; and 2 more"
    )


@pytest.mark.parametrize(
    "record, read, hint",
    [
        (
            dict(prompt="p", response="r", rating=3),
            read_comparisons,
            'missing key "chosen"; this line looks like a ratings record: '
            "palm-rlhf reward --kind ratings reads it",
        ),
        (
            dict(prompt="p", chosen="a", rejected="b"),
            read_ratings,
            'missing key "response"; this line looks like a comparison record: '
            "palm-rlhf reward --kind comparisons, dpo and coh read it",
        ),
        (
            dict(prompt="p", response="r"),
            read_ratings,
            'missing key "rating"; this line looks like an SFT record: palm-rlhf sft reads it',
        ),
        (
            dict(prompt="p", responses=["a", "b"], ranking=[0, 1]),
            read_sft,
            'missing key "response"; this line looks like a comparison record',
        ),
    ],
)
def test_a_record_of_another_kind_says_which_kind_it_looks_like(tmp_path, record, read, hint):
    path = write_lines(tmp_path / "x.jsonl", [json.dumps(record)])
    with pytest.raises(RecordError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:1: {hint}")


def test_a_bad_record_of_the_right_kind_gets_no_kind_hint(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [j(prompt="p", response="r", rating=9)])
    with pytest.raises(RecordError) as error:
        read_ratings(path, num_bins=5)
    assert str(error.value) == f"{path}:1: rating 9 out of range (must be 1..5)"
