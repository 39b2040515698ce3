"""The demo's alignment data, built at run time from the embedded corpus (data/corpus.txt.gz).

The corpus is the King James Bible, public domain: a heading line per chapter ("Genesis 1"),
a blank line, one verse per line, a blank line before the next heading. Each verse becomes
one "finish the verse" task in the HH-RLHF Human/Assistant template:

    prompt    "\\n\\nHuman: Finish this verse: <the first `prefix_words` words>\\n\\nAssistant:"
    response  " <the rest of the verse>"

and a comparison whose chosen response is the true rest and whose rejected response is a
corrupted rest, by `corruption`:

    "shuffle"  the rest's words in a seeded random order (never the original order): the same
               bytes, so the same length, but broken grammar and misplaced punctuation
    "swap"     the rest of another verse of similar length: fluent, but not this verse
    "mix"      each record draws one of the two (seeded)

Split: verses that begin in the last 10% of the corpus bytes (Acts 22 to Revelation) are the
test pool. That is the part `train.py` holds out from pretraining (5% validation + 5% test),
so no test verse was seen in any training stage. Training verses come from the rest and are
dealt out, without overlap, to the SFT, comparison and PPO-prompt files (the stages of
InstructGPT used different prompts too). Everything is a pure function of the seed.

Files written by `write_demo_data(out_dir, ...)`, JSON Lines in the formats of DESIGN.md
(`palm_rlhf.data.records` reads them):

    sft_train.jsonl  sft_test.jsonl                  {"prompt", "response"}
    comparisons_train.jsonl  comparisons_test.jsonl  {"prompt", "chosen", "rejected"}
    prompts_train.jsonl  prompts_test.jsonl          {"prompt"}

The test files hold the same verses in all three formats.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path
from typing import NamedTuple, Optional

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt.gz"
HEADING = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z]*(?: [A-Za-z]+)* \d+$")
CORRUPTIONS = ("shuffle", "swap", "mix")
HELD_OUT_FRACTION = 0.1  # train.py's validation + test share of the corpus (5% + 5%)


class Verse(NamedTuple):
    chapter: str  # "Genesis 1"
    text: str
    held_out: bool  # begins in the part of the corpus that pretraining holds out


class Task(NamedTuple):
    prompt: str
    response: str  # the true rest, with a leading space
    rejected: str  # a corrupted rest, with a leading space


def read_verses(path: Path = CORPUS, held_out_fraction: float = HELD_OUT_FRACTION) -> list[Verse]:
    """Every verse of the corpus with its chapter; a verse is held out when its first byte lies
    in the last `held_out_fraction` of the decompressed text (train.py's split, by bytes)."""
    data = gzip.decompress(Path(path).read_bytes())
    cut = len(data) - 2 * round(len(data) * held_out_fraction / 2)
    lines = data.decode("utf-8").split("\n")
    verses, chapter, offset = [], None, 0
    for index, line in enumerate(lines):
        next_blank = index + 1 < len(lines) and not lines[index + 1].strip()
        if HEADING.match(line) and next_blank:
            chapter = line
        elif line.strip() and chapter is not None:
            verses.append(Verse(chapter, line.strip(), offset >= cut))
        offset += len(line.encode("utf-8")) + 1
    if not verses:
        raise ValueError(f"{path}: no verses found (expected 'Book N' headings, one verse a line)")
    return verses


def task_prompt(first_words: str) -> str:
    return f"\n\nHuman: Finish this verse: {first_words}\n\nAssistant:"


def shuffled(words: list[str], rng: random.Random) -> Optional[list[str]]:
    """The words in a random order other than the given one (None if every order is equal)."""
    if len(set(words)) < 2:
        return None
    while True:
        order = rng.sample(words, len(words))
        if order != words:
            return order


def make_tasks(
    verses: list[Verse],
    prefix_words: int,
    min_rest_words: int,
    max_rest_chars: int,
    corruption: str,
    rng: random.Random,
) -> list[Task]:
    """Tasks of the verses whose rest has at least `min_rest_words` words and at most
    `max_rest_chars` characters (short sequences keep the demo fast on a CPU)."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    split = [(v.text.split()[:prefix_words], v.text.split()[prefix_words:]) for v in verses]
    split = [(h, r) for h, r in split if len(r) >= min_rest_words]
    split = [(h, r) for h, r in split if len(" ".join(r)) <= max_rest_chars]
    rests = sorted({" ".join(r) for _, r in split}, key=len)  # swap partners: similar length
    where = {rest: i for i, rest in enumerate(rests)}
    tasks = []
    for head, rest in split:
        true_rest = " ".join(rest)
        kind = corruption if corruption != "mix" else rng.choice(("shuffle", "swap"))
        if kind == "shuffle":
            words = shuffled(rest, rng)
            wrong = None if words is None else " ".join(words)
        else:
            i = where[true_rest]
            near = [j for j in range(max(0, i - 20), min(len(rests), i + 21)) if j != i]
            wrong = rests[rng.choice(near)] if near else None
        if wrong is not None and wrong != true_rest:
            tasks.append(Task(task_prompt(" ".join(head)), f" {true_rest}", f" {wrong}"))
    return tasks


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_data(
    out_dir,
    num_sft: int = 2000,
    num_comparisons: int = 2000,
    num_prompts: int = 1000,
    num_test: int = 200,
    seed: int = 0,
    prefix_words: int = 6,
    min_rest_words: int = 4,
    max_rest_chars: int = 80,
    corruption: str = "shuffle",
    corpus: Path = CORPUS,
) -> dict[str, Path]:
    """Build the demo data (see the module docstring) into `out_dir`; returns name -> path.

    Raises ValueError when the corpus holds too few usable verses for the requested counts.
    """
    rng = random.Random(seed)
    verses = read_verses(corpus)
    make = lambda pool: make_tasks(  # noqa: E731
        pool, prefix_words, min_rest_words, max_rest_chars, corruption, rng
    )
    train = make([v for v in verses if not v.held_out])
    test = make([v for v in verses if v.held_out])
    rng.shuffle(train), rng.shuffle(test)
    wanted = num_sft + num_comparisons + num_prompts
    if len(train) < wanted or len(test) < num_test:
        raise ValueError(
            f"{corpus}: {len(train)} training / {len(test)} test verses fit the task, but "
            f"{wanted} / {num_test} were asked for"
        )
    sft = train[:num_sft]
    comparisons = train[num_sft : num_sft + num_comparisons]
    prompts = train[num_sft + num_comparisons : wanted]
    test = test[:num_test]
    rows = {
        "sft_train": [{"prompt": t.prompt, "response": t.response} for t in sft],
        "sft_test": [{"prompt": t.prompt, "response": t.response} for t in test],
        "comparisons_train": [
            {"prompt": t.prompt, "chosen": t.response, "rejected": t.rejected} for t in comparisons
        ],
        "comparisons_test": [
            {"prompt": t.prompt, "chosen": t.response, "rejected": t.rejected} for t in test
        ],
        "prompts_train": [{"prompt": t.prompt} for t in prompts],
        "prompts_test": [{"prompt": t.prompt} for t in test],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in rows.items():
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], records)
    return paths
