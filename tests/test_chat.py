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
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.model.palm import PaLM

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
