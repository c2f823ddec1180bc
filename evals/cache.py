"""Answers to lm-eval's requests, kept so a rerun of an interrupted evaluation scores only the rest.

This replaces lm-eval's ``CachingLM``, whose SqliteDict stores every answer as a pickle: a crafted
row in that database would run code on the next evaluation. Here an answer is plain typed data in
sqlite (a REAL log-probability, an INTEGER greedy flag, or TEXT), read back with type checks;
nothing is unpickled or evaluated, and a row of the wrong shape is reported as a corrupt cache.

Answers are committed in chunks while they are scored (sqlite transactions in WAL mode), so a run
killed at any instant, even with SIGKILL, keeps every chunk finished before it. Chunks are fixed
by position in the full request list, so a resumed run batches its requests exactly as an
uninterrupted one and gives the same numbers.

The database file is named by a key over the checkpoint's content (``checkpoint_fingerprint``)
and the settings that change scores, so new weights in the same folder never reuse old answers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM, CacheHook

from dsmoe.errors import EvalError

FORMAT_VERSION = 1
"""Part of every cache key: a change in what an answer means starts new cache files."""

CHUNK_REQUESTS = {"loglikelihood": 32, "loglikelihood_rolling": 4, "generate_until": 1}
"""Requests scored between commits: a kill loses at most one chunk of work."""

KINDS = tuple(CHUNK_REQUESTS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    kind TEXT NOT NULL, request TEXT NOT NULL, number REAL, flag INTEGER, text TEXT,
    PRIMARY KEY (kind, request)
) STRICT;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
"""


