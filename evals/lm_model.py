"""lm-eval's model interface over our runtime, registered with lm-eval as ``dsmoe``.

Token boundaries follow lm-eval's Hugging Face model (encode context + continuation whole and
split at the context's length), so our scores are comparable with ``--model hf`` runs. The
choices of one multiple-choice question share their context: its keys and values are computed
once and the continuations are scored against copies of that cache, which is where most of an
MMLU run's time goes otherwise.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsmoe.errors import EvalError
from dsmoe.model.generate import SamplingSettings, stream_text

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from dsmoe.model.deepseek import DeepseekForCausalLM
    from dsmoe.model.tokenizer import Tokenizer

Progress = Callable[[str, int, int], None]
"""Called as ``progress(request_kind, done, total)`` while requests are answered."""

TokenPair = tuple[list[int], list[int]]

DEFAULT_MAX_GEN_TOKS = 256


@register_model("dsmoe")
class DsmoeLM(LM):
    """Answers lm-eval's three request kinds with a DeepSeekMoE model loaded by ``dsmoe.load``."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "bf16",
        bits: int | None = None,
        quant_type: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        share_context: bool = True,
        model: DeepseekForCausalLM | None = None,
        tokenizer: Tokenizer | None = None,
        progress: Progress | None = None,
        **extra: Any,
    ) -> None:
        super().__init__()
        # lm-eval's harness adds these for every model; they mean nothing on our single device.
        for harness_arg in ("device", "max_batch_size"):
            extra.pop(harness_arg, None)
        if model is None:
            if pretrained is None:
                raise EvalError("the dsmoe model needs pretrained=<checkpoint folder or repo id>")
            model, tokenizer = _load(pretrained, dtype, bits, quant_type, extra)
        elif extra:
            raise EvalError(f"unknown dsmoe model argument(s): {', '.join(sorted(extra))}")
        if tokenizer is None:
            raise EvalError("this checkpoint has no tokenizer.json; lm-eval tasks need text in and out")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _parse_batch_size(batch_size)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.share_context = _parse_bool(share_context)
        self.progress = progress
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self.stop_ids = list(model.config.eos_token_ids)

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
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
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids):]

    def score_pairs(self, pairs: list[TokenPair], kind: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each continuation, whether greedy decoding yields it)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        shared: dict[tuple[int, ...], list[int]] = defaultdict(list)
        alone: list[int] = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                results[i] = (0.0, True)
            elif self.share_context and len(continuation) <= self.max_length:
                # The context as the model will see it after left-truncation, so choices of equal
                # length still share it when a long few-shot prompt is cut.
                seen = (context + continuation)[-(self.max_length + 1):][:-len(continuation)]
                shared[tuple(seen)].append(i)
            else:
                alone.append(i)
        # A context asked once gains nothing from a cache: score it with the unshared batches.
        for seen, members in list(shared.items()):
            if len(members) == 1:
                alone.extend(shared.pop(seen))
        done = sum(r is not None for r in results)
        total = len(pairs)
        with torch.inference_mode():
            # Longest first, like lm-eval's HF model, so an out-of-memory batch shows up at once.
            alone.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
            for start in range(0, len(alone), self.batch_size):
                batch = alone[start:start + self.batch_size]
                for i, result in zip(batch, self._score_unshared([pairs[i] for i in batch])):
                    results[i] = result
                done += len(batch)
                self._report(kind, done, total)
            for seen, members in shared.items():
                scored = self._score_shared(list(seen), [pairs[i][1] for i in members])
                for i, result in zip(members, scored):
                    results[i] = result
                done += len(members)
                self._report(kind, done, total)
        return results  # type: ignore[return-value]

    def _score_unshared(self, pairs: list[TokenPair]) -> list[tuple[float, bool]]:
        """Each pair as its own row: the model reads context + continuation, left-truncated."""
        rows: list[list[int]] = []
        for context, continuation in pairs:
            rows.append((context + continuation)[-(self.max_length + 1):][:-1])
        logits = self.model(self._pad(rows))
        out = []
        for row, ids, (_, continuation) in zip(logits, rows, pairs):
            n = len(continuation)
            out.append(self._continuation_score(row[len(ids) - n:len(ids)], continuation))
        return out

    def _score_shared(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Prefill the context once, then score the continuations against copies of its cache."""
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

        The text is encoded without bos and every token is predicted, the first from bos alone.
        """
        windows: list[TokenPair] = []
        owners: list[int] = []
        for n, (text,) in enumerate(r.args for r in requests):
            ids = self.tokenizer.encode(text, add_bos=False)
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
        """Greedy unless the task asks to sample; stops at eos, a stop string or max_gen_toks."""
        out: list[str] = []
        for done, request in enumerate(requests, start=1):
            context, gen_kwargs = request.args
            text = self.generate_one(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
            self._report("generate_until", done, len(requests))
        return out

    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        settings = SamplingSettings(
            max_new_tokens=max_new,
            temperature=temperature if sample else 0.0,
            top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0),
            top_k=int(gen_kwargs.pop("top_k", 0) or 0),
            seed=gen_kwargs.pop("seed", None),
            stop_ids=self.stop_ids,
        )
        ids = self.tokenizer.encode(context)
        room = max(self.max_length - max_new, 1)
        ids = ids[-room:]
        return "".join(stream_text(self.model, self.tokenizer, ids, settings, stop_strings=list(until)))

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
        }


