"""Perplexity of a text and KL divergence against a saved base run, as llama.cpp's ``llama-perplexity``.

The text is cut into consecutive chunks of ``ctx`` tokens; each chunk is one forward pass from an
empty context, and only its second half is scored, so every scored token sees at least ``ctx / 2``
tokens before it (llama.cpp's ``first = n_ctx / 2``). Perplexity is ``exp(mean NLL)`` with the
uncertainty of that mean carried through the exponential.

A base run (``save_base``) keeps, for each scored token, the ``top_k`` largest log-probabilities
and their ids: compact (the 16B model's 102,400-token vocabulary would need 200 kB a token in
fp16) and enough for KL divergence with the rest of the vocabulary lumped into one outcome. That
lumped KL is a lower bound of the full one and equal to it when the tail's mass is negligible; it
is exactly 0 for a model against itself. The file is safetensors (no pickle) and records hashes
of the tokenizer and of the scored tokens, so a comparison on another text or tokenizer is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsmoe.errors import UsageError

BASE_FORMAT = "dsmoe-logits"
BASE_VERSION = 1
DEFAULT_TOP_K = 32
TAIL_NOISE = 1e-6  # float32 rounding of a sum of stored probabilities, far above float64's

ChunkProgress = Callable[[int, int], None]
"""Called as ``progress(chunks_done, chunks_total)``."""


@dataclass
class Base:
    """A base run's top-k log-probabilities per scored token, and what it was computed on."""

    top_ids: torch.Tensor  # int32 [tokens, k], likeliest first
    top_logp: torch.Tensor  # float32 [tokens, k]
    ctx: int
    tokens_sha256: str
    tokenizer_sha256: str
    model: str


@dataclass
class KldStats:
    """KL(base || model) per scored token, summarized as llama.cpp's ``--kl-divergence`` prints it."""

    mean: float
    mean_err: float
    p99: float
    median: float
    max: float
    same_top: float  # how often both put the same token first
    same_top_err: float
    chunk_means: list[float]


@dataclass
class PerplexityResult:
    ctx: int
    chunks: int
    tokens: int  # scored tokens
    ppl: float
    ppl_err: float
    chunk_ppl: list[float]
    kld: KldStats | None = None
    base: Base | None = field(default=None, repr=False)


