"""Prefill speed against the CPU's int8 compute limit, the per-expert loop against the native route,
alternated in one process (docs/PERFORMANCE.md, "Prefill against the compute limit (AVX512-VNNI)").

    gcc -O2 -fopenmp benchmarks/int8_peak.c -o /tmp/int8_peak
    OMP_NUM_THREADS=2 /tmp/int8_peak      # the limit: 2-thread GMAC/s
    python benchmarks/bench_prefill.py --model /work/bench/16b8-q4 --tokens 64 256 1024 \\
        --limit-gmacs 975 [--before-library OLD/native/_native.cpython-311-x86_64-linux-gnu.so]

Two variants of the same loaded model: "loop", MoE.route's per-expert Python loop (with
``--before-library``, an older build of the native library runs its matmuls: the kernels as they
were), and "native", the two native calls per MoE layer (dsmoe_moe_up / dsmoe_moe_down) with this
build's kernels. Each round times one prefill of each (the order swaps every round) and the table
gives medians, the median of the per-round loop / native time ratios, and GMAC/s over the linear
layers' multiply-adds per token (``parameter_counts``' active weights less embedding, lm_head and
norms: the router and every matmul a token passes through, attention scores not counted) as a
fraction of the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import statistics
import time
from collections.abc import Iterator

import torch

import dsmoe
from dsmoe.model import deepseek
from dsmoe.model.deepseek import DeepseekForCausalLM, parameter_counts
from dsmoe.native.library import SIGNATURES
from dsmoe.quant import kernels


def macs_per_token(model: DeepseekForCausalLM) -> int:
    """Multiply-adds of the linear layers (router included) per prompt token, without lm_head."""
    config = model.config
    counts = parameter_counts(config)
    h = config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * h
    norms = h + 2 * h * config.num_hidden_layers
    return counts["active"] - config.vocab_size * h - lm_head - norms


def old_library(path: str) -> ct.CDLL:
    """An older build of the native library, its entry points typed as this checkout types them."""
    lib = ct.CDLL(path)
    for name, argtypes in SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = argtypes
    return lib


@contextlib.contextmanager
def loop_variant(before: ct.CDLL | None) -> Iterator[None]:
    """MoE.route's per-expert loop, and with ``before`` the older library's matmuls."""
    saved_kernels, saved_lib = deepseek.MoE._prefill_kernels, kernels.native_library
    deepseek.MoE._prefill_kernels = lambda self, x, counts: None  # type: ignore[method-assign,assignment]
    if before is not None:
        kernels.native_library = lambda: before  # type: ignore[assignment]
    try:
        yield
    finally:
        deepseek.MoE._prefill_kernels = saved_kernels  # type: ignore[method-assign]
        kernels.native_library = saved_lib


def prefill_seconds(model: DeepseekForCausalLM, prompt: torch.Tensor) -> float:
    cache = model.new_cache(1, prompt.shape[1] + 1)
    started = time.perf_counter()
    model(prompt, cache=cache, last_only=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gmacs", type=float, help="the int8 limit (int8_peak.c) for the fraction")
    parser.add_argument("--before-library", help="an older native library for the loop variant's matmuls")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = dsmoe.load(args.model)
    before = old_library(args.before_library) if args.before_library else None
    macs = macs_per_token(model)
    print(f"{macs / 1e6:.0f}M MACs per token (linear layers, no lm_head), {args.threads} threads")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in args.tokens:
            prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=generator)
            times: dict[str, list[float]] = {"loop": [], "native": []}
            for variant in ("loop", "native"):  # warm-up: first-use repacks and allocations
                with loop_variant(before) if variant == "loop" else contextlib.nullcontext():
                    prefill_seconds(model, prompt)
            for round_ in range(args.rounds):
                order = ("loop", "native") if round_ % 2 == 0 else ("native", "loop")
                for variant in order:
                    with loop_variant(before) if variant == "loop" else contextlib.nullcontext():
                        times[variant].append(prefill_seconds(model, prompt))
            ratio = statistics.median(a / b for a, b in zip(times["loop"], times["native"]))
            cells = []
            for variant, runs in times.items():
                seconds = statistics.median(runs)
                rate = n * macs / seconds / 1e9
                share = f", {100 * rate / args.limit_gmacs:.0f}% of the limit" if args.limit_gmacs else ""
                cells.append(f"{variant} {seconds * 1e3:.0f} ms ({n / seconds:.0f} tok/s, {rate:.0f} GMAC/s{share})")
            print(f"N={n}: " + "; ".join(cells) + f"; loop/native {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
