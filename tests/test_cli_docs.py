"""docs/cli.md runs as written (tests/doc_pages.py: the executor and convention every page
follows), and what its tiny models trained shows they learned a little."""

import json

import pytest

from tests.doc_pages import REPO, run_page


def test_cli_page_runs_as_written(tmp_path, monkeypatch):
    run_page(REPO / "docs" / "cli.md", tmp_path / "page", monkeypatch)
    root = tmp_path / "page"
    for stage in ("sft", "reward", "reward-ratings", "ppo/final", "grpo/final", "dpo", "coh"):
        assert (root / "runs" / stage).is_dir(), stage
    # the example data teaches even these tiny models a little (a chance level is 0.5 / ln 2)
    history = {
        stage: [json.loads(line) for line in (root / "runs" / stage / "history.jsonl").open()]
        for stage in ("sft", "reward", "dpo")
    }
    assert history["sft"][-1]["loss"] < history["sft"][0]["loss"] - 0.2
    assert [r["valid_accuracy"] for r in history["reward"] if "valid_accuracy" in r][-1] >= 0.8
    assert history["dpo"][-1]["loss"] < 0.5


@pytest.mark.parametrize("name", ["sft", "comparisons", "ratings", "prompts"])
def test_every_example_file_reads_and_every_stage_command_names_one(name):
    from palm_rlhf.data import records

    read = {
        "sft": records.read_sft,
        "comparisons": records.read_comparisons,
        "ratings": lambda p: records.read_ratings(p, num_bins=5),
        "prompts": records.read_prompts,
    }[name]
    path = REPO / "examples" / "data" / f"{name}.jsonl"
    assert 24 <= len(read(path)) <= 100  # a few dozen records
    assert f"examples/data/{name}.jsonl" in (REPO / "docs" / "cli.md").read_text()
