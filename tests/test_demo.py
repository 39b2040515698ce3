"""The end-to-end demo (examples/pipeline_demo.py --tiny) and its data builder.

The demo runs in-process once (a tiny model, a few steps a stage, ~10 s); the tests read what
it printed and wrote. The data tests check the built records against the corpus itself.
"""

import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo_data  # noqa: E402
from demo_data import read_verses, write_demo_data  # noqa: E402


def _load_demo():
    spec = importlib.util.spec_from_file_location("pipeline_demo", EXAMPLES / "pipeline_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pipeline_demo"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
NUMBER = re.compile(r"-?\d+\.\d+|nan|inf", re.IGNORECASE)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    try:
        with contextlib.redirect_stdout(printed):
            results = demo.main(["--tiny", "--out-dir", str(out_dir)])
    finally:
        torch.set_num_threads(threads)
    return out_dir, results, printed.getvalue()


def _numbers(value):
    """Every int/float inside nested dicts and lists (strings excluded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in _numbers(item)]


def test_table_has_every_row_with_finite_numbers(tiny_run):
    out_dir, _, printed = tiny_run
    table = (out_dir / "results.md").read_text(encoding="utf-8")
    assert table.strip() in printed  # the printed table is the saved one
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    assert header.startswith("| stage | metric")
    assert [row.split(" | ")[0][2:] for row in rows] == [r[0] for r in demo.TABLE_ROWS]
    for row in rows:
        value = row.split(" | ")[2]
        numbers = NUMBER.findall(value)
        assert numbers, row
        assert all(math.isfinite(float(n)) for n in numbers), row
    for footnote in ("[1]", "[2]", "[3]", "[4]"):  # each used in a row and defined once
        assert any(footnote in row for row in rows)
        assert sum(line.startswith(footnote) for line in table.splitlines()) == 1


def test_json_holds_every_stage_with_finite_consistent_numbers(tiny_run):
    out_dir, results, _ = tiny_run
    saved = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "coh", "seconds", "budget"):
        numbers = _numbers(saved[stage])
        assert numbers and all(math.isfinite(n) for n in numbers), stage
    # accuracies are shares of the 8 held-out pairs: multiples of 1/8 in [0, 1]
    for value in (
        saved["reward"]["accuracy"],
        saved["dpo"]["implicit_reward_accuracy"],
        saved["dpo"]["likelihood_accuracy"],
        saved["coh"]["likelihood_accuracy"],
    ):
        assert 0.0 <= value <= 1.0 and (value * 8) == pytest.approx(round(value * 8), abs=1e-9)
    # the demo's own held-out SFT loss is the one the library reports on the same file
    assert saved["sft"]["loss_after"] == pytest.approx(saved["sft"]["library_valid_loss"], abs=1e-4)
    # 8 episodes in updates of 4: two points on the PPO curve
    assert [point["update"] for point in saved["ppo"]["curve"]] == [1, 2]
    assert saved["ppo"]["updates"] == 2
    assert saved["seconds"]["total"] == pytest.approx(
        sum(v for k, v in saved["seconds"].items() if k != "total"), abs=0.5
    )
    assert saved["pretrain"]["valid_bpc"] == pytest.approx(results["pretrain"]["valid_bpc"])


def test_the_ppo_plot_is_a_png_when_matplotlib_is_installed(tiny_run):
    pytest.importorskip("matplotlib")
    out_dir, results, _ = tiny_run
    png = out_dir / "ppo_curves.png"
    assert results["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bits_per_byte_is_train_py_s_measurement(tiny_run):
    """The demo's bpc of a reused checkpoint equals what pretraining reported for it."""
    from palm_rlhf.train.loading import load_base

    out_dir, results, _ = tiny_run
    model, _ = load_base(out_dir / "pretrain", log=lambda *_: None)
    tiny = demo.TINY_MODEL  # pretraining validated val_batches batches of batch_size chunks
    bpc = demo.bits_per_byte(
        model, demo.REPO / "data", tiny["seq_len"], tiny["batch_size"], tiny["val_batches"]
    )
    assert bpc == pytest.approx(results["pretrain"]["valid_bpc"], rel=1e-5)


def test_out_dir_of_someone_else_is_refused_and_a_base_inside_is_kept(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        demo.prepare_out_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    demo.prepare_out_dir(ours)
    for name in ("sft", "pretrain"):
        (ours / name / "step-1").mkdir(parents=True)
    demo.prepare_out_dir(ours, keep=str(ours / "pretrain" / "step-1"))
    assert not (ours / "sft").exists() and (ours / "pretrain" / "step-1").is_dir()


# ----------------------------------------------------------------------------- demo_data


@pytest.fixture(scope="module")
def verses():
    return read_verses()


def test_the_corpus_parses_into_the_verses_its_readme_counts(verses):
    assert len(verses) == 31_102  # data/README.md: 31,102 verses in 1,189 chapters
    assert len({v.chapter for v in verses}) == 1_189
    assert verses[0] == (
        "Genesis 1",
        "In the beginning God created the heaven and the earth.",
        False,
    )
    assert verses[-1].chapter == "Revelation 22" and verses[-1].held_out
    first_held_out = next(v for v in verses if v.held_out)
    assert first_held_out.chapter == "Acts 22"  # data/README.md: the held-out tenth starts there
    # held-out verses are exactly a suffix of the book order
    flags = [v.held_out for v in verses]
    assert flags == sorted(flags)


def test_records_finish_real_verses_and_test_verses_are_held_out(tmp_path, verses):
    paths = write_demo_data(
        tmp_path, num_sft=30, num_comparisons=30, num_prompts=10, num_test=20, seed=3
    )
    held_out = {v.text for v in verses if v.held_out}
    trained = {v.text for v in verses if not v.held_out}
    pattern = re.compile(r"^\n\nHuman: Finish this verse: (.+)\n\nAssistant:$")

    def verse_of(prompt, response):
        head = pattern.match(prompt).group(1)
        assert len(head.split()) == 6 and response.startswith(" ")
        return f"{head}{response}"

    read = lambda name: [json.loads(line) for line in paths[name].read_text().splitlines()]  # noqa: E731
    seen = {}
    for name in ("sft_train", "sft_test"):
        seen[name] = {verse_of(r["prompt"], r["response"]) for r in read(name)}
    for name in ("comparisons_train", "comparisons_test"):
        records = read(name)
        seen[name] = {verse_of(r["prompt"], r["chosen"]) for r in records}
        for r in records:  # the rejected rest: the same words, in another order
            assert r["rejected"] != r["chosen"]
            assert sorted(r["rejected"].split()) == sorted(r["chosen"].split())
            assert len(r["rejected"]) == len(r["chosen"])
    assert seen["sft_train"] <= trained and seen["comparisons_train"] <= trained
    assert seen["sft_test"] <= held_out and seen["sft_test"] == seen["comparisons_test"]
    assert len(seen["sft_train"]) == 30 and len(seen["sft_test"]) == 20
    assert not seen["sft_train"] & seen["comparisons_train"]  # stages get different verses
    prompts = {r["prompt"] for r in read("prompts_train")}
    assert len(prompts) == 10
    assert not prompts & {r["prompt"] for r in read("sft_train") + read("comparisons_train")}


def test_data_is_a_function_of_the_seed(tmp_path):
    sizes = dict(num_sft=5, num_comparisons=5, num_prompts=5, num_test=5)
    first = write_demo_data(tmp_path / "a", seed=1, **sizes)
    again = write_demo_data(tmp_path / "b", seed=1, **sizes)
    other = write_demo_data(tmp_path / "c", seed=2, **sizes)
    for name in first:
        assert first[name].read_bytes() == again[name].read_bytes()
    assert first["sft_train"].read_bytes() != other["sft_train"].read_bytes()


def test_swap_rejects_with_the_rest_of_another_verse(tmp_path, verses):
    paths = write_demo_data(tmp_path, 2, 20, 2, 2, seed=0, corruption="swap")
    rests = {" " + " ".join(v.text.split()[6:]) for v in verses}
    for line in paths["comparisons_train"].read_text().splitlines():
        record = json.loads(line)
        assert record["rejected"] in rests and record["rejected"] != record["chosen"]
    with pytest.raises(ValueError, match="corruption"):
        demo_data.make_tasks(verses[:5], 6, 4, 80, "reverse", None)
