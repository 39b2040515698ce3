import pytest
import torch

from palm_rlhf.cli import main as cli_main
from palm_rlhf.data.records import ComparisonRecord, RecordError, read_comparisons
from palm_rlhf.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.train.coh import (
    CoHConfig,
    coh_generate,
    hindsight_sequences,
    pretraining_chunks,
    train_coh,
)
from palm_rlhf.train.loading import TokenizerMismatchError
from tests.finetune_helpers import FIXTURES, make_base, toy_comparisons, write_jsonl

QUICK = dict(max_len=64, batch_size=8, warmup_steps=1, log_every=1, lr=3e-3)
PAIR = ComparisonRecord("Q", ["ab", "c"], [0, 1])
TOKENS = ByteTokenizer()


def ids(text: str) -> list[int]:
    return list(text.encode())


@pytest.fixture
def base(tmp_path):
    return make_base(tmp_path / "base")


def short(mode: str, **kwargs):
    return hindsight_sequences(
        PAIR, TOKENS, mode, positive_phrase="G:", negative_phrase="B:", separator="|", **kwargs
    )


# ------------------------------------------------------------------------- hindsight sequences


def test_pn_sequence_masks_exactly_the_answers_and_their_eos():
    (example,) = short("pn")
    # Q | G : _ a b EOS | B : _ c EOS
    assert example.ids == ids("Q|G: ab") + [0] + ids("|B: c") + [0]
    expected = [False] * 5 + [True] * 3 + [False] * 4 + [True] * 2
    assert example.loss_mask == expected
    masked = [t for t, m in zip(example.ids, example.loss_mask) if m]
    assert masked == ids("ab") + [0] + ids("c") + [0]


def test_np_p_n_and_both_orders():
    (np_,) = short("np")
    assert np_.ids == ids("Q|B: c") + [0] + ids("|G: ab") + [0]
    assert [i for i, m in enumerate(np_.loss_mask) if m] == [5, 6, 11, 12, 13]
    (p,) = short("p")
    assert p.ids == ids("Q|G: ab") + [0] and [i for i, m in enumerate(p.loss_mask) if m] == [
        5,
        6,
        7,
    ]
    (n,) = short("n")
    assert n.ids == ids("Q|B: c") + [0] and [i for i, m in enumerate(n.loss_mask) if m] == [5, 6]
    assert short("both") == short("pn") + short("np")


def test_default_phrases_read_as_the_paper_template():
    (example,) = hindsight_sequences(PAIR, mode="pn")
    assert TOKENS.decode(example.ids) == "Q\nA good answer: ab\x00\nA bad answer: c\x00"


def test_ranked_list_uses_its_best_and_worst_response():
    record = read_comparisons(FIXTURES / "comparisons.jsonl")[2]  # ranks [0, 2, 3, 1]
    (example,) = hindsight_sequences(record, mode="pn")
    answers = bytes(t for t, m in zip(example.ids, example.loss_mask) if m)
    assert answers == b"1 2 3\x00" + b"3 2 1\x00"


def test_max_len_cuts_the_prompt_from_the_left_or_refuses():
    record = ComparisonRecord("prompt", ["ab", "c"], [0, 1])
    (example,) = hindsight_sequences(
        record, mode="p", positive_phrase="G:", separator="|", max_len=9
    )
    assert example.ids == ids("pt|G: ab") + [0] and sum(example.loss_mask) == 3
    with pytest.raises(ValueError, match="leaving no room for the prompt"):
        hindsight_sequences(record, mode="pn", max_len=10)
    with pytest.raises(ValueError, match="mode must be one of"):
        hindsight_sequences(record, mode="x")


def test_pretraining_chunks_are_seeded_windows_trained_everywhere(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(97 + i % 26) for i in range(500)))
    chunks = pretraining_chunks(text, TOKENS, num_chunks=3, length=10, seed=1)
    assert chunks == pretraining_chunks(text, TOKENS, num_chunks=3, length=10, seed=1)
    for chunk in chunks:
        assert len(chunk.ids) == 10 and chunk.kind == 1
        assert chunk.loss_mask == [False] + [True] * 9
        assert bytes(chunk.ids).decode() in text.read_text()  # a contiguous window
    assert len({tuple(c.ids) for c in chunks}) > 1  # at different offsets


# ------------------------------------------------------------------------- training


def test_train_coh_learns_the_feedback_and_generation_follows_the_phrase(base, tmp_path):
    data = toy_comparisons(tmp_path / "toy.jsonl")
    result = train_coh(
        CoHConfig(
            base=str(base),
            data=str(data),
            valid_fraction=0.25,
            out_dir=str(tmp_path / "out"),
            epochs=20,
            eval_every=1000,
            **QUICK,
        )
    )
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.1 * losses[0] and result.valid["loss"] < 0.1 * losses[0]
    assert (result.checkpoint / "model.safetensors").is_file()
    model = PaLM.from_pretrained(result.checkpoint)
    prompts = ["4+4=", "0+9="]
    assert (
        coh_generate(model, result.tokenizer, prompts, max_new_tokens=6, temperature=0.0)
        == ["yes"] * 2
    )
    negative = coh_generate(
        model, result.tokenizer, "4+4=", 6, positive_phrase="A bad answer:", temperature=0.0
    )
    assert negative == "no"


