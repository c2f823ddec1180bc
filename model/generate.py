"""Decoding: greedy and sampled next-token choice, a token stream, and a text stream with stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator, Iterator

import torch

from dsmoe.errors import UsageError
from dsmoe.model.cache import KVCache

if TYPE_CHECKING:
    from dsmoe.model.deepseek import DeepseekForCausalLM
    from dsmoe.model.tokenizer import Tokenizer


@dataclass
class SamplingSettings:
    """How to pick tokens. ``temperature`` 0 is greedy. Left unset, a reply stops after 256 new
    tokens (the CLI and the server pass their own limits)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Written so that NaN fails every check: a NaN comparison is always False.
        if not self.max_new_tokens >= 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.top_k >= 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise UsageError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")


class Sampler:
    """Turns one row of logits into a token id, with its own seeded random generator."""

    def __init__(self, settings: SamplingSettings) -> None:
        self.settings = settings
        self.generator = torch.Generator()
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        s = self.settings
        logits = logits.float().cpu()
        if s.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), dtype=torch.long)
            scores = logits[seen]
            logits[seen] = torch.where(scores > 0, scores / s.repetition_penalty, scores * s.repetition_penalty)
        if s.temperature == 0:
            return int(logits.argmax())
        logits = logits / s.temperature
        if s.top_k > 0:
            kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (always at least the top token).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def generate_ids(
    model: "DeepseekForCausalLM",
    prompt_ids: list[int],
    settings: SamplingSettings,
    cache: KVCache | None = None,
) -> Generator[int, None, None]:
    """Yield new token ids one by one; stops at ``max_new_tokens`` or a stop id (which is yielded).

    With a ``cache`` that already holds a prefix of ``prompt_ids``, only the rest is prefilled:
    a chat keeps its cache across turns this way.
    """
    steps = generate_steps(model, prompt_ids, settings, cache)
    try:
        for token, _ in steps:
            yield token
    finally:
        steps.close()


@torch.inference_mode()
def generate_steps(
    model: "DeepseekForCausalLM",
    prompt_ids: list[int],
    settings: SamplingSettings,
    cache: KVCache | None = None,
) -> Generator[tuple[int, torch.Tensor], None, None]:
    """``generate_ids`` with the logits each token was chosen from (a server's ``logprobs``)."""
    if not prompt_ids:
        raise UsageError("the prompt is empty")
    if settings.max_new_tokens == 0:
        return
    if cache is None:
        cache = model.new_cache(1, len(prompt_ids) + settings.max_new_tokens)
    if cache.length >= len(prompt_ids):
        cache.truncate(len(prompt_ids) - 1)  # always feed at least one token to get logits
    sampler = Sampler(settings)
    history = list(prompt_ids)
    device = model.device
    pending = torch.tensor([prompt_ids[cache.length:]], dtype=torch.long, device=device)
    for _ in range(settings.max_new_tokens):
        logits = model(pending, cache=cache, last_only=True)[0, -1]
        token = sampler(logits, history)
        history.append(token)
        yield token, logits
        if token in settings.stop_ids:
            return
        pending = torch.tensor([[token]], dtype=torch.long, device=device)


class TextStream:
    """Incremental detokenization that never shows half a character or part of a stop string."""

    def __init__(self, tokenizer: "Tokenizer", stop_strings: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far, cut before the first stop string."""
        text = self.tokenizer.decode(self.ids)
        cut = self._stop_at(text)
        return text if cut is None else text[:cut]

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def push(self, token: int) -> str:
        """Add one token; return the newly safe text (maybe empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            safe = cut
        else:
            safe = len(text)
            # An incomplete UTF-8 sequence at the end decodes to one U+FFFD: hold that one back for
            # its next byte. Any before it are bytes no later token can complete: they are text.
            if text.endswith("\ufffd"):
                safe -= 1
            for stop in self.stop_strings:  # hold back a tail that may grow into a stop string
                for n in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:n]):
                        safe = min(safe, len(text) - n)
                        break
        piece = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """The held-back tail once generation has ended without a stop string.

        A character the token limit cut stays as the decoder's U+FFFD, as lm-eval and Hugging Face
        keep it: dropping it would make a cut answer look complete.
        """
        text = self.text
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece


def stream_text(
    model: "DeepseekForCausalLM",
    tokenizer: "Tokenizer",
    prompt_ids: list[int],
    settings: SamplingSettings,
    stop_strings: list[str] | None = None,
    cache: KVCache | None = None,
    stream: TextStream | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are decoded; ends at eos, a stop string or the token limit.

    Pass your own ``stream`` to learn afterwards how many tokens came (``stream.ids``) and why it ended.
    """
    stream = stream or TextStream(tokenizer, stop_strings)
    for token in generate_ids(model, prompt_ids, settings, cache):
        if token in settings.stop_ids:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.flush()
    if tail:
        yield tail
