"""Measure a loaded model: prefill and decode speed, memory, and how close decode is to the roofline.

Decode of one token must read every active weight once, so bytes-per-token divided by the
machine's memory bandwidth bounds tokens/s; the roofline fraction says how much of that bound a
run reaches.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from dsmoe.model.deepseek import BYTES_PER_WEIGHT, DeepseekForCausalLM, parameter_counts
from dsmoe.native.library import native_kernels_in_use
from dsmoe.offload import ExpertStore
from dsmoe.offload.bandwidth import disk_bandwidth


@dataclass
class BenchResult:
    model: str
    bits: int
    threads: int
    prompt_tokens: int
    new_tokens: int
    load_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    peak_rss_bytes: int
    bytes_per_token: int
    bandwidth_bytes_per_s: float
    roofline_fraction: float
    expert_cache_hit_rate: float | None
    native_kernels: str
    decode_link_bytes_per_token: dict[str, float] | None
    """Bytes the expert store moved per decoded token over each link (``disk->ram``, ``ram->cuda:0``):
    decode steps only, since a prefill's many tokens share each expert it reads."""
    expected_link_bytes_per_token: dict[str, float] | None
    """The plan's figure for the same links, assuming even routing (``Plan.expected_link_bytes``)."""
    expert_host_runs: int | None
    """Misses the store's cost model ran where the expert lives instead of copying it in."""
    link_bytes_per_s: dict[str, float] | None = None
    """Per link, bytes per second while a transfer over it was in flight (the measured pass)."""
    disk_probe_bytes_per_s: float | None = None
    """The device's own read speed under the disk tier's files (``offload.bandwidth``), to set the
    tier's ``disk->ram`` figure against."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_bytes_per_token(model: DeepseekForCausalLM, bits: int, lm_head_bits: int = 16) -> int:
    """Weight bytes one decode step reads: active layers at ``bits``, one embedding row, lm_head, router."""
    config = model.config
    counts = parameter_counts(config)
    h, v = config.hidden_size, config.vocab_size
    lm_head = 0 if config.tie_word_embeddings else v * h
    # Norms and routers, counted at 2 bytes (routers are fp32 in memory: under 0.5% more at 16B).
    kept_active = counts["kept"] - v * h - lm_head
    quantized_active = counts["active"] - counts["kept"]
    return int(
        quantized_active * BYTES_PER_WEIGHT[bits]
        + kept_active * 2
        + h * 2  # the one embedding row a token looks up
        + (v * h) * BYTES_PER_WEIGHT[lm_head_bits]
    )


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of several full passes summing a large tensor."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return nbytes / best


def peak_rss_bytes() -> int:
    """The process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def time_generation(
    model: DeepseekForCausalLM, prompt: torch.Tensor, new_tokens: int, after_prefill: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """(seconds to the first new token, i.e. the prefill; seconds to decode the rest), greedy, no stops.

    ``after_prefill`` runs between the two timed parts (to read counters at the boundary).
    """
    cache = model.new_cache(1, prompt.shape[1] + new_tokens)
    started = time.perf_counter()
    logits = model(prompt, cache=cache, last_only=True)
    token = logits[0, -1].argmax().view(1, 1)
    int(token)  # the first token exists once it is read back
    if after_prefill is not None:
        prefilled = time.perf_counter()
        after_prefill()
        started += time.perf_counter() - prefilled  # its time counts in neither part
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = model(token, cache=cache, last_only=True)[0, -1].argmax().view(1, 1)
    int(token)
    done = time.perf_counter()
    return first - started, done - first


def run_benchmark(
    model: DeepseekForCausalLM,
    name: str,
    bits: int,
    load_seconds: float,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    seed: int = 0,
    bandwidth: float | None = None,
    lm_head_bits: int = 16,
    store: ExpertStore | None = None,
) -> BenchResult:
    """One warm-up pass (kernels that repack on first use), then the measured pass.

    With an expert ``store``, its hit rate counts the measured pass only, and its bytes per link the
    measured pass's decode steps only.
    """
    if prompt_tokens < 1 or new_tokens < 2:
        raise ValueError("need at least 1 prompt token and 2 new tokens")
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator)
    time_generation(model, prompt[:, : min(8, prompt_tokens)], 2)
    if store is not None:
        store.stats.reset()
    at_prefill: dict[str, int] = {}

    def snapshot() -> None:
        if store is not None:
            at_prefill.update(store.stats.link_bytes)

    ttft_s, decode_s = time_generation(model, prompt, new_tokens, after_prefill=snapshot)
    bandwidth = bandwidth if bandwidth is not None else measure_bandwidth()
    per_token = decode_bytes_per_token(model, bits, lm_head_bits)
    decode_rate = (new_tokens - 1) / decode_s
    return BenchResult(
        model=name, bits=bits, threads=torch.get_num_threads(), prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, load_seconds=load_seconds, prefill_tokens_per_s=prompt_tokens / ttft_s,
        decode_tokens_per_s=decode_rate, time_to_first_token_s=ttft_s, peak_rss_bytes=peak_rss_bytes(),
        bytes_per_token=per_token, bandwidth_bytes_per_s=bandwidth,
        roofline_fraction=per_token * decode_rate / bandwidth,
        expert_cache_hit_rate=store.stats.hit_rate() if store is not None else None,
        native_kernels=native_kernels_in_use(),
        decode_link_bytes_per_token=None if store is None else {
            link: (moved - at_prefill.get(link, 0)) / (new_tokens - 1)
            for link, moved in sorted(store.stats.link_bytes.items())},
        expected_link_bytes_per_token=None if store is None else store.plan.expected_link_bytes(),
        expert_host_runs=None if store is None else sum(s.host_runs for s in store.stats.layers.values()),
        link_bytes_per_s=None if store is None else {
            link: rate for link in sorted(store.stats.link_busy_seconds)
            if (rate := store.stats.link_bandwidth(link)) is not None},
        disk_probe_bytes_per_s=disk_bandwidth(files) if store is not None and (files := store.source.files()) else None,
    )