def test_hh_rlhf_dialogues_train_end_to_end_with_lora(tmp_path):
    base = make_base(tmp_path / "base", max_seq_len=128)
    config = CoHConfig(
        base=str(base),
        data=str(FIXTURES / "hh_rlhf.jsonl"),
        use_lora=True,
        mode="p",
        out_dir=str(tmp_path / "out"),
        **{**QUICK, "max_len": 128},
    )
    result = train_coh(config)
    assert result.checkpoint.name == "step-0000001" and result.model.finetune_scopes == ()
    assert PaLM.from_pretrained(result.checkpoint).finetune_scopes == ()


def test_pretraining_mix_reports_both_losses(base, tmp_path):
    data = toy_comparisons(tmp_path / "toy.jsonl", count=8)
    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning was the word. " * 40)
    config = CoHConfig(
        base=str(base),
        data=str(data),
        ptx_file=str(text),
        ptx_ratio=0.5,
        mode="p",
        out_dir=str(tmp_path / "out"),
        **QUICK,
    )
    result = train_coh(config)
    assert len(result.history) == 2  # 8 hindsight + 8 pretraining sequences, batch 8
    for record in result.history:
        assert record["answer_loss"] > 0 and record["ptx_loss"] > 0
    with pytest.raises(ValueError, match="ptx_file"):
        CoHConfig(ptx_ratio=0.5)


def test_a_typed_backslash_n_separator_is_a_newline():
    assert CoHConfig(separator="\\n").separator == "\n" and CoHConfig().separator == "\n"


def test_a_tokenizer_mismatch_with_the_base_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    sp = SentencePieceTokenizer.train([corpus], tmp_path / "sp", vocab_size=300)
    base = make_base(tmp_path / "base", tokenizer=sp, num_tokens=300)
    config = CoHConfig(
        base=str(base),
        data=str(FIXTURES / "comparisons.jsonl"),
        tokenizer=str(_byte_dir(tmp_path)),
        out_dir=str(tmp_path / "out"),
        **QUICK,
    )
    with pytest.raises(TokenizerMismatchError, match="SentencePiece.*ByteTokenizer"):
        train_coh(config)


def _byte_dir(tmp_path):
    ByteTokenizer().save(tmp_path / "bytes")
    return tmp_path / "bytes"


def test_malformed_line_is_reported_with_file_and_line(base, tmp_path):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": "b", "rejected": "b"},
        ],
    )
    config = CoHConfig(base=str(base), data=str(bad), out_dir=str(tmp_path / "out"), **QUICK)
    with pytest.raises(RecordError, match=f"{bad}:2: chosen and rejected responses are identical"):
        train_coh(config)


def test_command_line_runs_and_prints_a_summary(base, tmp_path, capsys):
    args = [
        "--base",
        str(base),
        "--data",
        str(FIXTURES / "comparisons.jsonl"),
        "--out-dir",
        str(tmp_path / "out"),
        "--max-len",
        "64",
        "--batch-size",
        "2",
        "--mode",
        "np",
    ]
    assert cli_main(["coh", *args]) == 0
    assert "coh: train loss" in capsys.readouterr().out


def test_generation_keeps_prompts_within_the_context_window(base):
    model = PaLM.from_pretrained(base)
    torch.manual_seed(0)
    answers = coh_generate(model, TOKENS, ["x" * 200, "hi"], max_new_tokens=8, top_k=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="no room"):
        coh_generate(model, TOKENS, "hi", max_new_tokens=60)


def test_resume_with_a_pretraining_mix_gives_the_same_next_losses(base, tmp_path):
    """CoH draws pretraining windows as well as examples: both must continue exactly."""
    data = toy_comparisons(tmp_path / "toy.jsonl", count=8)
    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning was the word. " * 40)
    common = dict(
        base=str(base),
        data=str(data),
        ptx_file=str(text),
        ptx_ratio=0.5,
        mode="pn",
        epochs=4,
        max_steps=6,
        save_every=3,
        keep_last=5,
        **QUICK,
    )
    full = train_coh(CoHConfig(out_dir=str(tmp_path / "a"), **common))
    resumed = train_coh(
        CoHConfig(
            out_dir=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step-0000003"), **common
        )
    )
    before = {r["step"]: r["loss"] for r in full.history}
    after = {r["step"]: r["loss"] for r in resumed.history}
    assert len(before) == 6
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(before[step], abs=1e-6)