def tokens_sha256(ids: Sequence[int]) -> str:
    return hashlib.sha256(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def tokenizer_sha256(checkpoint_dir: str | os.PathLike[str]) -> str:
    """The identity of a checkpoint's tokenizer: the hash of its ``tokenizer.json``."""
    return hashlib.sha256((Path(checkpoint_dir) / "tokenizer.json").read_bytes()).hexdigest()


def chunk_ids(ids: Sequence[int], ctx: int) -> list[list[int]]:
    """Consecutive chunks of exactly ``ctx`` tokens; a shorter tail is left out (as llama.cpp does)."""
    if ctx < 4:
        raise UsageError(f"the context must be at least 4 tokens, got {ctx}")
    n = len(ids) // ctx
    if n == 0:
        raise UsageError(f"the text is {len(ids)} tokens: perplexity needs at least one chunk of {ctx} "
                         f"(give a longer text or a smaller --ctx-size)")
    return [list(ids[i * ctx:(i + 1) * ctx]) for i in range(n)]


def scored_positions(ctx: int) -> range:
    """The logit rows scored in each chunk: those predicting its second half."""
    return range(ctx // 2, ctx - 1)


def _top_k_base(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids.to(torch.int32), values.float()


def lumped_kl(base_ids: torch.Tensor, base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row with P known on ``base_ids`` only, the rest of the vocabulary as one outcome.

    ``logp`` [rows, vocab] are the model's (Q) log-probabilities; computed in float64.
    """
    p_logp = base_logp.double()
    q_logp = logp.double().gather(-1, base_ids.long())
    p, q = p_logp.exp(), q_logp.exp()
    kl = (p * (p_logp - q_logp)).sum(-1)
    # The tail's mass, computed alike for both so that a model against itself gives exactly 0; below
    # TAIL_NOISE it is the rounding of the stored float32 values (all of the vocabulary kept), not mass.
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    counted = (p_rest > TAIL_NOISE) & (q_rest > 0)
    tail = torch.where(counted, p_rest * (p_rest.clamp(min=TAIL_NOISE).log() - q_rest.clamp(min=1e-300).log()),
                       torch.zeros_like(p_rest))
    return (kl + tail).clamp(min=0)


def _mean_err(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = values.mean().item()
    err = math.sqrt(values.var(unbiased=True).item() / n) if n > 1 else float("nan")
    return mean, err


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    ids: Sequence[int],
    ctx: int,
    base: Base | None = None,
    keep_top_k: int | None = None,
    progress: ChunkProgress | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``ids``; with ``base``, KL divergence against it (same text and chunks).

    ``keep_top_k`` keeps that many log-probabilities per scored token in ``result.base`` (to save it).
    The caller checks that ``base`` belongs to the same text and tokenizer (``check_base``).
    """
    chunks = chunk_ids(ids, ctx)
    positions = scored_positions(ctx)
    device = next(model.parameters()).device
    nll_parts, chunk_ppl, kl_parts, top_parts, kept_ids, kept_logp = [], [], [], [], [], []
    row = 0
    for done, chunk in enumerate(chunks, start=1):
        logits = model(torch.tensor([chunk], device=device))[0, positions.start:positions.stop]
        logp = logits.float().log_softmax(-1).cpu()
        targets = torch.tensor(chunk[positions.start + 1:positions.stop + 1])
        nll = -logp.gather(-1, targets[:, None])[:, 0].double()
        nll_parts.append(nll)
        chunk_ppl.append(math.exp(nll.mean().item()))
        if base is not None:
            rows = slice(row, row + len(positions))
            kl_parts.append(lumped_kl(base.top_ids[rows], base.top_logp[rows], logp))
            top_parts.append((logp.argmax(-1) == base.top_ids[rows, 0].long()).double())
        if keep_top_k:
            top_ids, top_logp = _top_k_base(logp, keep_top_k)
            kept_ids.append(top_ids)
            kept_logp.append(top_logp)
        row += len(positions)
        if progress is not None:
            progress(done, len(chunks))
    nll_all = torch.cat(nll_parts)
    mean, err = _mean_err(nll_all)
    result = PerplexityResult(ctx=ctx, chunks=len(chunks), tokens=nll_all.numel(), ppl=math.exp(mean),
                              ppl_err=math.exp(mean) * err, chunk_ppl=chunk_ppl)
    if base is not None:
        kl = torch.cat(kl_parts)
        same = torch.cat(top_parts)
        kl_mean, kl_err = _mean_err(kl)
        same_top, same_err = _mean_err(same)
        result.kld = KldStats(
            mean=kl_mean, mean_err=kl_err, p99=torch.quantile(kl, 0.99).item(), median=kl.median().item(),
            max=kl.max().item(), same_top=same_top, same_top_err=same_err,
            chunk_means=[part.mean().item() for part in kl_parts],
        )
    if keep_top_k:
        result.base = Base(top_ids=torch.cat(kept_ids), top_logp=torch.cat(kept_logp), ctx=ctx,
                           tokens_sha256=tokens_sha256(ids[:len(chunks) * ctx]), tokenizer_sha256="", model="")
    return result


def save_base(base: Base, path: str | os.PathLike[str]) -> Path:
    """Write a base run as safetensors, through a temporary file so a crash leaves no half file."""
    from safetensors.torch import save_file

    target = Path(path)
    metadata = {"format": BASE_FORMAT, "version": str(BASE_VERSION), "ctx": str(base.ctx),
                "tokens_sha256": base.tokens_sha256, "tokenizer_sha256": base.tokenizer_sha256, "model": base.model}
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        save_file({"top_ids": base.top_ids.contiguous(), "top_logp": base.top_logp.contiguous()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {target}: {exc.strerror}") from None
    return target


def load_base(path: str | os.PathLike[str]) -> Base:
    """Read a base run written by ``save_base``; anything else is refused with the reason."""
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{source}: no such base file (write one with --save-logits)")
    try:
        with safe_open(str(source), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != BASE_FORMAT:
                raise UsageError(f"{source}: not a dsmoe logits file (written by --save-logits)")
            if meta.get("version") != str(BASE_VERSION):
                raise UsageError(f"{source}: logits file version {meta.get('version')}, this dsmoe reads {BASE_VERSION}")
            top_ids, top_logp = f.get_tensor("top_ids"), f.get_tensor("top_logp")
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise UsageError(f"{source}: unreadable logits file ({exc})") from None
    if top_ids.shape != top_logp.shape or top_ids.dim() != 2:
        raise UsageError(f"{source}: corrupted logits file (tensor shapes {list(top_ids.shape)}, {list(top_logp.shape)})")
    return Base(top_ids=top_ids, top_logp=top_logp, ctx=int(meta["ctx"]), tokens_sha256=meta["tokens_sha256"],
                tokenizer_sha256=meta["tokenizer_sha256"], model=meta.get("model", ""))


def check_base(base: Base, source: str, ids: Sequence[int], ctx: int, tokenizer_hash: str) -> None:
    """Refuse a base run made with another tokenizer, text or context: its numbers would mean nothing."""
    if base.tokenizer_sha256 != tokenizer_hash:
        raise UsageError(f"{source}: saved with a different tokenizer ({base.model}); KL divergence needs the same one")
    if base.ctx != ctx:
        raise UsageError(f"{source}: saved with --ctx-size {base.ctx}, this run uses {ctx}")
    used = (len(ids) // ctx) * ctx
    if base.tokens_sha256 != tokens_sha256(ids[:used]):
        raise UsageError(f"{source}: saved on a different text; give the same -f file")
    if base.top_ids.shape[0] != (len(ids) // ctx) * len(scored_positions(ctx)):
        raise UsageError(f"{source}: holds {base.top_ids.shape[0]} tokens, this text scores a different number")
