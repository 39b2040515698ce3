import dataclasses
import gzip
import re
import subprocess
import sys
from pathlib import Path

import pytest

from palm_rlhf.checkpoint import latest_checkpoint, load_state
from palm_rlhf.data.tokenizer import load_tokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.train.pretrain import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    dim=32,
    depth=1,
    heads=2,
    dim_head=16,
    seq_len=32,
    batch_size=4,
    val_batches=2,
    generate_every=0,
    log_every=1,
    warmup_steps=2,
)


@pytest.fixture
def corpus_dir(tmp_path):
    text = (REPO / "data" / "corpus.txt.gz").read_bytes()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "corpus.txt.gz").write_bytes(gzip.compress(gzip.decompress(text)[:60_000]))
    return data_dir


def test_resume_continues_with_the_same_losses(corpus_dir, tmp_path):
    full = PretrainConfig(
        data_dir=str(corpus_dir),
        out_dir=str(tmp_path / "a"),
        num_steps=6,
        save_every=3,
        keep_last=5,
        eval_every=3,
        **TINY,
    )
    uninterrupted = pretrain(full)
    losses = {r["step"]: r["loss"] for r in uninterrupted.history}
    assert losses[6] < losses[1]  # it learns

    resumed_config = PretrainConfig(
        **{
            **full.__dict__,
            "out_dir": str(tmp_path / "b"),
            "resume": str(tmp_path / "a" / "step-0000003"),
        }
    )
    resumed = pretrain(resumed_config)
    resumed_losses = {r["step"]: r["loss"] for r in resumed.history}
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-6)
    assert resumed.valid_loss == pytest.approx(uninterrupted.valid_loss, abs=1e-6)


def test_checkpoint_is_self_describing(corpus_dir, tmp_path):
    result = pretrain(
        PretrainConfig(
            data_dir=str(corpus_dir),
            out_dir=str(tmp_path / "run"),
            num_steps=2,
            save_every=2,
            eval_every=2,
            **TINY,
        )
    )
    folder = latest_checkpoint(tmp_path / "run")
    assert folder == result.checkpoint
    model = PaLM.from_pretrained(folder)
    assert model.config.dim == 32 and model.config.max_seq_len == 32
    assert load_tokenizer(folder).vocab_size == 256
    assert result.valid_bpc == pytest.approx(result.valid_loss / 0.6931471805599453)


def test_train_py_runs_end_to_end(corpus_dir, tmp_path):
    out = tmp_path / "ckpt"
    args = [
        "--data-dir",
        str(corpus_dir),
        "--out-dir",
        str(out),
        "--num-steps",
        "2",
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--dim-head",
        "16",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--val-batches",
        "1",
        "--generate-every",
        "2",
        "--generate-length",
        "8",
    ]
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "bpc" in run.stderr + run.stdout
    assert (out / "latest").read_text() == "step-0000002"
    resumed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, "--num-steps", "3", "--resume", "latest"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "resumed from" in resumed.stderr + resumed.stdout
        and (out / "latest").read_text() == "step-0000003"
    )


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="enwik8.gz"):
        pretrain(
            PretrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "o"), num_steps=1, **TINY)
        )


def test_resuming_a_finished_run_says_so_in_one_line_never_nan(corpus_dir, tmp_path, capsys):
    """`train.py --resume latest` on a run that had finished once printed `final valid loss
    nan, bpc nan; checkpoint None`: now one line says it finished, and the summary is the run's
    own last validation and checkpoint."""
    from palm_rlhf.cli import run_pretrain

    config = PretrainConfig(
        data_dir=str(corpus_dir), out_dir=str(tmp_path / "a"), num_steps=2, progress=False, **TINY
    )
    done = pretrain(config)
    capsys.readouterr()
    run_pretrain(PretrainConfig(**{**config.__dict__, "resume": "latest"}))
    out = capsys.readouterr().out
    finished = [line for line in out.splitlines() if "already finished" in line]
    assert len(finished) == 1 and str(tmp_path / "a") in finished[0], out
    assert not re.search(r"\bnan\b", out) and "checkpoint None" not in out
    assert f"final valid loss {done.valid_loss:.4f}, bpc {done.valid_bpc:.4f}" in out
    assert f"checkpoint {done.checkpoint}" in out
    # the optimiser it ran with: the builder's, decay 0.1 on matrices only, betas (0.9, 0.95)
    groups = load_state(done.checkpoint / "optimizer.pt")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [
        (0.1, (0.9, 0.95)),
        (0.0, (0.9, 0.95)),
    ]


def test_help_shows_every_default():
    """`train.py --help` names the default of every option that has one."""
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    options = run.stdout.split("options:")[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", options)]  # unwrapped
    for field in dataclasses.fields(PretrainConfig):
        if field.default is None:
            continue  # off unless given: its help says what leaving it out does
        flag = "--" + field.name.replace("_", "-")
        (entry,) = [e for e in entries if e.startswith((f"{flag} ", f"{flag},"))]
        assert entry.endswith(f"(default: {field.default})"), entry


def test_init_std_flag_reaches_the_model():
    """`--init-std 0.02` draws the projections from normal(0, 0.02) (Llama's init); without it
    the model keeps PyTorch's init, whose spread at width 32 is far wider."""
    from palm_rlhf.options import config_from_args, config_parser
    from palm_rlhf.train.pretrain import build_model

    parser = config_parser(PretrainConfig)
    stds = {}
    for flags in ([], ["--init-std", "0.02"]):
        config = config_from_args(
            parser, PretrainConfig, parser.parse_args(["--dim", "32", *flags])
        )
        model = build_model(config)
        assert model.config.init_std == config.init_std
        weight = model.layers[0].fused_attn_ff_proj.weight
        stds[bool(flags)] = float(weight.std())
    assert abs(stds[True] - 0.02) < 0.002
    assert stds[False] > 0.05
