"""lm-eval's model interface over our runtime, registered with lm-eval as ``dsmoe``.

Token boundaries follow lm-eval's Hugging Face model (encode context + continuation whole and
split at the context's length), so our scores are comparable with ``--model hf`` runs. The
choices of one multiple-choice question share their context: its keys and values are computed
once and the continuations are scored against copies of that cache, which is where most of an
MMLU run's time goes otherwise; when every choice is one token (MMLU's letters), one row per
question gives all its choices, and the questions are batched, longest first, as lm-eval's HF
model does. The lm_head projects only the positions that are scored.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, Callable

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsmoe.errors import EvalError
from dsmoe.loading import LoadOptions, load
from dsmoe.model.generate import SamplingSettings, stream_text

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from dsmoe.model.deepseek import DeepseekForCausalLM
    from dsmoe.model.tokenizer import Tokenizer

Progress = Callable[[str, int, int], None]
"""Called as ``progress(request_kind, done, total)`` while requests are answered."""

TokenPair = tuple[list[int], list[int]]

DEFAULT_MAX_GEN_TOKS = 256
WARMUP_SECONDS = 3.0
"""How long the first work of a request kind runs before its projected time is reported (none when
the work is done by then)."""


@dataclass(frozen=True)
class Estimate:
    """What one request kind will cost: reported at its start, then again after a short warm-up."""

    kind: str
    requests: int
    """Requests this model computes (ones lm-eval's cache answered never reach it)."""
    tokens: int
    """Tokens the model will read (generation: prompts plus the token limit, an upper bound)."""
    warmup_tokens: int = 0
    warmup_seconds: float = 0.0

    @property
    def projected_seconds(self) -> float | None:
        """The whole kind's time at the warm-up's rate, or None before the warm-up."""
        if self.warmup_seconds <= 0 or self.warmup_tokens <= 0:
            return None
        return self.tokens * self.warmup_seconds / self.warmup_tokens


class _Meter:
    """Counts a request kind's work; reports its estimate at the start and once after the warm-up."""

    def __init__(self, lm: DsmoeLM, kind: str, requests: int, tokens: int) -> None:
        self.lm, self.kind, self.requests, self.tokens = lm, kind, requests, tokens
        self.started = time.perf_counter()
        self.tokens_done = 0
        self.warmed = False
        if lm.estimate is not None and requests:
            lm.estimate(Estimate(kind, requests, tokens))

    def step(self, done: int, tokens: int) -> None:
        self.tokens_done += tokens
        seconds = time.perf_counter() - self.started
        if not self.warmed and seconds >= WARMUP_SECONDS and done < self.requests:
            self.warmed = True
            if self.lm.estimate is not None:
                self.lm.estimate(Estimate(self.kind, self.requests, self.tokens, self.tokens_done, seconds))
        self.lm._report(self.kind, done, self.requests)


@register_model("dsmoe")
class DsmoeLM(LM):
    """Answers lm-eval's three request kinds with a DeepSeekMoE model loaded by ``dsmoe.load``."""

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        share_context: bool = True,
        rolling_double_bos: bool = False,
        model: DeepseekForCausalLM | None = None,
        tokenizer: Tokenizer | None = None,
        progress: Progress | None = None,
        estimate: Callable[[Estimate], None] | None = None,
        **extra: Any,
    ) -> None:
        """``extra`` are the loading settings (``LoadOptions.from_model_args``: dtype, bits, expert budgets...).

        ``rolling_double_bos``: score perplexity documents as lm-eval's HF model does with this
        BOS-adding tokenizer (the document encoded with its BOS, another BOS in front, so p(BOS | BOS)
        counts too), for comparing with published lm-eval numbers; the default scores p(text | BOS).
        """
        super().__init__()
        # lm-eval's harness adds these for every model; they mean nothing on our single device.
        for harness_arg in ("device", "max_batch_size"):
            extra.pop(harness_arg, None)
        if model is None:
            if pretrained is None:
                raise EvalError("the dsmoe model needs pretrained=<checkpoint folder or repo id>")
            model, tokenizer = _load(pretrained, extra)
        elif extra:
            raise EvalError(f"unknown dsmoe model argument(s): {', '.join(sorted(extra))}")
        if tokenizer is None:
            raise EvalError("this checkpoint has no tokenizer.json; lm-eval tasks need text in and out")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _parse_batch_size(batch_size)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.share_context = _parse_bool(share_context)
        self.rolling_double_bos = _parse_bool(rolling_double_bos)
        self.progress = progress
        self.estimate = estimate
        self.answered: Counter[str] = Counter()
        """Requests of each kind this model computed (the rest of a run came from a cache)."""
        prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix_id is None:
            raise EvalError("the tokenizer has neither a BOS nor an EOS token to start a context with")
        self.prefix_id: int = prefix_id
        self.stop_ids = list(model.config.eos_token_ids)

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        self.answered["loglikelihood"] += len(requests)
        pairs = [self._encode_pair(context, continuation) for context, continuation in (r.args for r in requests)]
        results = self.score_pairs(pairs, kind="loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def _encode_pair(self, context: str, continuation: str) -> TokenPair:
        """Token ids of context and continuation as lm-eval's HF model makes them."""
        if context == "":
            cont = self.tokenizer.encode(continuation, add_bos=False)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:  # trailing spaces belong to the continuation, so words tokenize as words
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode_text(context + continuation)
        context_ids = self.encode_text(context)
        return context_ids, whole[len(context_ids):]

    def encode_text(self, text: str) -> list[int]:
        """The tokenizer's encoding, without adding a BOS when the text already starts with the BOS
        token's text (a chat template writes it), as lm-eval's HF model does."""
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)

    def score_pairs(self, pairs: list[TokenPair], kind: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each continuation, whether greedy decoding yields it)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        shared: dict[tuple[int, ...], list[int]] = defaultdict(list)
        alone: list[int] = []
        for i, (context, continuation) in enumerate(pairs):
            if len(continuation) > self.max_length:  # lm-eval's HF model refuses these too
                raise EvalError(f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}")
            if not continuation:
                results[i] = (0.0, True)
            elif self.share_context:
                # The context as the model will see it after left-truncation, so choices of equal
                # length still share it when a long few-shot prompt is cut.
                visible = (context + continuation)[-(self.max_length + 1):][:-len(continuation)]
                shared[tuple(visible)].append(i)
            else:
                alone.append(i)
        # One-token choices (MMLU's letters) all read the logits after their context: one row per
        # context, and the contexts of several questions share a batch.
        one_token = [seen for seen, members in shared.items() if all(len(pairs[i][1]) == 1 for i in members)]
        last_rows = {seen: shared.pop(seen) for seen in one_token}
        # A longer context asked once gains nothing from a cache: score it with the unshared batches.
        for seen, members in list(shared.items()):
            if len(members) == 1:
                alone.extend(shared.pop(seen))

        def row_length(i: int) -> int:
            return min(len(pairs[i][0]) + len(pairs[i][1]) - 1, self.max_length)

        # Work units, longest first like lm-eval's HF model, so an out-of-memory batch shows up at once
        # and each batch holds rows of similar length (little padding).
        units: list[tuple[int, Callable[[], int]]] = []
        alone.sort(key=lambda i: -row_length(i))
        for start in range(0, len(alone), self.batch_size):
            batch = alone[start:start + self.batch_size]
            units.append((row_length(batch[0]), partial(self._unshared_unit, pairs, batch, results)))
        contexts = sorted(last_rows, key=len, reverse=True)
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            units.append((len(chunk[0]), partial(self._last_row_unit, pairs, chunk, last_rows, results)))
        for seen, members in shared.items():
            units.append((len(seen), partial(self._shared_unit, pairs, seen, members, results)))
        units.sort(key=lambda unit: -unit[0])

        tokens = sum(row_length(i) for i in alone) + sum(len(c) for c in last_rows)
        tokens += sum(len(seen) - 1 + sum(len(pairs[i][1]) for i in members) for seen, members in shared.items())
        todo = sum(r is None for r in results)
        meter = _Meter(self, kind, todo, tokens)
        done = 0
        with torch.inference_mode():
            for _, unit in units:
                before = sum(r is not None for r in results)
                fed = unit()
                done += sum(r is not None for r in results) - before
                meter.step(done, fed)
        return results  # type: ignore[return-value]  # every request was answered above: no None left

    def _unshared_unit(self, pairs: list[TokenPair], batch: list[int], results: list) -> int:
        """Each pair as its own row: the model reads context + continuation, left-truncated."""
        rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
        lengths = [len(pairs[i][1]) for i in batch]
        width = max(lengths)
        # The continuation's positions at the end of each row (right padding: ends differ); short
        # continuations repeat their last position to fill the rectangle, and those rows are unused.
        positions = [[max(len(row) - n + k, 0) if k < n else len(row) - 1 for k in range(width)]
                     for row, n in zip(rows, lengths)]
        index = torch.tensor(positions, dtype=torch.long, device=self.model.device)
        logits = self.model(self._pad(rows), positions=index)
        for i, row, n in zip(batch, logits, lengths):
            results[i] = self._continuation_score(row[:n], pairs[i][1])
        return sum(len(r) for r in rows)

    def _last_row_unit(self, pairs: list[TokenPair], contexts: list[tuple[int, ...]],
                       members: dict[tuple[int, ...], list[int]], results: list) -> int:
        """Several questions' contexts in one batch; every one-token choice reads its context's last logits."""
        rows = [list(c) for c in contexts]
        index = torch.tensor([[len(r) - 1] for r in rows], dtype=torch.long, device=self.model.device)
        logits = self.model(self._pad(rows), positions=index)
        for context, row in zip(contexts, logits):
            for i in members[context]:
                results[i] = self._continuation_score(row, pairs[i][1])
        return sum(len(r) for r in rows)

    def _shared_unit(self, pairs: list[TokenPair], seen: tuple[int, ...], members: list[int], results: list) -> int:
        """Prefill the context once, then score the continuations against copies of its cache."""
        for i, result in zip(members, self._score_shared(list(seen), [pairs[i][1] for i in members])):
            results[i] = result
        return len(seen) - 1 + sum(len(pairs[i][1]) for i in members)

    def _score_shared(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        prefix = context[:-1]
        out: list[tuple[float, bool]] = []
        longest = max(len(c) for c in continuations)
        cache = self.model.new_cache(1, len(context) + longest)
        if prefix:
            self.model(torch.tensor([prefix], dtype=torch.long, device=self.model.device), cache=cache, last_only=True)
        for start in range(0, len(continuations), self.batch_size):
            chunk = continuations[start:start + self.batch_size]
            branch = cache.expand(len(chunk))
            rows = [[context[-1]] + c[:-1] for c in chunk]
            logits = self.model(self._pad(rows), cache=branch)
            out.extend(self._continuation_score(row[:len(c)], c) for row, c in zip(logits, chunk))
        return out

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded ids; padding sits after every real token, so causal attention ignores it."""
        width = max(len(r) for r in rows)
        pad = self.prefix_id or 0
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=self.model.device)

    @staticmethod
    def _continuation_score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, dtype=torch.long, device=logits.device)
        total = float(logprobs.gather(-1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(-1) == target).all())
        return total, greedy

    # ------------------------------------------------------------------ rolling

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """Whole-document log-likelihood in windows of the model's context (perplexity, bits per byte).

        By default the text is encoded without BOS and every token is predicted, the first from BOS
        alone: p(text | BOS), how the model reads a document (evals/tasks/pile.yaml says why).
        ``rolling_double_bos`` scores lm-eval's HF model's way instead, p(BOS text | BOS).
        """
        self.answered["loglikelihood_rolling"] += len(requests)
        windows: list[TokenPair] = []
        owners: list[int] = []
        for n, (text,) in enumerate(r.args for r in requests):
            ids = self.encode_text(text) if self.rolling_double_bos else self.tokenizer.encode(text, add_bos=False)
            for window in get_rolling_token_windows(ids, self.prefix_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        totals = [0.0] * len(requests)
        sharing, self.share_context = self.share_context, False  # windows never share a context
        try:
            scored = self.score_pairs(windows, kind="loglikelihood_rolling")
        finally:
            self.share_context = sharing
        for owner, (logprob, _) in zip(owners, scored):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy unless the task asks to sample; stops at eos, a stop string or the token limit."""
        self.answered["generate_until"] += len(requests)
        out: list[str] = []
        prompts = [self._generation_prompt(context, dict(gen_kwargs)) for context, gen_kwargs in (r.args for r in requests)]
        meter = _Meter(self, "generate_until", len(requests), sum(len(ids) + s.max_new_tokens for ids, s, _ in prompts))
        for done, (request, (ids, settings, until)) in enumerate(zip(requests, prompts), start=1):
            text = "".join(stream_text(self.model, self.tokenizer, ids, settings, stop_strings=until))
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
            meter.step(done, len(ids) + settings.max_new_tokens)
        return out

    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        ids, settings, until = self._generation_prompt(context, gen_kwargs)
        return "".join(stream_text(self.model, self.tokenizer, ids, settings, stop_strings=until))

    def _generation_prompt(self, context: str, gen_kwargs: dict[str, Any]) -> tuple[list[int], SamplingSettings, list[str]]:
        """Prompt ids, sampling settings and stop strings, with lm-eval's reading of the kwargs
        (max_gen_toks, max_new_tokens, max_tokens or max_completion_tokens, in that priority)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        max_new = int(kwargs["max_gen_toks"])
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        settings = SamplingSettings(
            max_new_tokens=max_new,
            temperature=temperature if sample else 0.0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            top_k=int(kwargs.get("top_k", 0) or 0),
            seed=kwargs.get("seed", None),
            stop_ids=self.stop_ids,
        )
        room = max(self.max_length - max_new, 1)
        return self.encode_text(context)[-room:], settings, [s for s in kwargs["until"] if s]

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the checkpoint's chat template (or deepseek-moe-16b-chat's) writes it.

        Without a generation prompt the last (assistant) message stays open, as Hugging Face's
        ``continue_final_message`` leaves it: lm-eval then scores or continues that answer.
        """
        if add_generation_prompt or not chat_history or chat_history[-1]["role"] != "assistant":
            return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        text = self.tokenizer.render_chat(chat_history, add_generation_prompt=False)
        final = chat_history[-1]["content"].strip()
        cut = text.rfind(final) if final else -1
        return text[:cut + len(final)] if cut >= 0 else text

    @cached_property
    def tokenizer_name(self) -> str:
        """Names the tokenizer and template in lm-eval's request cache keys: a hash of both."""
        digest = hashlib.sha256(self.tokenizer.backend.to_str().encode())
        digest.update(self.tokenizer.chat_template.encode())
        return f"dsmoe-{digest.hexdigest()[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """lm-eval records this in its results; None when chat templating is off."""
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    # ------------------------------------------------------------------ helpers

    def _report(self, kind: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(kind, done, total)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval stores in its results' config, so a result says which model made it."""
        return {
            "dsmoe_dtype": str(self.model.dtype).removeprefix("torch."),
            "dsmoe_max_length": self.max_length,
            "dsmoe_share_context": self.share_context,
            "dsmoe_rolling_double_bos": self.rolling_double_bos,
        }


def _load(pretrained: str, model_args: dict[str, Any]) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    """Load through ``dsmoe.load`` with the loading settings among lm-eval's model_args."""
    return load(pretrained, LoadOptions.from_model_args(model_args))


def _parse_batch_size(value: int | str | None) -> int:
    """lm-eval passes "auto" and "auto:N"; on CPU a fixed size is as good, so those mean 8."""
    if value is None or str(value).startswith("auto"):
        return 8
    try:
        size = int(value)
    except ValueError:
        raise EvalError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise EvalError(f"batch_size must be a positive integer, got {value!r}")
    return size


def _parse_bool(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes", "on")
