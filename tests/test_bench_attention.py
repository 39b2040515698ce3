"""The attention benchmark times what `sdpa_attention` runs, and its table reads its rows."""

BENCH = "bench_attention"  # loaded by the `bench` fixture (conftest.py)


def test_table_rows_and_ratio(bench):
    rows = [{"shape": [128, 8, 32, 32], "fp32": 0.010, "bf16": 0.030, "bf16 in fp32": 0.011}]
    lines = bench.table(rows).splitlines()
    assert lines[2] == "| 128 x 8 x 32 x 32 | 10.0 | 30.0 | 11.0 | 3.00x |"


def test_each_kind_runs_forward_and_backward(bench):
    for kind in bench.KINDS:
        assert bench.seconds((2, 2, 8, 4), kind, iters=1) > 0
