"""What there is to label, and generating it ahead of the person.

An item is one prompt in one pass. Its id is a hash of the mode, seed, prompt index, pass and
prompt text, so the same prompts file and seed give the same ids after a restart (labelled
items are not shown again), while an edited prompt becomes a new item. The id also seeds the
sampling, so an item's responses do not depend on the order items were generated in.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Optional

from beartype import beartype

# prompt, number of samples, seed -> that many response texts
Generate = Callable[[str, int, int], list]


class ItemSpec(NamedTuple):
    id: str
    number: int  # 1-based position among all items, shown on the page
    prompt: str
    seed: int


class Item(NamedTuple):
    spec: ItemSpec
    responses: list  # as shown, left to right / top to bottom
    sources: tuple  # arena: which checkpoint ("a"/"b") wrote each shown response; else ()


class UnusableItem(ValueError):
    """Generation produced nothing a person could label (e.g. a blank response to rate)."""


@beartype
def item_specs(prompts: list, mode: str, seed: int, passes: int = 1) -> list[ItemSpec]:
    """Every item of a labelling job, pass by pass, prompts in file order."""
    specs = []
    for pass_index in range(passes):
        for index, prompt in enumerate(prompts):
            key = f"{mode}\x1f{seed}\x1f{index}\x1f{pass_index}\x1f{prompt}".encode()
            digest = hashlib.sha256(key).hexdigest()
            specs.append(ItemSpec(digest[:16], len(specs) + 1, prompt, int(digest[16:31], 16)))
    return specs


def item_builder(mode: str, generate: Generate, count: int, generate_b: Optional[Generate] = None):
    """spec -> Item for one mode: K responses to rank, one to rate, or an A/B pair."""

    def build(spec: ItemSpec) -> Item:
        if mode == "rank":
            responses = list(generate(spec.prompt, count, spec.seed))
            if len(responses) != count:
                raise UnusableItem(f"the generator returned {len(responses)} of {count} responses")
            return Item(spec, responses, ())
        if mode == "rate":
            (response,) = generate(spec.prompt, 1, spec.seed)
            if not response.strip():
                raise UnusableItem("the response is blank; a rating of nothing trains nothing")
            return Item(spec, [response], ())
        texts = {"a": generate(spec.prompt, 1, spec.seed)[0]}
        texts["b"] = generate_b(spec.prompt, 1, spec.seed)[0]
        # hidden, random but reproducible order: the person must not know which is which
        sources = ("a", "b") if random.Random(spec.seed).random() < 0.5 else ("b", "a")
        return Item(spec, [texts[s] for s in sources], sources)

    return build


class Prefetcher:
    """Builds items in a daemon thread, at most `ahead` waiting, so that after the first item
    nobody waits on the model. A failed item is logged and left out; it costs one item, not
    the server."""

    @beartype
    def __init__(self, specs: list, build: Callable[[ItemSpec], Item], ahead: int, log=print):
        self._specs, self._build, self._log = list(specs), build, log
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop, self._finished = threading.Event(), threading.Event()
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="label-prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            for spec in self._specs:
                if self._stop.is_set():
                    return
                try:
                    item = self._build(spec)
                except Exception as error:  # noqa: BLE001 - any generator failure skips the item
                    self.failed += 1
                    self._log(f"item {spec.id} left out: {type(error).__name__}: {error}")
                    continue
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        finally:
            self._finished.set()

    def take(self, timeout: float) -> Optional[Item]:
        """The next generated item, waiting up to `timeout` seconds; None if none is ready."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._finished.is_set() or time.monotonic() >= deadline:
                    return self._queue.get_nowait() if not self._queue.empty() else None

    def exhausted(self) -> bool:
        """Every item was generated (or left out) and handed out."""
        return self._finished.is_set() and self._queue.empty()
