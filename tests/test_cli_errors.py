"""The first hour of a new user: readable --help, one-line errors (from `palm-rlhf` and from
train.py), tracebacks only with --debug, and --log-with failing clearly without its package."""

import argparse
import ast
import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from palm_rlhf.cli import TokenizerConfig, build_parser, main
from palm_rlhf.options import config_parser
from palm_rlhf.train.history import check_trackers

REPO = Path(__file__).resolve().parents[1]


def _help(stage: str) -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[stage]
    return " ".join(sub.format_help().split())  # one line: wrapping never splits a match


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "sample", "plot"])
def test_help_text_is_clean(stage):
    text = _help(stage)
    assert "('none' disables) ('none' for no value)" not in text
    assert "(default: None)" not in text
    assert "(default: )" not in text  # required options show no empty default
    assert "--log-with" in text or stage in ("sample", "plot")


def test_required_options_show_no_default():
    text = _help("sft")
    assert "--base BASE checkpoint folder (or .safetensors file) to start from --" in text


def test_train_py_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, str(REPO / "train.py"), "--data-dir", str(tmp_path), "--num-steps", "1"]
    argv += ["--out-dir", str(tmp_path / "o")]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    last = plain.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: ") and "enwik8.gz" in last
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_log_with_a_missing_package_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="--log-with wandb needs the wandb package: pip install"):
        check_trackers("wandb")
    with pytest.raises(ValueError, match="unknown tracker"):
        check_trackers("tensorbored")
    args = ["pretrain", "--data-dir", str(REPO / "data"), "--out-dir", str(tmp_path)]
    assert main([*args, "--log-with", "wandb", "--num-steps", "1"]) == 2
    assert capsys.readouterr().err.startswith("palm-rlhf pretrain: --log-with wandb needs")


def test_log_with_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    text = gzip.compress(gzip.decompress((REPO / "data" / "corpus.txt.gz").read_bytes())[:30_000])
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt.gz").write_bytes(text)
    tiny = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim-head", "8", "--seq-len", "32"]
    args = ["pretrain", "--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *tiny]
    args += ["--num-steps", "2", "--batch-size", "2", "--val-batches", "1", "--log-every", "1"]
    assert main([*args, "--generate-every", "0", "--log-with", "tensorboard", "--no-progress"]) == 0
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "history.jsonl").read_text().count("\n") == 2


def _parsers(parser):
    """The parser and every subparser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_takes_an_abbreviated_flag(capsys):
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10 and all(not p.allow_abbrev for p in parsers)
    assert not config_parser(TokenizerConfig).allow_abbrev  # train.py's and the benchmarks' kind
    # --epoch is not --epochs (before: silently taken as it)
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--base", "b", "--data", "d", "--epoch", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: palm-rlhf dpo ")
    assert err.strip().splitlines()[-1] == "palm-rlhf dpo: error: unrecognized arguments: --epoch 1"


def test_an_unknown_flag_shows_the_stage_usage_not_the_top_level_one(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--policy", "p", "--reward", "r", "--prompts", "q", "--num-episodes", "4"])
    err = capsys.readouterr().err
    assert err.startswith("usage: palm-rlhf ppo ") and "--rollouts-per-update" in err
    last = err.strip().splitlines()[-1]
    assert last == "palm-rlhf ppo: error: unrecognized arguments: --num-episodes 4"


def test_every_parser_in_the_repository_refuses_abbreviations():
    """Static: each ArgumentParser(...) / add_parser(...) call of the package, train.py, the
    benchmarks and the examples passes allow_abbrev=False."""
    files = [*(REPO / "palm_rlhf").rglob("*.py"), REPO / "train.py"]
    files += [*(REPO / "benchmarks").glob("*.py"), *(REPO / "examples").glob("*.py")]
    calls = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in (
                "ArgumentParser",
                "add_parser",
            ):
                keywords = {k.arg: k.value for k in node.keywords}
                ok = isinstance(keywords.get("allow_abbrev"), ast.Constant) and (
                    keywords["allow_abbrev"].value is False
                )
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert len(calls) >= 10
    assert [where for where, ok in calls if not ok] == []
