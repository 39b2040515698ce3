"""One labelling job in progress: who holds which item, what is done, what can be undone.

Leases: an item handed to a tab is leased to that tab's client id for `lease_seconds`; no other
tab gets it meanwhile, and a reload gets the same item back. An expired lease returns the item
to the front of the line. Skipping drops the item for this run (a restart offers it again).
Undo takes back the newest label this client wrote in this run (labels of earlier runs are
final): its line is removed from the file and the item is leased to the client again, to be
labelled anew. One lock serialises every change, file writes included.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Optional

from palm_rlhf.label.items import Item, Prefetcher
from palm_rlhf.label.modes import LabelError, make_record
from palm_rlhf.label.store import LabelStore

CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); (0, 1) with no trials.

    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is honest at 0 or n successes.
    """
    if trials == 0:
        return 0.0, 1.0
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Lease(NamedTuple):
    item: Item
    client: str
    expires: float


class LabelSession:
    def __init__(
        self,
        specs: list,
        store: LabelStore,
        prefetcher: Prefetcher,
        scale: int = 5,
        lease_seconds: float = 600.0,
        wait_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.prefetcher, self.mode, self.scale = store, prefetcher, store.mode, scale
        self.lease_seconds, self.wait_seconds, self.clock = lease_seconds, wait_seconds, clock
        self.spec_ids = {spec.id for spec in specs}
        self._lock = threading.Lock()
        self._leases: dict = {}  # item id -> Lease
        self._returned: deque = deque()  # items to hand out before new ones
        self._undo: dict = {}  # client -> [Item, ...] labelled in this run, newest last
        self.skipped = 0

    # ------------------------------------------------------------------ helpers (lock held)

    def _expire(self) -> None:
        now = self.clock()
        for item_id, lease in list(self._leases.items()):
            if lease.expires <= now:
                del self._leases[item_id]
                self._returned.appendleft(lease.item)

    def _held_by(self, client: str) -> Optional[Lease]:
        return next((lease for lease in self._leases.values() if lease.client == client), None)

    def _lease(self, item: Item, client: str) -> dict:
        self._leases[item.spec.id] = Lease(item, client, self.clock() + self.lease_seconds)
        return self._view(item)

    def _view(self, item: Item) -> dict:
        spec = item.spec
        return {
            "id": spec.id,
            "number": spec.number,
            "prompt": spec.prompt,
            "responses": item.responses,
        }

    def _leased_to(self, client: str, item_id) -> Lease:
        if item_id is None:
            raise LabelError(400, 'missing key "id"')
        if not isinstance(item_id, str):
            raise LabelError(400, f'"id" must be a string, not {type(item_id).__name__}')
        lease = self._leases.get(item_id)
        if lease is None:
            if item_id in self.store.done_ids():
                raise LabelError(409, f"item {item_id} is already labelled")
            if item_id in self.spec_ids:
                raise LabelError(409, f"item {item_id} is not leased to you; ask /api/next")
            raise LabelError(404, f"unknown item id {item_id!r}")
        if lease.client != client:
            raise LabelError(409, f"item {item_id} is leased to another tab")
        return lease

    def _answer(self, item: Optional[dict], done: bool) -> dict:
        return {"item": item, "done": done, "progress": self.progress()}

    def progress(self) -> dict:
        labelled = len(self.store.done_ids() & self.spec_ids)
        return {
            "labelled": labelled,
            "total": len(self.spec_ids),
            "skipped": self.skipped,
            "failed": self.prefetcher.failed,
            "leased": len(self._leases),
        }

    # ------------------------------------------------------------------ the API

    def next(self, client: str) -> dict:
        """The client's current item, or a new one (waiting briefly for generation)."""
        with self._lock:
            self._expire()
            held = self._held_by(client)
            if held is not None:
                return self._answer(self._lease(held.item, client), False)
            item = self._returned.popleft() if self._returned else None
        if item is None:  # wait for the model without the lock: other tabs carry on
            item = self.prefetcher.take(timeout=self.wait_seconds)
        with self._lock:
            if item is not None and self._held_by(client) is not None:
                self._returned.appendleft(item)  # the same client raced itself; keep one lease
                item = self._held_by(client).item
            if item is None:
                done = self.prefetcher.exhausted() and not self._returned and not self._leases
                return self._answer(None, done)
            return self._answer(self._lease(item, client), False)

    def submit(self, client: str, item_id, body: dict) -> dict:
        """Check and write a label; returns once it is on disk."""
        with self._lock:
            lease = self._leased_to(client, item_id)
            outcome = make_record(self.mode, body, lease.item, self.scale)
            self.store.append(outcome.record, tie=outcome.tie)
            del self._leases[item_id]
            self._undo.setdefault(client, []).append(lease.item)
            return {"ok": True, "id": item_id, "tie": outcome.tie}

    def skip(self, client: str, item_id) -> dict:
        with self._lock:
            self._leased_to(client, item_id)
            del self._leases[item_id]
            self.skipped += 1
            return {"ok": True, "id": item_id}

    def undo(self, client: str) -> dict:
        """Remove the client's newest label of this run; its item is the client's again."""
        with self._lock:
            stack = self._undo.get(client)
            if not stack:
                raise LabelError(409, "nothing to undo: this tab wrote no label in this run")
            item = stack.pop()
            self.store.remove(item.spec.id)
            held = self._held_by(client)
            if held is not None:  # the item on screen goes back to the front of the line
                del self._leases[held.item.spec.id]
                self._returned.appendleft(held.item)
            return {"ok": True, "undone": item.spec.id, "item": self._lease(item, client)}

    def stats(self) -> dict:
        with self._lock:
            self._expire()
            stats = {"mode": self.mode, "scale": self.scale, "progress": self.progress()}
            if self.mode == "arena":
                counts = self.store.arena_counts()
                decided = counts["a"] + counts["b"]
                low, high = wilson_interval(counts["b"], decided)
                stats["arena"] = {
                    **counts,
                    "b_win_rate": counts["b"] / decided if decided else None,
                    "b_win_rate_95": [low, high],
                }
            return stats
