"""benchmarks/gpu_check.py can pass and can fail: a failing or cut-off test fails it, the plan
covers the whole suite, and its speed stages run (at minimum size, on the CPU) and write JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def check(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def selection(tmp_path):
    (tmp_path / "ok_test.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    (tmp_path / "bad_test.py").write_text("def test_bad():\n    assert 1 + 1 == 3\n")
    (tmp_path / "slow_test.py").write_text("import time\ndef test_slow():\n    time.sleep(60)\n")
    return {name: str(tmp_path / f"{name}_test.py") for name in ("ok", "bad", "slow")}


def test_a_failing_test_fails_the_check_and_a_passing_one_passes_it(selection, tmp_path):
    # through the shell wrapper, as on the device: its exit status is the check's, and with
    # $OUT set every pytest log lands there
    failed = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--no-bench",
         "--out-dir", str(tmp_path / "a"), "--tests", selection["ok"], selection["bad"]],
        env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"gpu_check: FAILED: tests ({selection['bad']})" in failed.stdout
    assert "assert (1 + 1) == 3" in failed.stdout  # the failure itself is shown
    assert "tests: 1 passed, 1 failed" in failed.stdout
    report = json.loads((tmp_path / "a" / "gpu-tests.json").read_text())
    assert report["ok"] is False and report["failed"] == [selection["bad"]]
    assert [r["verdict"] for r in report["runs"]] == ["passed", "FAILED (pytest exit 1)"]
    assert len(list((tmp_path / "out" / "logs").glob("*.log"))) == 2

    passed = check("--no-bench", "--out-dir", str(tmp_path / "b"), "--tests", selection["ok"])
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.strip().endswith("gpu_check: passed")


def test_a_run_cut_off_by_the_budget_fails_the_check(selection, tmp_path):
    result = check("--no-bench", "--test-budget", "8", "--out-dir", str(tmp_path),
                   "--tests", selection["slow"], timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TIMED OUT" in result.stdout and "gpu_check: FAILED" in result.stdout


def test_without_cuda_the_real_check_refuses_in_one_line():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--no-tests", "--no-bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here; --cpu-dry-run checks the script on the CPU"
    ]


def test_the_plan_runs_every_test_file_once_gpu_files_first_gloo_files_on_the_cpu():
    runs = gpu_check.plan_test_runs(None)
    names = [r["name"] for r in runs]
    files = sorted(p.name for p in (REPO / "tests").glob("test_*.py"))
    assert sorted(names) == files and len(set(names)) == len(names)
    assert names[: len(gpu_check.CUDA_FIRST)] == list(gpu_check.CUDA_FIRST)
    assert {r["name"] for r in runs if not r["gpu"]} == set(gpu_check.GLOO)


def test_the_speed_stages_run_and_write_their_figures(tmp_path):
    result = check("--no-tests", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    train = json.loads((tmp_path / "gpu-train.json").read_text())
    decode = json.loads((tmp_path / "gpu-decode.json").read_text())
    ppo = json.loads((tmp_path / "gpu-ppo.json").read_text())
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1
    assert [row["batch"] for row in decode["rows"]] == [1, 8]
    assert all(row["fraction_of_roofline"] > 0 for row in decode["rows"])
    assert ppo["impl"] == "ours" and ppo["dtype"] == "bf16" and ppo["episodes_per_s"] > 0
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["bench"]["train"] == train and summary["tests"] == {}
    assert "| train bf16 MFU " in result.stdout and "| PPO episodes/s (bf16) " in result.stdout


def test_outcomes_are_totalled_from_pytest_s_closing_lines():
    lines = [
        "3 passed, 1 skipped in 2.1s",
        "1 failed, 2 passed, 1 error in 3s",
        "",
        "2 xfailed in 1s",
    ]
    assert gpu_check.count_outcomes(lines) == {
        "passed": 5, "failed": 1, "skipped": 1, "errors": 1, "xfailed": 2
    }  # fmt: skip
