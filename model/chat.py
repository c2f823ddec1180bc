"""A multi-turn chat that keeps its KV cache across turns, so each turn prefills only what is new.

Each turn renders the whole conversation with the checkpoint's chat template. When the text
so far is unchanged, the new prompt is the ids of the conversation so far (the model's own reply
ids included, which may differ from how the reply text re-tokenizes) plus the encoded new text,
so the cache covers all but the new turn. The session also tracks which ids sit in the cache and
keeps only the common prefix with the new prompt, so the cache stays right whatever happened
(dropped turns, a reply cut by Ctrl-C, a loaded transcript).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator, Iterator

import psutil

from dsmoe.errors import UsageError
from dsmoe.model.generate import SamplingSettings, TextStream, generate_ids

if TYPE_CHECKING:
    from types import TracebackType

    from dsmoe.model.deepseek import DeepseekForCausalLM
    from dsmoe.model.tokenizer import Tokenizer

CacheStats = Callable[[], "float | None"]
"""Returns the expert-cache hit rate in [0, 1], or None while it has nothing to report."""

TRANSCRIPT_FORMAT = "dsmoe-chat"
TRANSCRIPT_VERSION = 1

# What ``ChatSession.set`` accepts, and how each value is parsed from text.
SETTABLE: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_new_tokens": int,
    "repetition_penalty": float,
    "seed": int,
}

_ROLES = ("system", "user", "assistant")


@dataclass
class ReplyStats:
    """What one reply cost; ``time_to_first_token`` is None when no token came."""

    prompt_tokens: int
    prefilled_tokens: int
    new_tokens: int
    time_to_first_token: float | None
    seconds: float
    tokens_per_second: float
    cache_hit_rate: float | None
    rss_bytes: int
    interrupted: bool
    cut_off: bool = False
    """The reply ended because it reached its token limit (max_new_tokens, or the room left in the context)."""


@dataclass
class SessionStats:
    """The state of the whole conversation, for ``/stats``."""

    turns: int
    context_tokens: int
    context_limit: int
    cached_tokens: int
    kv_cache_bytes: int
    replies: int
    generated_tokens: int
    settings: SamplingSettings
    cache_hit_rate: float | None
    rss_bytes: int


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_after(tokenizer: "Tokenizer", text: str, history_text: str, history_ids: list[int]) -> list[int]:
    """The ids of a rendered conversation, reusing ``history_ids`` where ``text`` extends ``history_text``."""
    if history_ids and text.startswith(history_text):
        return history_ids + tokenizer.encode(text[len(history_text):], add_bos=False)
    return tokenizer.encode(text, add_bos=False)


def ids_spelling(tokenizer: "Tokenizer", ids: list[int], text: str) -> list[int]:
    """``ids`` (or ``ids`` plus eos, for a reply cut before it) if they decode to exactly ``text``, else []."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for candidate in (ids, ids + eos):
        if tokenizer.decode(candidate, skip_special_tokens=False) == text:
            return candidate
    return []


def rss_bytes() -> int:
    """Resident memory of this process: what the machine is really giving the model."""
    return int(psutil.Process().memory_info().rss)


class Reply:
    """One assistant turn: iterate it for text pieces as they are decoded; ``stats`` once done.

    Leaving it early (``close``, or the end of a ``with`` block, or Ctrl-C) keeps the partial
    reply in the conversation, so what the user saw is what the model remembers.
    """

    def __init__(
        self, session: "ChatSession", prompt: list[int], reused: int, settings: SamplingSettings, dropped_turns: int
    ) -> None:
        self.dropped_turns = dropped_turns
        self.prompt_ids = prompt
        self.token_ids: list[int] = []  # what the model generated, the stop id included
        self.stats: ReplyStats | None = None
        self.text = ""
        self._session = session
        self._prefilled = len(prompt) - min(reused, len(prompt) - 1)  # generate_ids always feeds one
        self._settings = settings
        self._started = time.perf_counter()
        self._first: float | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __enter__(self) -> "Reply":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: "TracebackType | None") -> None:
        self.close()

    @property
    def done(self) -> bool:
        return self.stats is not None

    def close(self) -> None:
        """Stop generating and record the reply as far as it got."""
        self._pieces.close()
        if not self.done:  # never iterated, so the generator's own cleanup never ran
            self._finish(interrupted=True)

    def _run(self) -> Generator[str, None, None]:
        completed = False
        stream = TextStream(self._session.tokenizer)
        tokens = generate_ids(self._session.model, self.prompt_ids, self._settings, cache=self._session.cache)
        try:
            shown = False
            for token in tokens:
                self._first = self._first or time.perf_counter()
                self.token_ids.append(token)
                if token in self._settings.stop_ids:
                    break
                piece = stream.push(token)
                if not shown:  # the template puts the space after "Assistant:" in the reply
                    piece = piece.lstrip()
                shown = shown or bool(piece)
                if piece:
                    yield piece
            tail = stream.flush() if shown else stream.flush().lstrip()
            if tail:
                yield tail
            completed = True
        finally:
            tokens.close()
            self._finish(interrupted=not completed)

    def _finish(self, interrupted: bool) -> None:
        cut_off = (not interrupted and len(self.token_ids) >= self._settings.max_new_tokens
                   and not (self.token_ids and self.token_ids[-1] in self._settings.stop_ids))
        elapsed = time.perf_counter() - self._started
        ttft = None if self._first is None else self._first - self._started
        body = [t for t in self.token_ids if t not in self._settings.stop_ids]
        decode_time = elapsed - (ttft or 0.0)
        if len(self.token_ids) > 1 and decode_time > 0:
            rate = (len(self.token_ids) - 1) / decode_time  # decoding speed, prefill excluded
        else:
            rate = len(self.token_ids) / elapsed if elapsed > 0 else 0.0
        self.text = self._session.tokenizer.decode(body).lstrip()
        session = self._session
        session._commit(self.prompt_ids + self.token_ids, self.text, len(self.token_ids))
        self.stats = ReplyStats(
            prompt_tokens=len(self.prompt_ids),
            prefilled_tokens=self._prefilled,
            new_tokens=len(self.token_ids),
            time_to_first_token=ttft,
            seconds=elapsed,
            tokens_per_second=rate,
            cache_hit_rate=session.cache_hit_rate(),
            rss_bytes=rss_bytes(),
            interrupted=interrupted,
            cut_off=cut_off,
        )