def cache_key(fingerprint: str, settings: dict[str, Any]) -> str:
    """16 hex digits over the checkpoint's fingerprint and the settings that change its answers."""
    text = json.dumps({"format": FORMAT_VERSION, "checkpoint": fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def request_key(kind: str, args: tuple[Any, ...]) -> str | None:
    """A request's identity: its kind and arguments as JSON (None when they are not plain data)."""
    try:
        text = json.dumps([kind, *args], sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EvalCache:
    """One sqlite file of answers; every failure to open, read or write it is an ``EvalError``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise self._unwritable(exc) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            # A write now, so a read-only file or folder fails before any scoring, not after it.
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError) and _is_write_failure(exc):
                raise self._unwritable(exc) from None
            raise self._corrupt(exc) from None

    def _unwritable(self, exc: BaseException) -> EvalError:
        return EvalError(f"{self.path}: cannot write the eval cache ({exc}); pass --cache-dir DIR or --no-cache")

    def _corrupt(self, detail: BaseException | str) -> EvalError:
        return EvalError(f"{self.path}: the eval cache is corrupt ({detail}); delete the file or pass --no-cache")

    def get(self, kind: str, keys: list[str]) -> dict[str, Any]:
        """The stored answers among ``keys`` (missing ones are absent), type-checked."""
        found: dict[str, Any] = {}
        try:
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT request, number, flag, text FROM answers WHERE kind = ? AND request IN ({marks})",
                    (kind, *part),
                )
                for request, number, flag, text in rows:
                    found[request] = self._decode(kind, number, flag, text)
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None
        return found

    def _decode(self, kind: str, number: Any, flag: Any, text: Any) -> Any:
        if kind == "loglikelihood" and type(number) is float and flag in (0, 1) and type(flag) is int:
            return (number, bool(flag))
        if kind == "loglikelihood_rolling" and type(number) is float:
            return number
        if kind == "generate_until" and type(text) is str:
            return text
        raise self._corrupt(f"a {kind} answer of the wrong type")

    def put(self, kind: str, answers: list[tuple[str, Any]]) -> None:
        """Store and commit answers (one transaction: all of them or, after a kill, none)."""
        rows = [(kind, key, *_encode(kind, answer)) for key, answer in answers]
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.OperationalError as exc:
            if _is_write_failure(exc):
                raise self._unwritable(exc) from None
            raise self._corrupt(exc) from None
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def _is_write_failure(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("readonly", "read-only", "unable to open", "disk", "full", "locked", "permission"))


def _encode(kind: str, answer: Any) -> tuple[float | None, int | None, str | None]:
    if kind == "loglikelihood":
        logprob, greedy = answer
        return float(logprob), int(bool(greedy)), None
    if kind == "loglikelihood_rolling":
        return float(answer), None, None
    return None, None, str(answer)


@dataclass
class CacheUse:
    """How many answers a run took from the cache and how many it scored."""

    reused: int = 0
    scored: int = 0


class CachedLM(LM):
    """Wraps a model so each request is answered from the cache when it can be, else scored and kept.

    Requests are scored in the same chunks with or without a cache (``cache=None``: nothing kept),
    so a cached, a resumed and an uncached run batch alike and give the same numbers. Sampled
    generations (``do_sample``) are never cached, as in lm-eval: repeats must differ.
    """

    def __init__(self, lm: LM, cache: EvalCache | None) -> None:
        super().__init__()
        self.lm = lm
        self.cache = cache
        self.use = CacheUse()
        lm.set_cache_hook(CacheHook(None))  # this wrapper stores answers; the model's own hook does nothing

    def __getattr__(self, name: str) -> Any:  # everything but the three request kinds is the model's
        lm = self.__dict__.get("lm")
        if lm is None:
            raise AttributeError(name)
        return getattr(lm, name)

    def get_model_info(self) -> dict[str, Any]:
        info = getattr(self.lm, "get_model_info", None)
        return info() if info is not None else {}

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.chat_template(chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.apply_chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.lm.tokenizer_name

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        return self._answer("loglikelihood", requests)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        return self._answer("loglikelihood_rolling", requests)

    def generate_until(self, requests: list[Any]) -> list[str]:
        return self._answer("generate_until", requests)

    def _answer(self, kind: str, requests: list[Any]) -> list[Any]:
        keys = [None if self.cache is None or _sampled(kind, r.args) else request_key(kind, r.args) for r in requests]
        found = {} if self.cache is None else self.cache.get(kind, [k for k in keys if k is not None])
        answers: list[Any] = [found.get(k) if k is not None else None for k in keys]
        self.use.reused += sum(a is not None for a in answers)
        done = sum(a is not None for a in answers)
        for chunk in _chunks(kind, requests):
            todo = [i for i in chunk if answers[i] is None]
            if not todo:
                continue
            with self._progress(kind, done, len(todo), len(requests)):
                scored = getattr(self.lm, kind)([requests[i] for i in todo])
            for i, answer in zip(todo, scored):
                answers[i] = answer
            if self.cache is not None:
                self.cache.put(kind, [(key, answers[i]) for i in todo if (key := keys[i]) is not None])
            self.use.scored += len(todo)
            done += len(todo)
        return answers

    def _progress(self, kind: str, done: int, size: int, total: int) -> _ChunkProgress:
        return _ChunkProgress(self.lm, kind, done, size, total)


class _ChunkProgress:
    """While one chunk is scored, the model's progress reports count toward the whole request list."""

    def __init__(self, lm: LM, kind: str, done: int, size: int, total: int) -> None:
        self.lm, self.kind, self.done, self.size, self.total = lm, kind, done, size, total
        self.outer: Callable[[str, int, int], None] | None = getattr(lm, "progress", None)

    def __enter__(self) -> None:
        outer = self.outer
        if outer is None:
            return
        outer(self.kind, self.done, self.total)

        def report(kind: str, done: int, total: int) -> None:
            outer(self.kind, self.done + round(self.size * done / max(total, 1)), self.total)

        self.lm.progress = report

    def __exit__(self, *exc: object) -> None:
        if self.outer is not None:
            self.lm.progress = self.outer


def _sampled(kind: str, args: tuple[Any, ...]) -> bool:
    return kind == "generate_until" and len(args) > 1 and isinstance(args[1], dict) and bool(args[1].get("do_sample"))


def _chunks(kind: str, requests: list[Any]) -> Iterator[list[int]]:
    """Positions in fixed chunks; loglikelihood chunks end only where the context changes, so the
    choices of one question are scored together (they share the context's cache)."""
    size = CHUNK_REQUESTS[kind]
    chunk: list[int] = []
    for i, request in enumerate(requests):
        if len(chunk) >= size and (kind != "loglikelihood" or request.args[0] != requests[i - 1].args[0]):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk
