"""`palm-rlhf label` as a user runs it: a real server process over a tiny checkpoint, killed
with SIGKILL while tabs are labelling, restarted on the same file, and the file then trained on
by `palm-rlhf reward` as it is."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the label tests need httpx")
pytest.importorskip("uvicorn", reason="the label extra (starlette, uvicorn) is not installed")

from palm_rlhf.cli import main  # noqa: E402
from tests.finetune_helpers import make_base, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def start_server(args: list) -> tuple:
    """Start `python -m palm_rlhf label ARGS --port 0`; (process, base URL, first output line)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "palm_rlhf", "label", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline, seen = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"open (http://\S+)", line)
        if match:
            return process, match.group(1).rstrip("/"), seen[0]
    process.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen))


def label_until_killed(url: str, stop: threading.Event, ids: list, name: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                item = client.post("/api/next", json={"client": name}).json()["item"]
                if item is None:
                    continue
                body = {"client": name, "id": item["id"], "ranking": [1, 0]}
                if client.post("/api/submit", json=body).status_code == 200:
                    ids.append(item["id"])
            except (httpx.HTTPError, ValueError):
                return  # the server is gone


def test_kill_9_mid_labelling_loses_nothing_and_a_restart_continues(tmp_path):
    checkpoint = make_base(tmp_path / "ckpt")
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}:"} for i in range(40)]
    )
    out = tmp_path / "labels.jsonl"
    args = [
        "--checkpoint",
        str(checkpoint),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--responses",
        "2",
        "--max-new-tokens",
        "8",
        "--ahead",
        "4",
    ]
    process, url, first_line = start_server(args)
    stop, acknowledged = threading.Event(), []
    tabs = [
        threading.Thread(target=label_until_killed, args=(url, stop, acknowledged, f"tab{i}"))
        for i in range(3)
    ]
    try:
        for tab in tabs:
            tab.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # while the tabs are still posting
        process.wait(timeout=10)
    finally:
        stop.set()
        process.kill()
        for tab in tabs:
            tab.join(timeout=15)
    assert "labelling 40 of 40 items" in first_line
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    written = [r["id"] for r in records]
    assert len(acknowledged) >= 6 and set(acknowledged) <= set(written)  # every confirmed label
    assert len(set(written)) == len(written)

    process, url, first_line = start_server(args)
    try:
        assert f"labelling {40 - len(written)} of 40 items" in first_line
        with httpx.Client(base_url=url, timeout=10) as client:
            item = client.post("/api/next", json={"client": "again"}).json()["item"]
        assert item["id"] not in written  # labelled items are not shown again
    finally:
        process.kill()
        process.wait(timeout=10)

    # the label file is training data as it is
    assert (
        main(
            [
                "reward",
                "--base",
                str(checkpoint),
                "--data",
                str(out),
                "--out-dir",
                str(tmp_path / "rm"),
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--max-len",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "rm").exists()


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    with pytest.raises(SystemExit, match=r"^palm-rlhf label: no model at .*missing"):
        main(
            [
                "label",
                "--checkpoint",
                str(tmp_path / "missing"),
                "--prompts",
                str(prompts),
                "--port",
                "0",
            ]
        )
    with pytest.raises(SystemExit, match=r"palm-rlhf label: .*nothing\.jsonl"):
        main(
            [
                "label",
                "--checkpoint",
                str(tmp_path),
                "--prompts",
                str(tmp_path / "nothing.jsonl"),
                "--port",
                "0",
            ]
        )
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one line, exit status 2
        main(["label", "--checkpoint", "x", "--prompts", str(prompts), "--mode", "arena"])
    assert exit_info.value.code == 2