class ChatSession:
    """A conversation with one model: the messages, the KV cache, and the sampling settings.

    ``context_limit`` defaults to the model's ``max_position_embeddings``; when a new prompt and
    room for the reply no longer fit, the oldest turns are dropped (the system prompt stays).
    ``cache_stats`` lets an expert store report its hit rate on the stats line.
    """

    def __init__(
        self,
        model: "DeepseekForCausalLM",
        tokenizer: "Tokenizer",
        settings: SamplingSettings | None = None,
        system: str | None = None,
        context_limit: int | None = None,
        cache_stats: CacheStats | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system or None
        self.context_limit = context_limit or model.config.max_position_embeddings
        if self.context_limit < 2:
            raise UsageError(f"context limit must be at least 2 tokens, got {self.context_limit}")
        self.cache_stats = cache_stats
        self.settings = self._with_stops(settings or SamplingSettings())
        self.turns: list[dict[str, str]] = []
        self.cache = model.new_cache(1, min(self.context_limit, 256))
        self._cached_ids: list[int] = []
        # The conversation so far as ids and as the exact text they stand for (see _encode).
        self._history_ids: list[int] = []
        self._history_text = ""
        self._open: Reply | None = None
        self.replies = 0
        self.generated_tokens = 0

    def _with_stops(self, settings: SamplingSettings) -> SamplingSettings:
        # The template ends every assistant turn with eos, so a reply always stops there.
        stops = set(settings.stop_ids) | set(self.model.config.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            stops.add(self.tokenizer.eos_id)
        return replace(settings, stop_ids=sorted(stops))

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation as the chat template sees it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.turns]

    def cache_hit_rate(self) -> float | None:
        return self.cache_stats() if self.cache_stats is not None else None

    def ask(self, text: str) -> Reply:
        """Add a user message and start the reply; older turns are dropped if the context is full.

        Raises UsageError (and leaves the conversation as it was) when the message cannot fit even
        alone.
        """
        if not text.strip():
            raise UsageError("the message is empty")
        if self._open is not None:
            self._open.close()
        message = {"role": "user", "content": text}
        alone = len(self.tokenizer.encode_chat(self.messages[: 1 if self.system else 0] + [message]))
        if alone >= self.context_limit:
            raise UsageError(
                f"the message does not fit: its prompt is {alone} tokens and the context holds {self.context_limit}"
            )
        self.turns.append(message)
        # Leave room for a reply: all of max_new_tokens, but never more than a quarter of the
        # context, or a large limit would drop every earlier turn.
        reserve = min(self.settings.max_new_tokens, self.context_limit // 4)
        dropped = 0
        prompt = self._encode()
        while len(prompt) + reserve > self.context_limit and len(self.turns) > 1:
            self._drop_oldest_turn()
            dropped += 1
            prompt = self._encode()
        reused = common_prefix(self._cached_ids, prompt)
        self.cache.truncate(reused)
        room = self.context_limit - len(prompt)
        settings = replace(self.settings, max_new_tokens=min(self.settings.max_new_tokens, room))
        self._open = Reply(self, prompt, reused, settings, dropped)
        return self._open

    def _encode(self) -> list[int]:
        """The prompt ids for the conversation plus a generation prompt, reusing the history's ids."""
        text = self.tokenizer.render_chat(self.messages, add_generation_prompt=True)
        return encode_after(self.tokenizer, text, self._history_text, self._history_ids)

    def _drop_oldest_turn(self) -> None:
        """Drop the first user message and the replies that follow it."""
        del self.turns[0]
        while len(self.turns) > 1 and self.turns[0]["role"] != "user":
            del self.turns[0]

    def _commit(self, ids: list[int], reply: str, generated: int) -> None:
        """Called once per reply: store it and record which ids the cache now really holds."""
        self.turns.append({"role": "assistant", "content": reply})
        # The cache holds a prefix of prompt + generated: the last token made is never fed back,
        # and a Ctrl-C may land anywhere, so its length is the only truth.
        self._cached_ids = ids[: self.cache.length]
        self._remember_history(ids)
        self.replies += 1
        self.generated_tokens += generated
        self._open = None

    def _remember_history(self, ids: list[int]) -> None:
        """Keep the reply's own ids for the next prompt if they spell exactly the rendered text.

        A reply cut short (Ctrl-C, token limit) lacks the eos the template closes the turn with,
        so that is tried too. Otherwise the next prompt is encoded from text alone.
        """
        text = self.tokenizer.render_chat(self.messages, add_generation_prompt=False)
        self._history_ids = ids_spelling(self.tokenizer, ids, text)
        self._history_text = text if self._history_ids else ""

    def reset(self) -> None:
        """Forget every turn (the system prompt stays) and empty the cache."""
        if self._open is not None:
            self._open.close()
        self.turns = []
        self.cache.truncate(0)
        self._cached_ids = []
        self._history_ids, self._history_text = [], ""

    def set(self, name: str, value: str) -> SamplingSettings:
        """Change one sampling setting from its text form; UsageError names what is wrong."""
        kind = SETTABLE.get(name)
        if kind is None:
            raise UsageError(f"unknown setting {name!r} (choose {', '.join(SETTABLE)})")
        try:
            parsed = kind(value)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise UsageError(f"{name} must be {noun}, got {value!r}") from None
        self.settings = replace(self.settings, **{name: parsed})  # validated by SamplingSettings
        return self.settings

    def context_tokens(self) -> int:
        """How many tokens the conversation takes: the ids the next prompt builds on when they are known."""
        if self._history_ids:
            return len(self._history_ids)
        return len(self.tokenizer.encode_chat(self.messages, add_generation_prompt=False)) if self.messages else 0

    def stats(self) -> SessionStats:
        return SessionStats(
            turns=sum(1 for m in self.turns if m["role"] == "user"),
            context_tokens=self.context_tokens(),
            context_limit=self.context_limit,
            cached_tokens=self.cache.length,
            kv_cache_bytes=self.cache.nbytes(),
            replies=self.replies,
            generated_tokens=self.generated_tokens,
            settings=self.settings,
            cache_hit_rate=self.cache_hit_rate(),
            rss_bytes=rss_bytes(),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the transcript as JSON, through a temporary file so a crash never leaves half a file."""
        target = Path(path).expanduser()
        settings = {name: getattr(self.settings, name) for name in SETTABLE if getattr(self.settings, name) is not None}
        data = {"format": TRANSCRIPT_FORMAT, "version": TRANSCRIPT_VERSION, "messages": self.messages,
                "settings": settings}
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
                f.write("\n")
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None
        return target

    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace the conversation with a saved transcript; returns how many messages it had."""
        source = Path(path).expanduser()
        if source.exists() and not source.is_file():  # a folder, a FIFO or /dev/zero: nothing to read, or no end
            raise UsageError(f"cannot read {source}: not a regular file")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: not valid JSON ({exc})") from None
        except RecursionError:
            raise UsageError(f"{source}: not a dsmoe chat transcript (nested too deeply)") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("format") != TRANSCRIPT_FORMAT or not isinstance(messages, list):
            raise UsageError(f"{source}: not a dsmoe chat transcript")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
                raise UsageError(f"{source}: message {i + 1} needs a role ({', '.join(_ROLES)}) and a text content")
            if m["role"] == "system" and i > 0:
                raise UsageError(f"{source}: only the first message may be a system prompt")
        settings = self._saved_settings(source, data.get("settings"))
        self.reset()
        self.settings = settings
        if messages and messages[0]["role"] == "system":
            self.system = messages[0]["content"] or None
            messages = messages[1:]
        else:
            self.system = None
        self.turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        return len(messages) + (1 if self.system else 0)

    def _saved_settings(self, source: Path, saved: object) -> SamplingSettings:
        """The sampling settings a transcript was saved with, checked as ``/set`` checks them."""
        if saved is None:
            return self.settings
        if not isinstance(saved, dict):
            raise UsageError(f"{source}: 'settings' must be an object")
        values = {}
        for name, value in saved.items():
            kind = SETTABLE.get(name)
            if kind is None or isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and not isinstance(value, int)):
                raise UsageError(f"{source}: setting {name!r} = {value!r} is not one /set takes")
            values[name] = kind(value)
        try:
            return replace(self.settings, **values)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None
