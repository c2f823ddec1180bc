"""Routing traces: which experts each MoE layer chose, written as JSON lines, read back for replay.

The first line is a header (format, layers, experts, top-k, bytes per expert); each further line
is one forward pass of one layer: ``{"layer": 3, "ids": [[...k ids...], ...one row per token]}``,
with ``"guess"`` (the same shape) where an expert store's prefetcher guessed that routing from the
layer before, so that ``simulate`` replays the prefetch as well. Version 1 traces have no guesses.
A trace is written to a temporary file and renamed at the end, so it is never seen half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import torch

from dsmoe.errors import DsmoeError

if TYPE_CHECKING:
    from dsmoe.model.deepseek import DeepseekForCausalLM

FORMAT = "dsmoe-routing-trace"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class TraceError(DsmoeError):
    """A routing trace file is missing, truncated, or not a dsmoe trace."""


@dataclass(frozen=True)
class TraceHeader:
    moe_layers: list[int]
    n_experts: int
    top_k: int
    expert_bytes: int
    model: str = ""

    @classmethod
    def for_model(cls, model: "DeepseekForCausalLM", expert_bytes: int | None, name: str = "") -> "TraceHeader":
        """The header for a run of ``model``; ``expert_bytes`` defaults to its first expert's size in memory."""
        moes = model.moe_layers()
        if not moes:
            raise TraceError("this model has no MoE layers, so there is no routing to trace")
        if expert_bytes is None:
            expert = moes[0].experts[0]
            expert_bytes = sum(t.numel() * t.element_size() for t in [*expert.parameters(), *expert.buffers()])
        config = model.config
        return cls([m.layer_idx for m in moes], config.n_routed_experts or 0, config.num_experts_per_tok or 0,
                   expert_bytes, name)


class Routing(NamedTuple):
    """One forward pass of one MoE layer."""

    layer: int
    ids: list[list[int]]
    """The routed expert ids, one row of top-k per token."""
    guess: list[list[int]] | None = None
    """What the prefetcher guessed ``ids`` would be, before the layer ran (None: no guess made)."""


@dataclass(frozen=True)
class Trace:
    header: TraceHeader
    events: list[Routing]
    """Each forward pass of each MoE layer, in run order."""

    @property
    def tokens(self) -> int:
        """Tokens processed: the rows routed by the first MoE layer."""
        first = self.header.moe_layers[0]
        return sum(len(event.ids) for event in self.events if event.layer == first)

    @property
    def has_guesses(self) -> bool:
        """Whether a prefetcher's guesses were recorded (a run with an expert store that prefetched)."""
        return any(event.guess is not None for event in self.events)


class TraceRecorder:
    """A routing observer that streams every MoE layer's choices to ``path`` (atomic on ``close``);
    ``guessed`` is its guess observer (``model.set_routing_observer(recorder, recorder.guessed)``)."""

    def __init__(self, path: str | os.PathLike[str], header: TraceHeader) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self._file: TextIO | None = self._tmp.open("w", encoding="utf-8")
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot write the trace ({exc.strerror})") from None
        head = {"format": FORMAT, "version": VERSION, **header.__dict__}
        self._file.write(json.dumps(head) + "\n")
        self._guesses: dict[int, list[list[int]]] = {}

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        if self._file is not None:
            record: dict[str, Any] = {"layer": layer, "ids": ids.tolist()}
            guess = self._guesses.pop(layer, None)
            if guess is not None:
                record["guess"] = guess
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def guessed(self, layer: int, ids: torch.Tensor) -> None:
        """A guess of ``layer``'s next routing: written with that routing when it comes."""
        self._guesses[layer] = ids.tolist()

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial trace (an interrupted run leaves nothing behind)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def read_trace(path: str | os.PathLike[str]) -> Trace:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot be read ({exc})") from None
    try:
        head = json.loads(lines[0]) if lines else None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise TraceError(f"{path}: not a dsmoe routing trace (record one with 'dsmoe generate --trace FILE')")
        if head.get("version") not in READABLE_VERSIONS:
            raise TraceError(f"{path}: trace version {head.get('version')} is not supported "
                             f"(this dsmoe reads {' and '.join(map(str, READABLE_VERSIONS))})")
        header = TraceHeader(moe_layers=[int(x) for x in head["moe_layers"]], n_experts=int(head["n_experts"]),
                             top_k=int(head["top_k"]), expert_bytes=int(head["expert_bytes"]),
                             model=str(head.get("model", "")))
        known = set(header.moe_layers)
        events = []
        for number, line in enumerate(lines[1:], start=2):
            record = json.loads(line)
            layer, ids, guess = int(record["layer"]), record["ids"], record.get("guess")
            rows = ids + (guess or [])
            if layer not in known or any(not 0 <= int(e) < header.n_experts for row in rows for e in row):
                raise TraceError(f"{path}:{number}: layer or expert id out of range for this trace's model")
            events.append(Routing(layer, ids, guess))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: corrupted trace ({type(exc).__name__}: {exc})") from None
    if not header.moe_layers:
        raise TraceError(f"{path}: the trace names no MoE layers")
    return Trace(header, events)
