"""Every `palm-rlhf` subcommand end to end on tiny fixture data, each stage loading the
previous stage's checkpoint by path: pretrain -> sft -> reward -> ppo, and dpo, coh, sample."""

import gzip
from pathlib import Path

import pytest

from palm_rlhf.cli import main
from palm_rlhf.data.tokenizer import SentencePieceTokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.train.loading import TokenizerMismatchError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    data.mkdir()
    text = gzip.decompress((REPO / "data" / "corpus.txt.gz").read_bytes())[:50_000]
    (data / "corpus.txt.gz").write_bytes(gzip.compress(text))
    tiny = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16"]
    assert (
        main(
            [
                "pretrain",
                "--data-dir",
                str(data),
                "--out-dir",
                str(root / "pre"),
                "--num-steps",
                "3",
                "--seq-len",
                "128",
                "--batch-size",
                "2",
                "--val-batches",
                "1",
                "--generate-every",
                "0",
                *tiny,
            ]
        )
        == 0
    )
    common = ["--max-steps", "2", "--batch-size", "2", "--max-len", "128"]
    assert (
        main(
            [
                "sft",
                "--base",
                str(root / "pre"),
                "--data",
                str(FIXTURES / "sft.jsonl"),
                "--out-dir",
                str(root / "sft"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "reward",
                "--base",
                str(root / "sft"),
                "--data",
                str(FIXTURES / "comparisons.jsonl"),
                "--out-dir",
                str(root / "rm"),
                "--num-train",
                "2",
                *common,
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def test_every_stage_writes_a_checkpoint_the_next_one_loads(pipeline, capsys):
    root = pipeline
    main(
        [
            "ppo",
            "--policy",
            str(root / "sft"),
            "--reward",
            str(root / "rm"),
            "--prompts",
            str(FIXTURES / "sft.jsonl"),
            "--out-dir",
            str(root / "ppo"),
            "--num-rollouts",
            "4",
            "--rollouts-per-update",
            "2",
            "--max-response-tokens",
            "4",
            "--rollout-batch-size",
            "2",
            "--minibatch-size",
            "2",
            "--no-progress",
        ]
    )
    assert "ppo: reward" in capsys.readouterr().out
    ppo_history = (root / "ppo" / "history.jsonl").read_text().splitlines()
    assert len(ppo_history) == 2 and '"reward"' in ppo_history[0]  # one record per update
    # a PPO out_dir holds trainer/ and final/: as a model it means its final/
    assert main(["sample", "--checkpoint", str(root / "ppo"), "--max-new-tokens", "3"]) == 0
    final = PaLM.from_pretrained(root / "ppo" / "final")
    assert final.finetune_scopes == ()  # the actor's adapters are folded into a standalone model
    for stage in ("dpo", "coh"):
        assert (
            main(
                [
                    stage,
                    "--base",
                    str(root / "ppo" / "final"),
                    "--data",
                    str(FIXTURES / "comparisons.jsonl"),
                    "--out-dir",
                    str(root / stage),
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "2",
                    "--max-len",
                    "128",
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(root / "coh"),
                "--prompt",
                "In the",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert "--- sample 1 ---" in capsys.readouterr().out


def test_a_mismatched_tokenizer_is_refused_between_stages(pipeline, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(f"word{i % 50} other{i % 7} and more{i % 13}" for i in range(3000)))
    SentencePieceTokenizer.train([corpus], tmp_path / "sp", vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match="tokenizer mismatch"):
        main(
            [
                "--debug",  # the exception itself; without --debug it is one line (below)
                "sft",
                "--base",
                str(pipeline / "pre"),
                "--data",
                str(FIXTURES / "sft.jsonl"),
                "--tokenizer",
                str(tmp_path / "sp"),
                "--out-dir",
                str(tmp_path / "o"),
                "--max-steps",
                "1",
                "--max-len",
                "128",
            ]
        )


def test_malformed_data_is_reported_with_file_and_line(pipeline, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    args = ["sft", "--base", str(pipeline / "pre"), "--data", str(bad)]
    args += ["--out-dir", str(tmp_path / "o"), "--max-steps", "1", "--max-len", "128"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f'palm-rlhf sft: {bad}:2: missing key "response"\n'  # one line, no traceback
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing key \"response\""):
        main(["--debug", *args])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        main([*args, "--debug"])  # after the stage name too


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "--base", "{rm}", "--data", "{sft}"], "is a reward-model checkpoint; pass the"),
        (["sample", "--checkpoint", "{rm}"], "is a reward-model checkpoint; pass the"),
        (["chat", "--checkpoint", "{rm}"], "is a reward-model checkpoint; pass the"),
        (["sft", "--base", "{root}/nowhere", "--data", "{sft}"], "no model at"),
        (["sft", "--base", "{root}/pre", "--data", "{root}/missing.jsonl"], "missing.jsonl"),
        (["plot", "{root}/nowhere"], "no history.jsonl"),
    ],
)
def test_user_errors_are_one_line(pipeline, tmp_path, capsys, argv, message):
    names = {"rm": pipeline / "rm", "sft": FIXTURES / "sft.jsonl", "root": pipeline}
    argv = [a.format(**names) for a in argv] + (
        ["--out-dir", str(tmp_path), "--max-len", "128"] if argv[0] == "sft" else []
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"palm-rlhf {argv[0]}: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_real_bug_still_raises(pipeline, monkeypatch):
    import palm_rlhf.chat

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(palm_rlhf.chat, "load_base", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["sample", "--checkpoint", str(pipeline / "pre")])


def test_history_jsonl_and_plot(pipeline, tmp_path, capsys):
    from palm_rlhf.train.history import read_history

    for stage, keys in (("pre", {"loss", "lr", "valid_bpc"}), ("sft", {"loss", "lr"})):
        records = read_history(pipeline / stage)
        assert records and keys <= set(records[-1]), (stage, records)
    assert {"loss", "valid_accuracy"} <= set(read_history(pipeline / "rm")[-1])
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert main(["plot", str(pipeline / "pre"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "valid_bpc" in capsys.readouterr().out


def test_sentencepiece_tokenizer_from_one_command_travels_with_the_checkpoints(tmp_path, capsys):
    from palm_rlhf.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    data = tmp_path / "data"
    data.mkdir()
    text = gzip.decompress((REPO / "data" / "corpus.txt.gz").read_bytes())[:40_000]
    (data / "corpus.txt.gz").write_bytes(gzip.compress(text))
    assert (
        main(
            [
                "tokenizer",
                "--text",
                str(data / "corpus.txt.gz"),
                "--out-dir",
                str(tmp_path / "tok"),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    main(
        [
            "pretrain",
            "--data-dir",
            str(data),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out-dir",
            str(tmp_path / "pre"),
            "--num-steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--val-batches",
            "1",
            "--generate-every",
            "2",
            "--generate-length",
            "4",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--dim-head",
            "16",
        ]
    )
    out = capsys.readouterr().out
    bpc = float(out.split("bpc ")[-1].split(";")[0])
    loss = float(out.split("final valid loss ")[-1].split(",")[0])
    # bits per character, not per token: a sentencepiece token covers several bytes
    assert bpc < loss / 0.6931 / 1.5
    folder = tmp_path / "pre" / (tmp_path / "pre" / "latest").read_text()
    stored, trained = load_tokenizer(folder), load_tokenizer(tmp_path / "tok")
    assert tokenizer_fingerprint(stored) == tokenizer_fingerprint(trained)
    assert PaLM.from_pretrained(folder).num_tokens == trained.vocab_size == 400
    # the next stage picks the tokenizer up from the checkpoint, no --tokenizer needed
    assert (
        main(
            [
                "sft",
                "--base",
                str(tmp_path / "pre"),
                "--data",
                str(FIXTURES / "sft.jsonl"),
                "--out-dir",
                str(tmp_path / "sft"),
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--max-len",
                "32",
            ]
        )
        == 0
    )
    assert tokenizer_fingerprint(
        load_tokenizer(tmp_path / "sft" / (tmp_path / "sft" / "latest").read_text())
    ) == tokenizer_fingerprint(trained)


def test_ppo_log_with_tensorboard(pipeline, tmp_path):
    pytest.importorskip("tensorboard")
    args = ["ppo", "--policy", str(pipeline / "sft"), "--reward", str(pipeline / "rm")]
    args += ["--prompts", str(FIXTURES / "sft.jsonl"), "--out-dir", str(tmp_path / "ppo")]
    args += ["--num-rollouts", "2", "--rollouts-per-update", "2", "--max-response-tokens", "4"]
    args += ["--rollout-batch-size", "2", "--minibatch-size", "2", "--no-progress"]
    assert main([*args, "--log-with", "tensorboard"]) == 0
    assert list((tmp_path / "ppo").rglob("events.out.tfevents.*"))
    assert (tmp_path / "ppo" / "history.jsonl").read_text().count("\n") == 1


def test_plot_draws_a_ppo_history_against_updates(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from palm_rlhf.train.history import numeric_series, read_history, write_history

    records = [{"update": u, "episodes": 4 * u, "reward": 0.1 * u, "kl": 0.01 * u} for u in (1, 2)]
    write_history(tmp_path / "history.jsonl", records)
    with open(tmp_path / "history.jsonl", "a") as torn:
        torn.write('{"update": 3, "rew')  # a run killed mid-line: that line is ignored
    assert read_history(tmp_path) == records
    assert numeric_series(records) == {"reward": ([1, 2], [0.1, 0.2]), "kl": ([1, 2], [0.01, 0.02])}
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").is_file() and "(reward, kl)" in capsys.readouterr().out
    assert main(["plot", str(tmp_path), "--metrics", "nope"]) == 2
    assert "no metric ['nope']" in capsys.readouterr().err


def test_a_ratings_file_without_kind_ratings_says_which_kind_it_looks_like(pipeline, capsys):
    ratings = REPO / "examples" / "data" / "ratings.jsonl"
    argv = ["reward", "--base", str(pipeline / "pre"), "--data", str(ratings)]
    assert main([*argv, "--out-dir", str(pipeline / "rm-kind"), "--max-len", "128"]) == 2
    assert capsys.readouterr().err == (
        f'palm-rlhf reward: {ratings}:1: missing key "chosen"; this line looks like a ratings '
        "record: palm-rlhf reward --kind ratings reads it\n"
    )


def test_on_error_skip_is_one_summary_line_not_a_python_warning(pipeline, tmp_path, capsys):
    good = (REPO / "examples" / "data" / "sft.jsonl").read_text().splitlines()[:4]
    bad = tmp_path / "some-bad.jsonl"
    bad.write_text("\n".join(good + ['{"prompt": "no response"}'] * 7 + ["{oops"]) + "\n")
    args = ["sft", "--base", str(pipeline / "pre"), "--data", str(bad), "--on-error", "skip"]
    args += ["--out-dir", str(tmp_path / "o"), "--max-steps", "1", "--max-len", "128"]
    assert main([*args, "--no-progress"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # no "warnings.warn(" source line, no file of records.py
    shown = "; ".join(f'{bad}:{n}: missing key "response"' for n in range(5, 10))
    assert lines[0] == (
        f"palm-rlhf sft: warning: skipped 8 malformed SFT records in {bad}: {shown}; and 3 more"
    )
