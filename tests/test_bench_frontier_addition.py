"""The programmatic-gold frontier: what a reward model reads, best-of-n's exact expectation,
the over-optimisation verdict, and a toy run through the public API."""

import json

import pytest
import torch

BENCH = "bench_frontier_addition"  # loaded by the `bench` fixture (conftest.py)


def test_sequences_keep_the_response_up_to_its_first_eos(bench):
    prompts = torch.tensor([[1, 2], [1, 2]])
    responses = torch.tensor([[5, 0, 0], [5, 6, 7]])  # EOS = 0 after one token; no EOS
    tokens, mask, prompt_mask = bench.sequences(prompts, responses)
    assert tokens.tolist() == [[1, 2, 5, 0, 0], [1, 2, 5, 6, 7]]
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]
    assert prompt_mask.tolist() == [[True, True, False, False, False]] * 2


def test_favourite_of_n_hand_values(bench):
    ranked = torch.tensor([[0.0, 0.0, 1.0]])  # the proxy's top sample is the right one
    # n = 1: a random sample, 1/3; n = 2: the top is in 2 of the 3 pairs; n = 3: always
    assert bench.favourite_of_n(ranked, 1).item() == pytest.approx(1 / 3)
    assert bench.favourite_of_n(ranked, 2).item() == pytest.approx(2 / 3)
    assert bench.favourite_of_n(ranked, 3).item() == pytest.approx(1.0)
    wrong_top = torch.tensor([[1.0, 0.0, 0.0]])  # the proxy ranks the right answer last
    assert bench.favourite_of_n(wrong_top, 2).item() == pytest.approx(0.0)


def test_verdict_needs_gold_down_and_proxy_up(bench):
    def point(gold, proxy, kl):
        return {"gold": gold, "gold_se": 0.02, "proxy": proxy, "kl": kl}

    hacked = [point(0.2, 0.0, 0.0), point(0.5, 1.0, 1.0), point(0.3, 2.0, 3.0)]
    v = bench.verdict(hacked)
    assert v == {
        "best_gold": 0.5,
        "best_kl": 1.0,
        "last": {"gold": 0.3, "proxy": 2.0, "kl": 3.0},
        "over_optimised": True,
    }
    within_noise = [point(0.2, 0.0, 0.0), point(0.5, 1.0, 1.0), point(0.47, 2.0, 3.0)]
    assert not bench.verdict(within_noise)["over_optimised"]
    both_fell = [point(0.2, 0.0, 0.0), point(0.5, 1.0, 1.0), point(0.3, 0.5, 3.0)]
    assert not bench.verdict(both_fell)["over_optimised"]


def test_quick_run_end_to_end(bench, tmp_path):
    results = bench.main(["--quick", "--methods", "grpo", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "frontier-addition-quick.json").read_text())
    run = written["seeds"]["0"]
    assert [p["episodes"] for p in run["methods"]["grpo"]["points"]] == [0, *bench.QUICK.eval_at]
    assert run["methods"]["grpo"]["points"][0]["kl"] == 0.0  # the SFT model itself
    assert [p["n"] for p in run["best_of_n"]] == [1, 2, 4]
    assert 0.0 <= run["proxy"]["valid_accuracy"] <= 1.0
    assert "| grpo |" in bench.table(results)
