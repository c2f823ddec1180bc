"""The model side of the server: prompts to token ids, decoding with one reused KV cache, logprobs.

One engine is driven by one worker thread, so nothing here locks. The KV cache is kept between
requests: a request that starts with what the cache holds (a chat that extends the previous
conversation, lm-eval's choices after one shared question) prefills only the rest. For chats the
model's own reply ids are kept as ChatSession does, since a reply's text may re-tokenize differently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Union

import torch

from dsmoe.errors import UsageError
from dsmoe.model.chat import common_prefix, encode_after, ids_spelling
from dsmoe.model.generate import SamplingSettings, TextStream, generate_steps
from dsmoe.serve.schema import ApiError

if TYPE_CHECKING:
    from dsmoe.model.deepseek import DeepseekForCausalLM
    from dsmoe.model.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    """One token as text, its log-probability (None for a prompt's first token) and the likeliest alternatives."""

    token: str
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class Generation:
    """One prompt to continue: what the worker runs for a request (a completion may carry several)."""

    prompt_ids: list[int]
    settings: SamplingSettings
    stop_strings: list[str] = field(default_factory=list)
    logprobs: int | None = None
    """Top alternatives per token; None for no logprobs at all."""
    echo: bool = False
    messages: list[dict[str, str]] | None = None
    """Set for a chat: the conversation, so its ids can be reused by the next request."""


@dataclass
class Piece:
    """Newly decoded text of prompt ``index``."""

    index: int
    text: str


@dataclass
class Finished:
    """The end of prompt ``index``: why it stopped, token counts, timings and the logprobs asked for."""

    index: int
    finish_reason: str
    prompt_tokens: int
    reused_tokens: int
    completion_tokens: int
    text: str
    seconds: float
    first_token_seconds: float | None
    prompt_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        """Decoding speed, prefill excluded (as the chat stats line reports it)."""
        decode = self.seconds - (self.first_token_seconds or 0.0)
        if self.completion_tokens > 1 and decode > 0:
            return (self.completion_tokens - 1) / decode
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


Event = Union[Piece, Finished]


class Engine:
    """Runs generations on one model with one KV cache; ``context`` bounds prompt + new tokens."""

    def __init__(self, model: "DeepseekForCausalLM", tokenizer: "Tokenizer", context: int | None = None,
                 default_max_tokens: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        limit = model.config.max_position_embeddings
        self.context = context or limit
        if not 2 <= self.context <= limit:
            raise UsageError(f"the context must be 2 to {limit} tokens (the model's positions), got {self.context}")
        self.default_max_tokens = default_max_tokens
        extra_eos = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        self.stop_ids = sorted(set(model.config.eos_token_ids) | extra_eos)
        self.cache = model.new_cache(1, min(self.context, 256))
        self.cached_ids: list[int] = []
        self._history_text = ""
        self._history_ids: list[int] = []
        self._scores: list[TokenLogprob] = []  # the last echo request's prompt entries, for its prefix
        self._scored_ids: list[int] = []
        self._scored_top = 0

    # ------------------------------------------------------------------ preparing (request thread)

    def encode_prompt(self, prompt: Union[str, list[int]]) -> list[int]:
        """Text gets bos as ``dsmoe generate`` gives it; ids are taken as they are, checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        if not prompt:
            raise ApiError(400, "a prompt has no tokens", param="prompt")
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The request's token limit, or the default cut to the room left; 400 when it cannot fit."""
        if prompt_tokens >= self.context:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and the context holds {self.context}",
                           code="context_length_exceeded", param="messages")
        room = self.context - prompt_tokens
        if requested is None:
            return min(self.default_max_tokens, room)
        if requested > room:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {requested}: "
                                f"{prompt_tokens + requested} exceeds the context of {self.context}",
                           code="context_length_exceeded", param="max_tokens")
        return requested

    def sampling(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 repetition_penalty: float, seed: int | None, ignore_eos: bool = False) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed,
                                stop_ids=[] if ignore_eos else self.stop_ids)

    # ------------------------------------------------------------------ running (worker thread)

    def run(self, index: int, job: Generation, should_stop: Callable[[], bool]) -> Iterator[Event]:
        """Decode one prompt, yielding text pieces and then its ``Finished``; stops early when ``should_stop``."""
        started = time.perf_counter()
        prompt = job.prompt_ids
        if job.messages is not None:
            prompt = self._chat_ids(job.messages, prompt, job.settings.max_new_tokens)
        prompt_logprobs = None
        if job.echo and job.logprobs is not None:
            prompt_logprobs, reused = self._score_prompt(prompt, job.logprobs)
        else:
            reused = common_prefix(self.cached_ids, prompt)
            self.cache.truncate(reused)
            reused = min(reused, len(prompt) - 1)  # the last prompt token is always fed, for its logits
        stream = TextStream(self.tokenizer, job.stop_strings)
        generated: list[int] = []
        token_logprobs: list[TokenLogprob] | None = [] if job.logprobs is not None else None
        text: list[str] = []
        first: float | None = None
        finish = "length"
        steps = generate_steps(self.model, prompt, job.settings, self.cache)
        try:
            for token, logits in steps:
                first = first or time.perf_counter()
                generated.append(token)
                if token in job.settings.stop_ids:
                    finish = "stop"
                    break
                if token_logprobs is not None:
                    token_logprobs.append(self._entry(logits, token, job.logprobs or 0))
                piece = stream.push(token)
                if job.messages is not None and not text:
                    piece = piece.lstrip()  # the template puts the space after "Assistant:" in the reply
                if piece:
                    text.append(piece)
                    yield Piece(index, piece)
                if stream.stopped:
                    finish = "stop"
                    break
                if should_stop():
                    finish = "cancelled"
                    break
        finally:
            steps.close()
            self.cached_ids = (prompt + generated)[: self.cache.length]
        if not stream.stopped and finish != "cancelled":
            tail = stream.flush()
            if job.messages is not None and not text:
                tail = tail.lstrip()
            if tail:
                text.append(tail)
                yield Piece(index, tail)
        reply = "".join(text)
        if job.messages is not None:
            self._remember_chat(job.messages, reply, prompt + generated)
        yield Finished(
            index=index, finish_reason=finish, prompt_tokens=len(prompt), reused_tokens=reused,
            completion_tokens=len(generated), text=reply, seconds=time.perf_counter() - started,
            first_token_seconds=None if first is None else first - started,
            prompt_logprobs=prompt_logprobs, logprobs=token_logprobs,
        )

    def _chat_ids(self, messages: list[dict[str, str]], plain: list[int], max_new: int) -> list[int]:
        """The prompt with the previous reply's own ids when this chat extends the last one."""
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        ids = encode_after(self.tokenizer, text, self._history_text, self._history_ids)
        return ids if len(ids) + max_new <= self.context else plain

    def _remember_chat(self, messages: list[dict[str, str]], reply: str, ids: list[int]) -> None:
        text = self.tokenizer.render_chat(messages + [{"role": "assistant", "content": reply}],
                                          add_generation_prompt=False)
        self._history_ids = ids_spelling(self.tokenizer, ids, text)
        self._history_text = text if self._history_ids else ""

    @torch.inference_mode()
    def _score_prompt(self, prompt: list[int], top: int) -> tuple[list[TokenLogprob], int]:
        """Every prompt token's log-probability, and how many positions came from the cache (which then holds the prompt).

        Token i's entry depends on the tokens before it only, so entries of a prefix scored by the
        last echo request are kept: lm-eval's choices of one question differ in their last tokens,
        and only those are computed again.
        """
        known = common_prefix(self._scored_ids, prompt) if top == self._scored_top else 0
        known = min(known, common_prefix(self.cached_ids, prompt) + 1, len(prompt) - 1)
        start = max(known - 1, 0)  # token i's log-probability comes from the logits at position i - 1
        self.cache.truncate(start)
        ids = torch.tensor([prompt[start:]], dtype=torch.long, device=self.model.device)
        logits = self.model(ids, cache=self.cache)[0]
        self.cached_ids = list(prompt)
        entries = self._scores[:known] or [TokenLogprob(self._token(prompt[0]), None, None)]
        first = len(entries)
        logprobs = torch.log_softmax(logits[first - 1 - start:-1].float(), dim=-1)
        targets = torch.tensor(prompt[first:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
        tops = torch.topk(logprobs, top, dim=-1) if top else None
        for i, token in enumerate(prompt[first:]):
            alternatives = None
            if tops is not None:
                alternatives = {self._token(int(t)): float(v) for t, v in zip(tops.indices[i], tops.values[i])}
            entries.append(TokenLogprob(self._token(token), chosen[i], alternatives))
        self._scores, self._scored_ids, self._scored_top = entries, list(prompt), top
        return list(entries), start

    def _entry(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        alternatives = None
        if top:
            values, indices = torch.topk(logprobs, top)
            alternatives = {self._token(int(t)): float(v) for t, v in zip(indices, values)}
        return TokenLogprob(self._token(token), float(logprobs[token]), alternatives)

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def echo_text(self, prompt: Union[str, list[int]]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
