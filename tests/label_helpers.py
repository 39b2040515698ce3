"""Shared by the label tests: a fake generator (no model) and a session/app over it."""

import threading
import time
from pathlib import Path

from palm_rlhf.label.config import LabelConfig
from palm_rlhf.label.stage import build_session

PROMPTS = ["What is a psalm?", "Name a river.", "Say hello.", "Count to three."]
XSS = '<script>window.__x=1</script><img src=x onerror="window.__y=1">'


def fake_generate(prompt: str, count: int, seed: int) -> list:
    return [f"answer {i + 1} to {prompt!r} (seed {seed % 997})" for i in range(count)]


def fake_generate_b(prompt: str, count: int, seed: int) -> list:
    return [f"B says: {prompt[::-1]} #{i}" for i in range(count)]


def make_session(tmp_path: Path, prompts=PROMPTS, generate=fake_generate, **options):
    """A LabelSession writing tmp_path/labels.jsonl; options go to LabelConfig or the session."""
    session_keys = {"lease_seconds", "wait_seconds", "clock"}
    session_options = {k: options.pop(k) for k in list(options) if k in session_keys}
    session_options.setdefault("wait_seconds", 5.0)
    options.setdefault("out", str(tmp_path / "labels.jsonl"))
    if options.get("mode") == "arena":
        options.setdefault("checkpoint_b", "fake-b")
    config = LabelConfig(checkpoint="fake", prompts="fake.jsonl", **options)
    generate_b = fake_generate_b if config.mode == "arena" else None
    session = build_session(
        config, list(prompts), generate, generate_b, log=lambda *_: None, **session_options
    )
    return session, config


class ThreadServer:
    """A uvicorn server for `app` on a free loopback port, in a thread (for a real browser)."""

    def __init__(self, app):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