OFFLOAD_ARGS = ("expert_cache", "gpu_mem", "max_ram", "policy", "prefetch")
"""model_args that place the routed experts in an expert store (GB for gpu_mem and max_ram)."""


def _load(pretrained: str, dtype: str, bits: int | None, quant_type: str | None,
          extra: dict[str, Any]) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    """Load through ``dsmoe.load`` (or into an expert store when a budget is given)."""
    from dsmoe.model.loader import load
    from dsmoe.offload import load_offloaded, requested_offload

    known = set(inspect.signature(load).parameters) - {"name_or_path", "dtype", "bits", "quant_type", "progress"}
    unknown = sorted(set(extra) - known - set(OFFLOAD_ARGS))
    if unknown:
        raise EvalError(
            f"unknown dsmoe model argument(s): {', '.join(unknown)} "
            f"(known: pretrained, dtype, bits, quant_type, batch_size, max_length, share_context, "
            f"{', '.join(OFFLOAD_ARGS)}{', ' + ', '.join(sorted(known)) if known else ''})"
        )
    budgets = {name: extra.pop(name) for name in OFFLOAD_ARGS if name in extra}
    offload = requested_offload(
        expert_cache=_number(budgets, "expert_cache", int), gpu_mem_gb=_number(budgets, "gpu_mem", float),
        max_ram_gb=_number(budgets, "max_ram", float), policy=str(budgets.get("policy", "lru")),
        prefetch=str(budgets.get("prefetch", True)).lower() not in ("false", "0", "no"),
    )
    if offload is None:
        return load(pretrained, dtype=dtype, bits=_parse_bits(bits), quant_type=quant_type, **extra)
    model, tokenizer, _ = load_offloaded(pretrained, offload, dtype=dtype, bits=_parse_bits(bits),
                                         quant_type=quant_type, double_quant=bool(extra.pop("double_quant", False)))
    if extra:
        raise EvalError(f"not supported with an expert store: {', '.join(sorted(extra))}")
    return model, tokenizer


def _number(values: dict[str, Any], name: str, kind: type) -> Any:
    """A numeric model_arg (lm-eval may pass it as text), or None when absent."""
    if name not in values or values[name] in (None, "", "none", "None"):
        return None
    try:
        return kind(values[name])
    except (TypeError, ValueError):
        raise EvalError(f"{name} must be a number, got {values[name]!r}") from None


def _parse_bits(bits: int | str | None) -> int | None:
    if bits in (None, "", "none", "None"):
        return None
    try:
        return int(bits)  # type: ignore[arg-type]
    except ValueError:
        raise EvalError(f"bits must be 4, 8 or 16, got {bits!r}") from None


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
