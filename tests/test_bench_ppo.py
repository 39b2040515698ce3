"""The PPO benchmark's FLOP model, MFU rows and limit lines, against hand-computed values (the
comparison itself needs the reference's venv and runs in `benchmarks/bench_ppo.py`)."""

BENCH = "bench_ppo"  # loaded by the `bench` fixture (conftest.py)

# T = 8 + 8 = 16 tokens; attention L H Q T = 2 * 4 * 16 * 16 = 2,048
CONFIG = dict(prompt_len=8, response_len=8, depth=2, heads=4, dim_head=16)
OURS = dict(sampling=1, scoring=4, update_forward=2, update_backward=2)
REFERENCE = OURS | {"scoring": 3}


def test_episode_flops_hand_value(bench):
    """N = 1,000: a forward costs 2,000 + 4 * 2,048 = 10,192 a token, a LoRA backward
    2,000 + 8 * 2,048 = 18,384; 7 forwards and 2 backwards over 16 tokens:
    16 * (7 * 10,192 + 2 * 18,384) = 1,729,792."""
    assert bench.episode_flops(CONFIG, 1_000, OURS) == 1_729_792


def run(episodes_per_s, passes):
    return dict(episodes_per_s=episodes_per_s, config=CONFIG, parameters=1_000_000, passes=passes)


# N = 1e6: forward 2,008,192 and backward 2,016,384 a token; ours (7 forwards)
# 16 * (7 * 2,008,192 + 2 * 2,016,384) = 289,441,792 FLOPs an episode, the reference
# (6 forwards) 16 * (6 * 2,008,192 + 2 * 2,016,384) = 257,310,720
RAW = {
    "throughput-float32": {
        "ours": [run(69.1, OURS)],  # 69.1 * 0.289441792 = 20.0 GFLOP/s
        "reference": [run(10.0, REFERENCE), {"error": "timed out"}],  # 2.573 GFLOP/s
    }
}


def test_mfu_rows_divide_each_sides_model_flops_by_the_peak(bench):
    rows = {r["metric"]: r for r in bench.build_rows(RAW, {"float32": 100.0, "bf16": None})}
    per_episode = rows["model GFLOP per episode (episode_flops)"]
    assert round(per_episode["ours"], 6) == 0.289442
    assert round(per_episode["reference"], 6) == 0.257311
    mfu = rows["rollout+update MFU, float32 (higher is better)"]
    assert round(mfu["ours"], 4) == 0.2000
    assert round(mfu["reference"], 5) == 0.02573
    assert round(mfu["ratio"], 2) == 7.77  # 20.0 / 2.573
    assert "rollout+update MFU, bf16 autocast (higher is better)" not in rows  # no bf16 job


def test_mfu_is_none_without_a_measured_peak(bench):
    rows = {r["metric"]: r for r in bench.build_rows(RAW, {"float32": None})}
    assert rows["rollout+update MFU, float32 (higher is better)"]["ours"] is None


def test_limit_lines_hand_values(bench):
    """100 GFLOP/s / 0.289441792 GFLOP = 345.5 episodes/s at most (0.00289 s each); 69.1 is
    20% of it."""
    readings = {"float32": [98.0, 100.0], "bf16": [None, None]}
    lines = bench.limit_lines(RAW, {"float32": 100.0, "bf16": None}, readings)
    assert lines[0] == (
        "Matmul peak, this run, before / after the jobs: float32 100.0 GFLOP/s "
        "(readings 98.0 / 100.0)."
    )
    assert lines[1] == (
        "At the float32 peak an episode of ours needs at least 0.00289 s: at most 345 "
        "episodes/s; ours runs 69.1 (20%)."
    )
    assert len(lines) == 2  # bf16: no job and no peak
