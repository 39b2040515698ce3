"""Write docs/results.md from benchmarks/results/*.json: every number of the page comes from a
JSON a benchmark wrote, under a line saying the commit, date and machine it was measured on.

python benchmarks/results_page.py           # rewrite docs/results.md
python benchmarks/results_page.py --check   # exit 1 if docs/results.md is not up to date

tests/test_docs.py holds docs/results.md to exactly what this script renders. A results JSON
with no section here is an error (so a new benchmark cannot go missing from the page); the
`*-quick.json` files of smoke runs are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
PAGE = ROOT / "docs" / "results.md"
CPU_FLAGS = ("avx512", "avx512_bf16", "amx_bf16")


def load_script(path: Path):
    """A benchmark or example script as a module, for its table formatters."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)  # dataclasses look their module up
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return sys.modules[path.stem]


def provenance_line(report: dict) -> str:
    """'Measured at ...' from the JSON's `provenance` (benchmarks/provenance.py); older JSONs
    say what they recorded, and 'commit unknown' when that is nothing."""
    record = report.get("provenance")
    if record:
        machine = record["machine"]
        commit = f"commit `{record['commit']}`" if record["commit"] else "commit unknown"
        if record["dirty"]:
            commit += " with uncommitted changes"
        flags = ", ".join(f for f in CPU_FLAGS if machine.get(f)) or "no AVX-512"
        return (
            f"Measured at {commit} on {record['date'][:10]}: {machine['cpu']}, "
            f"{machine['cores']} cores ({flags}), {machine['threads']} threads, "
            f"torch {machine['torch']}."
        )
    legacy = report.get("machine")
    if isinstance(legacy, dict) and legacy.get("ours_commit"):
        flags = legacy.get("cpu_capability") or "CPU flags not recorded"
        return (
            f"Measured at commit `{legacy['ours_commit']}` (clean or not: not recorded) on "
            f"{legacy['date'][:10]}: {legacy['cpu']}, {legacy['logical_cpus']} cores "
            f"({flags}), {legacy['threads']} threads, torch {legacy['torch']}."
        )
    machine = legacy if isinstance(legacy, str) else "not recorded"
    return f"Measured at commit unknown, date unknown; machine: {machine}."


def stored_markdown(report: dict) -> str:
    return report["markdown"]


def reward_table(report: dict) -> str:
    return report["table"]


def demo_table(report: dict) -> str:
    demo = load_script(ROOT / "examples" / "pipeline_demo.py")
    return (
        demo.table(report)
        + "\n\n![PPO reward and KL per update](../benchmarks/results/demo_ppo_curves.png)"
    )


def frontier_tables(report: dict) -> str:
    frontier = load_script(BENCH_DIR / "bench_frontier.py")
    parts = [frontier.stages_table(report), frontier.table(report), frontier.reading(report)]
    return (
        "\n\n".join(parts)
        + "\n\n![gold and proxy score vs sqrt KL](../benchmarks/results/frontier.png)"
    )


def trl_table(report: dict) -> str:
    bench = load_script(BENCH_DIR / "bench_trl.py")
    return bench.report(bench.Setting(**report["setting"]), report)


def frontier_addition_table(report: dict) -> str:
    bench = load_script(BENCH_DIR / "bench_frontier_addition.py")
    return (
        bench.table(report)
        + "\n\n![gold and proxy against sqrt KL](../benchmarks/results/frontier-addition.png)"
    )


def reasoning_table(report: dict) -> str:
    bench = load_script(BENCH_DIR / "bench_reasoning.py")
    note = report.get("validation_note")
    return bench.table(report) + (f"\n\nRun: {note}." if note else "")


class Section(NamedTuple):
    file: str  # in benchmarks/results/
    title: str
    what: str  # what is measured and the command that measures it; no numbers
    render: Callable[[dict], str]


SECTIONS = (
    Section(
        "palm.json",
        "The model against palm-rlhf-pytorch 0.8.0",
        "Training and sampling throughput, model-FLOPs utilisation and peak memory of the same "
        "PaLM in both libraries, run side by side in one command: "
        "`python benchmarks/bench_palm.py`.",
        stored_markdown,
    ),
    Section(
        "palm-train-sample.json",
        "The model against palm-rlhf-pytorch 0.8.0: batch-1 sampling again",
        "Batch-1 sampling only, after the decode step chose its products by measurement: "
        "`python benchmarks/bench_palm.py --rounds 2 --jobs sample-b1,sample-b1-bf16 --out "
        "benchmarks/results/palm-train-sample.json`.",
        stored_markdown,
    ),
    Section(
        "decode.json",
        "Decoding against the memory-bandwidth roofline",
        "A batch-1 decode step reads every weight once, so (weight + KV-cache bytes) / memory "
        "bandwidth is its floor; the bandwidth is probed in the same run. "
        "`python benchmarks/bench_decode.py --jobs eager`.",
        stored_markdown,
    ),
    Section(
        "decode-compiled.json",
        "Decoding with the compiled step",
        "`sample_tokens(..., compile_decode=True)`: `python benchmarks/bench_decode.py "
        "--jobs compiled --batches 1 --dtypes float32`.",
        stored_markdown,
    ),
    Section(
        "checkpointing.json",
        "Activation checkpointing",
        "Peak memory and time of one training step with activations stored or recomputed "
        "(`--checkpoint-activations`): `python benchmarks/bench_checkpointing.py`.",
        stored_markdown,
    ),
    Section(
        "attention.json",
        "bf16 attention on the CPU",
        "Forward and backward of causal multi-query attention in fp32, in bf16, and in bf16 "
        "computed in fp32 (what `model/attention.py` does below 512 keys when gradients are "
        "needed): `python benchmarks/bench_attention.py`.",
        stored_markdown,
    ),
    Section(
        "ppo.json",
        "PPO against palm-rlhf-pytorch 0.8.0",
        "Rollout + update episodes per second, their share of this run's own matmul peak (MFU), "
        "and the reward each library reaches on a toy task in the same training time: "
        "`python benchmarks/bench_ppo.py`.",
        stored_markdown,
    ),
    Section(
        "decode-ppo.json",
        "PPO throughput against an earlier commit",
        "The same PPO worker on this checkout and on another commit, alternating: "
        "`python benchmarks/bench_decode.py --jobs ppo --ppo-base REVISION`.",
        stored_markdown,
    ),
    Section(
        "products.json",
        "The decode step's weight products",
        "The few-row weight products of a decode step by method (`nn.Linear`, an input-major "
        "copy of the weight, row blocks), ms and GB/s of weights read beside the bandwidth "
        "probe: `python benchmarks/bench_products.py`.",
        stored_markdown,
    ),
    Section(
        "defaults.json",
        "Does PPO learn with its default hyperparameters?",
        "A toy task (reward = share of one token in the response), default `RLHFTrainer` "
        "hyperparameters, two seeds; reward of fresh rollouts before and after training, KL of "
        "the last update: `python benchmarks/bench_defaults.py`.",
        stored_markdown,
    ),
    Section(
        "defaults-demo.json",
        "The pipeline demo's PPO stage, LoRA initialisations and learning rates",
        "The demo's PPO stage rerun from a finished demo's SFT policy and reward model: "
        "`python benchmarks/bench_defaults.py --demo DIR`.",
        stored_markdown,
    ),
    Section(
        "reward_hh.json",
        "A reward model on human preferences (HH-RLHF)",
        "Trained on pairs of Anthropic's HH-RLHF harmless-base test file and scored on held-out "
        "pairs, beside the 'always prefer the shorter answer' rule: "
        "`python benchmarks/bench_reward_hh.py`.",
        reward_table,
    ),
    Section(
        "demo.json",
        "The whole pipeline on the embedded corpus",
        "SFT, reward model, PPO, DPO and Chain of Hindsight on 'finish this verse' data built "
        "from the embedded corpus, each stage loading the previous one's checkpoint, measured on "
        "verses pretraining never saw: `python examples/pipeline_demo.py`.",
        demo_table,
    ),
    Section(
        "frontier.json",
        "Reward over-optimisation frontier (Gao et al. 2022)",
        "A gold reward model trained on human preferences, a proxy trained on gold-labelled "
        "samples, and every optimiser run against the proxy from the same SFT start; gold and "
        "proxy scores against KL to the SFT policy: `python benchmarks/bench_frontier.py`. "
        "How scores and KL are defined: `benchmarks/results/frontier.md`.",
        frontier_tables,
    ),
    Section(
        "frontier-addition.json",
        "Over-optimisation against a gold that cannot be gamed",
        "The gold is exact-match on held-out 3-digit additions; a proxy reward model learns it "
        "from pairs of the SFT model's answers; best-of-n and every RL method optimise the "
        "proxy, with gold and proxy measured against KL to the SFT model, per seed: "
        "`python benchmarks/bench_frontier_addition.py`.",
        frontier_addition_table,
    ),
    Section(
        "reasoning.json",
        "Does RL make the model better at a task with an exact answer?",
        "3-digit addition with held-out problems disjoint from training: SFT to a model that is "
        "right sometimes, then each RL method with the exact-match reward and the same episode "
        "budget; held-out pass@1 before and after, KL to the SFT model: "
        "`python benchmarks/bench_reasoning.py`.",
        reasoning_table,
    ),
    Section(
        "trl.json",
        "GRPO against TRL",
        "The same toy task, group size, learning rate, KL coefficient, clip epsilon and loss "
        "aggregation for our PaLM and a `LlamaForCausalLM` of matched size under TRL's "
        "`GRPOTrainer`, one process at a time, both models initialised from normal(0, 0.02): "
        "`python benchmarks/bench_trl.py`. Since 2026-12-05 ours prefills and updates each "
        "group's prompt once (`model/shared_prefix.py`), TRL every row's: the GFLOP row counts "
        "what each side runs.",
        trl_table,
    ),
    Section(
        "trl-seed1.json",
        "GRPO against TRL, a second seed",
        "The same comparison with other prompts and initial weights, to show the noise in the "
        "reward curves and the timings: `python benchmarks/bench_trl.py --seed 1`.",
        trl_table,
    ),
    Section(
        "trl-bf16.json",
        "GRPO against TRL in bf16 mixed precision",
        "The same comparison with both sides under their Accelerate's bf16 mixed precision "
        "(autocast over fp32 weights; TRL `bf16=True`), the peak measured with a bf16 matmul: "
        "`python benchmarks/bench_trl.py --precision bf16`. Not the issue's fp32 setting: what a "
        "user with a bf16-capable CPU would see.",
        trl_table,
    ),
)

HEADER = """# Results

Generated by `python benchmarks/results_page.py` from `benchmarks/results/*.json`: do not edit
by hand. Each table says the commit, date and machine it was measured on; numbers measured on
different machines or commits do not compare. How each benchmark measures is in
[benchmarks/README.md](../benchmarks/README.md).
"""


def render(results: Path = RESULTS) -> str:
    files = {p.name for p in results.glob("*.json") if not p.stem.endswith("-quick")}
    unknown = sorted(files - {s.file for s in SECTIONS})
    if unknown:
        raise SystemExit(f"results_page.py: no section for {', '.join(unknown)}; add one")
    parts = [HEADER]
    for section in SECTIONS:
        if section.file not in files:
            continue
        report = json.loads((results / section.file).read_text(encoding="utf-8"))
        parts.append(
            f"## {section.title}\n\n{section.what}\n\n{provenance_line(report)} "
            f"Raw numbers: `benchmarks/results/{section.file}`.\n\n"
            f"{section.render(report).strip()}\n"
        )
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is stale: run python benchmarks/results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
