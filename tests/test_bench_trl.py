"""The TRL comparison's FLOP accounting and the limit it reports, against hand-computed values
(the comparison itself needs TRL's venv and runs in `benchmarks/bench_trl.py`)."""

BENCH = "bench_trl"  # loaded by the `bench` fixture (conftest.py)


def test_step_flops_count_every_token_of_the_batch(bench):
    setting = bench.Setting()  # 16 prompts x 8 completions, 8 + 24 tokens: 4,096 tokens a step
    assert bench.step_flops(setting, 1_000) == {
        "sampling": 2 * 1_000 * 4_096,
        "update": 6 * 1_000 * 4_096,
    }
    # each prompt once: 16 x 8 prompt tokens + 128 x 24 completion tokens = 3,200
    assert bench.step_flops(setting, 1_000, prompt_once_per_group=True) == {
        "sampling": 2 * 1_000 * 3_200,
        "update": 6 * 1_000 * 3_200,
    }


def test_limit_lines_hand_values(bench):
    """N = 1e6: 8 * 1e6 * 4096 = 32.768 GFLOP a step; at 0.5 s that is 65.5 GFLOP/s, 66% of a
    100 GFLOP/s peak; the floor 0.32768 s allows 128 / 0.32768 = 390.6 completions/s."""
    side = {
        "parameters": 1_000_000,
        "seconds_per_step": 0.5,
        "completions_per_s": 256.0,
        "phase_seconds_per_step": {"update": 0.4},  # 24.576 GFLOP in 0.4 s: 61%
    }
    trl = side | {"completions_per_s": 130.2, "seconds_per_step": 1.0}
    lines = bench.limit_lines(bench.Setting(), {"peak_gflops": 100.0, "ours": side, "trl": trl})
    assert (
        lines[0] == "| model GFLOP/step (2N sampling + 6N update per token run) | 32.8 | 32.8 | |"
    )
    assert lines[1] == "| model GFLOP/s, whole step | 65.5 | 32.8 | |"
    assert lines[2] == "| MFU, whole step (fp32 matmul 100.0 GFLOP/s) | 66% | 33% | |"
    assert lines[3] == "| MFU, update phase | 61% | 61% | |"
    assert "at least 0.328 s: at most 391 completions/s, 3.00x TRL's rate" in lines[5]
    assert "would need 1.00x the machine's fp32 matmul peak" in lines[5]
    # ours running each prompt once: 8e6 * 3200 = 25.6 GFLOP, floor 0.256 s, 500 completions/s
    shared = side | {"prompt_once_per_group": True}
    lines = bench.limit_lines(bench.Setting(), {"peak_gflops": 100.0, "ours": shared, "trl": trl})
    assert lines[0].startswith(
        "| model GFLOP/step (2N sampling + 6N update per token run) | 25.6 | 32.8 |"
    )
    assert "at least 0.256 s: at most 500 completions/s, 3.84x TRL's rate" in lines[5]


def test_report_compares_mean_reward_per_completion_over_every_step(bench):
    """The issue's bar is TRL's reward per completion: the mean over all steps (each step
    scores 128 completions), not only the last step's."""
    setting = bench.Setting(steps=3)
    phases = dict.fromkeys(("sampling", "scoring", "update", "other"), 0.1)
    side = {
        "parameters": 10,
        "completions_per_s": 100.0,
        "seconds_per_step": 1.0,
        "phase_seconds_per_step": phases,
        "reward_gain": 0.5,
    }
    ours = side | {"reward_per_step": [0.1, 0.3, 0.8]}  # mean 0.4
    trl = side | {"reward_per_step": [0.2, 0.5, 0.9]}  # mean 0.5333: ours is 0.750x
    lines = bench.report(setting, {"ours": ours, "trl": trl}).splitlines()
    assert "| mean reward per completion, all 3 steps | 0.400 | 0.533 | 0.750x |" in lines
