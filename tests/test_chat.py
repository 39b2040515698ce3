import dataclasses
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from palm_rlhf import chat as chat_module
from palm_rlhf.chat import (
    ChatConfig,
    ChatSession,
    SampleConfig,
    chat_loop,
    run_sample,
    visible_text,
)
from palm_rlhf.cli import main
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.label.backend import model_generator
from palm_rlhf.label.config import LabelConfig
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling_options import GenerationOptions, SamplingOptions
from palm_rlhf.rl.ppo.config import PPOConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=128)
    model.save(tmp_path / "model" / "model.safetensors")
    ByteTokenizer().save(tmp_path / "model")
    return tmp_path / "model"


def scripted(text: str):
    """Replace sampling by a fixed answer, one byte per step."""

    def fake_iter_sample(model, prompt, max_new_tokens, **kwargs):
        for byte in text.encode()[:max_new_tokens]:
            yield torch.tensor([byte])

    return fake_iter_sample


def session(checkpoint, **overrides):
    model = PaLM.from_pretrained(checkpoint)
    overrides.setdefault("max_new_tokens", 32)
    return ChatSession(model, ByteTokenizer(), ChatConfig(checkpoint=str(checkpoint), **overrides))


def test_visible_text_holds_back_a_possible_stop_and_partial_characters():
    assert visible_text("Hello\n\nHu", "\n\nHuman:") == ("Hello", False)
    assert visible_text("Hello\n\nHuman: hi", "\n\nHuman:") == ("Hello", True)
    assert visible_text("caf\ufffd", "\n\nHuman:") == ("caf", False)
    assert visible_text("plain", "\n\nHuman:") == ("plain", False)


def test_answer_streams_and_stops_where_the_model_starts_a_human_turn(checkpoint, monkeypatch):
    monkeypatch.setattr(chat_module, "iter_sample", scripted(" Fine, thanks.\n\nHuman: and you?"))
    chat = session(checkpoint)
    pieces = list(chat.respond("how are you?"))
    assert len(pieces) > 3  # streamed, not printed at once
    assert "".join(pieces) == " Fine, thanks."
    assert ByteTokenizer().decode(chat.turns[-1]) == " Fine, thanks."
    assert ByteTokenizer().decode(chat.turns[-2]) == "\n\nHuman: how are you?\n\nAssistant:"


def test_multibyte_characters_are_never_split(checkpoint, monkeypatch):
    monkeypatch.setattr(chat_module, "iter_sample", scripted(" café ☕"))
    pieces = list(session(checkpoint).respond("coffee?"))
    assert "".join(pieces) == " café ☕" and all("\ufffd" not in p for p in pieces)


def test_history_stays_within_the_context_window(checkpoint, monkeypatch):
    monkeypatch.setattr(chat_module, "iter_sample", scripted(" ok"))
    chat = session(checkpoint, max_new_tokens=80)  # window 128: 48 tokens of prompt at most
    for turn in range(6):
        list(chat.respond(f"message number {turn}"))
        prompt = chat._fit(chat._human_turn("next"))
        assert len(prompt) <= 128 - 80
    assert (
        ByteTokenizer().decode(chat.turns[-1]) == " ok" and len(chat.turns) < 12
    )  # old turns dropped


def test_loop_answers_and_exits_on_end_of_input(checkpoint, monkeypatch):
    monkeypatch.setattr(chat_module, "iter_sample", scripted(" hi there"))
    lines = iter(["hello", "/reset", ""])
    out = []

    class Out:
        write = out.append

        def flush(self):
            pass

    def read(prompt):
        out.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat_loop(session(checkpoint), read, Out())
    text = "".join(out)
    assert (
        "bot> hi there\n" in text
        and "(conversation forgotten)" in text
        and text.endswith("you> \n")
    )


def test_chat_command_in_a_pseudo_terminal(checkpoint):
    pid, fd = pty.fork()
    if pid == 0:  # child: the real command on a real terminal
        os.chdir(REPO)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "palm_rlhf",
                "chat",
                "--checkpoint",
                str(checkpoint),
                "--max-new-tokens",
                "12",
            ],
        )

    def read_until(marker: bytes, timeout: float = 60.0) -> bytes:
        data, deadline = b"", time.monotonic() + timeout
        while marker not in data and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    data += os.read(fd, 1024)
                except OSError:
                    break
        return data

    try:
        assert b"you> " in read_until(b"you> ")
        os.write(fd, b"hello\n")
        answer = read_until(b"you> ")
        assert b"bot>" in answer and answer.rstrip().endswith(b"you>")
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_sample_command_prints_continuations(checkpoint, capsys):
    texts = run_sample(
        SampleConfig(
            checkpoint=str(checkpoint),
            prompt="In the beginning",
            num_samples=2,
            max_new_tokens=8,
            stop_at_eos=False,
        )
    )
    out = capsys.readouterr().out
    assert len(texts) == 2 and out.count("--- sample") == 2 and "In the beginning" in out
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "palm_rlhf",
            "sample",
            "--checkpoint",
            str(checkpoint),
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0 and "--- sample 1 ---" in run.stdout


