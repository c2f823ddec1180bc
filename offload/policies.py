"""Which expert slot to give up: the per-layer cache decisions shared by the store and the simulator.

The store and ``dsmoe simulate`` both drive a ``LayerCache``, so a policy compared offline on a
routing trace makes exactly the choices it would make in a run.
"""

from __future__ import annotations

import abc
from collections import OrderedDict

from dsmoe.errors import UsageError


class Policy(abc.ABC):
    """Keeps the bookkeeping a policy needs and names the victim among the resident experts."""

    @abc.abstractmethod
    def accessed(self, expert: int) -> None:
        """An expert was used (hit or miss)."""

    @abc.abstractmethod
    def inserted(self, expert: int) -> None:
        """An expert became resident without being used (a prefetch)."""

    @abc.abstractmethod
    def removed(self, expert: int) -> None:
        """An expert left the cache."""

    @abc.abstractmethod
    def victim(self, candidates: list[int]) -> int:
        """The candidate to evict (all candidates are resident)."""


class LRUPolicy(Policy):
    """Evict the resident expert whose last use (or arrival) is oldest."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def accessed(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def inserted(self, expert: int) -> None:
        self.accessed(expert)

    def removed(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, candidates: list[int]) -> int:
        allowed = set(candidates)
        return next(e for e in self._order if e in allowed)


class LFUPolicy(Policy):
    """Evict the resident expert used least often over the whole run; ties go to the least recent.

    Counts survive eviction: an expert's heat is its routing history, not its time in the cache,
    so a hot expert that was pushed out once comes back with its count and is kept.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self._recency = LRUPolicy()

    def accessed(self, expert: int) -> None:
        self.counts[expert] = self.counts.get(expert, 0) + 1
        self._recency.accessed(expert)

    def inserted(self, expert: int) -> None:
        self._recency.inserted(expert)

    def removed(self, expert: int) -> None:
        self._recency.removed(expert)

    def victim(self, candidates: list[int]) -> int:
        rank = {e: i for i, e in enumerate(self._recency._order)}
        return min(candidates, key=lambda e: (self.counts.get(e, 0), rank.get(e, -1)))


POLICIES: dict[str, type[Policy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name.lower()]()
    except KeyError:
        raise UsageError(f"unknown cache policy {name!r} (choose {' or '.join(POLICIES)})") from None


class LayerCache:
    """The resident set of one MoE layer's expert slots, and the decisions that change it.

    ``begin(needed)`` announces the experts a forward pass of this layer is about to use, so a miss
    never evicts one of them that is resident and not yet used (which would turn a hit into a
    miss); with fewer slots than needed experts the used ones go first.
    """

    def __init__(self, capacity: int, policy: str | Policy = "lru") -> None:
        if capacity < 0:
            raise UsageError(f"an expert cache needs 0 or more slots, not {capacity}")
        self.capacity = capacity
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.resident: set[int] = set()
        self._pending: set[int] = set()

    def __contains__(self, expert: int) -> bool:
        return expert in self.resident

    def begin(self, needed: set[int]) -> None:
        self._pending = set(needed)

    def access(self, expert: int, admit: bool = True) -> tuple[bool, list[int]]:
        """Use ``expert``: (hit, evicted). A miss makes it resident unless ``admit`` is False."""
        self._pending.discard(expert)
        self.policy.accessed(expert)
        if expert in self.resident:
            return True, []
        if not admit:
            return False, []
        return False, self._admit(expert)

    def serve(self, needed: list[int]) -> list[tuple[int, bool, list[int]]]:
        """Use each expert of ``needed`` (ascending, at most ``capacity`` of them) as one forward
        pass: (expert, hit, evicted) for each. All of them stay resident until the pass ends, so
        the store can start every miss's read at once and run the experts afterwards."""
        if len(needed) > self.capacity:
            raise ValueError(f"a pass of {len(needed)} experts cannot be held in {self.capacity} slots")
        held = set(needed)
        self._pending = set()
        served: list[tuple[int, bool, list[int]]] = []
        for expert in needed:
            self.policy.accessed(expert)
            if expert in self.resident:
                served.append((expert, True, []))
                continue
            evicted: list[int] = []
            while len(self.resident) >= self.capacity:
                victim = self.policy.victim(sorted(self.resident - held))
                self.resident.discard(victim)
                self.policy.removed(victim)
                evicted.append(victim)
            self.resident.add(expert)
            served.append((expert, False, evicted))
        return served

    def prefetch(self, expert: int, keep: int | None = None) -> list[int] | None:
        """Make ``expert`` resident ahead of use: the evicted experts, or None if no slot may be freed
        (announced experts not yet used, and ``keep``, are never evicted)."""
        if expert in self.resident or self.capacity == 0:
            return []
        if keep is not None and keep in self.resident:
            self._pending.add(keep)
        try:
            if len(self.resident) >= self.capacity and not (self.resident - self._pending):
                return None
            evicted = self._admit(expert, protect_all_pending=True)
        finally:
            if keep is not None:
                self._pending.discard(keep)
        self.policy.inserted(expert)
        return evicted

    def _admit(self, expert: int, protect_all_pending: bool = False) -> list[int]:
        if self.capacity == 0:
            return []
        evicted: list[int] = []
        while len(self.resident) >= self.capacity:
            free = sorted(self.resident - self._pending)
            if not free and not protect_all_pending:
                free = sorted(self.resident)
            victim = self.policy.victim(free)
            self.resident.discard(victim)
            self.policy.removed(victim)
            evicted.append(victim)
        self.resident.add(expert)
        return evicted