# ---------------------------------------------------------------------------------------------
# the sampling options, declared once (model/sampling_options.py)

# each command's defaults before the options were shared: (max_new_tokens, temperature, top_k,
# top_p); PPO rollouts have no max_new_tokens (the stage's --max-response-tokens)
DEFAULTS = {
    SampleConfig: (200, 0.8, 40, None),
    ChatConfig: (128, 0.7, 40, None),
    LabelConfig: (128, 0.8, 40, None),
    PPOConfig: (None, 1.0, None, None),
}


def test_every_command_shares_the_sampling_fields_and_keeps_its_defaults():
    shared = {f.name: f.metadata["help"] for f in dataclasses.fields(GenerationOptions)}
    assert set(shared) == {"max_new_tokens", "temperature", "top_k", "top_p"}
    for cls, (max_new, temperature, top_k, top_p) in DEFAULTS.items():
        base = GenerationOptions if max_new is not None else SamplingOptions
        assert issubclass(cls, base), cls
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in {f.name for f in dataclasses.fields(base)}:
            assert fields[name].metadata["help"] == shared[name], (cls, name)
        config = cls(**{"checkpoint": "c", "prompts": "p"}) if cls is LabelConfig else None
        config = config or (cls(checkpoint="c") if cls is not PPOConfig else cls())
        assert (config.temperature, config.top_k, config.top_p) == (temperature, top_k, top_p)
        assert getattr(config, "max_new_tokens", None) == max_new


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
        (["chat", "--top-k", "0"], "top_k must be >= 1 (or None), got 0"),
        (["sample", "--top-p", "1.5"], "top_p must be in (0, 1] (or None), got 1.5"),
        (["sample", "--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    ],
)
def test_bad_sampling_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--checkpoint", "c"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_sample_and_chat_refuse_a_response_longer_than_the_context_in_one_line(checkpoint, capsys):
    # the checkpoint's context is 128 tokens; before, sample sliced the prompt with a negative
    # index and failed 25 lines later on a float tensor
    for command in ("sample", "chat"):
        argv = [command, "--checkpoint", str(checkpoint), "--max-new-tokens", "300"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (
            f"palm-rlhf {command}: max_new_tokens=300 leaves no room for a prompt in the "
            "model's 128-token context: use at most 127\n"
        )
    assert main(["sample", "--checkpoint", str(checkpoint), "--max-new-tokens", "127"]) == 0


def test_label_refuses_a_response_longer_than_the_context_before_serving(checkpoint):
    config = LabelConfig(checkpoint=str(checkpoint), prompts="p", max_new_tokens=128)
    with pytest.raises(ValueError, match="use at most 127"):
        model_generator(str(checkpoint), config)
    generate = model_generator(str(checkpoint), dataclasses.replace(config, max_new_tokens=4))
    assert len(generate("x" * 500, 2, seed=0)) == 2  # an overlong prompt keeps its end


def test_an_overlong_prompt_keeps_its_most_recent_tokens():
    options = GenerationOptions(max_new_tokens=3)
    assert options.fit_prompt(list(range(10)), context=8) == [5, 6, 7, 8, 9]
    assert options.fit_prompt([1, 2], context=8) == [1, 2]
    with pytest.raises(ValueError, match="use at most 2"):
        GenerationOptions(max_new_tokens=3).fit_prompt([1], context=3)
    # a model saved without max_seq_len: the default 1024-token window
    assert GenerationOptions(max_new_tokens=1000).prompt_budget(None) == 24


def test_the_sampling_options_reach_the_sampler(checkpoint, monkeypatch):
    seen = {}

    def recording_iter_sample(model, prompt, max_new_tokens, **kwargs):
        seen.update(kwargs, max_new_tokens=max_new_tokens)
        yield torch.tensor([65])

    monkeypatch.setattr(chat_module, "iter_sample", recording_iter_sample)
    argv = ["--checkpoint", str(checkpoint), "--temperature", "0.5", "--top-k", "7"]
    assert main(["sample", *argv, "--top-p", "0.9", "--max-new-tokens", "9"]) == 0
    assert (seen["temperature"], seen["top_k"], seen["top_p"]) == (0.5, 7, 0.9)
    assert seen["max_new_tokens"] == 9
