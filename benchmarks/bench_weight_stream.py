"""How fast each one-row (decode) kernel reads its weights from memory, beside a bandwidth probe.

    python benchmarks/bench_weight_stream.py                  # 2 threads, a 512 MB pool per format
    python benchmarks/bench_weight_stream.py --threads 1 --rounds 5

A decode step reads every active weight once, from memory: the 16B model's experts are too many
for any cache. So each kernel here runs one activation row over a pool of distinct weights larger
than the caches, as `dsmoe bench`'s decode does: the routed experts 6 a call (int8 and NF4, the
16B expert's shape), the lm_head (q6 and bf16, the 16B shape). The expert kernels also run on two
experts over and over, which stay in cache: that rate is the kernel's own, the first what decode
gets. The kernels alternate round by round; the medians are printed beside the probe's rate
(``perf.runner.measure_bandwidth``, a PyTorch sum). Random weights: the speed does not depend on
the values. This is how the one-row kernels' prefetch was chosen (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from dsmoe.native.library import ACT_BLOCK, Q6_BLOCK_BYTES, native_library
from dsmoe.perf.runner import measure_bandwidth
from dsmoe.quant.kernels import bf16_native_mm, native_4bit_available, native_codebook
from dsmoe.quant.linear import NativeWeights, SwiGLUKernel, accumulate_experts
from dsmoe.quant.spec import QuantSpec
from dsmoe.quant.q6 import q6_native_mm

EXPERT = (1408, 2048)  # the 16B model's routed expert: gate and up [inter, hidden], down [hidden, inter]
TOP_K = 6  # routed experts a token runs, in one native call
LM_HEAD = (102400, 2048)
BLOCKSIZE = QuantSpec(bits=4).blocksize  # the 4-bit default's absmax block


@dataclasses.dataclass
class Format:
    """One kernel's calls over distinct weights (``calls``, each reading ``call_bytes``), and one
    over weights it just read (``cached``: two experts, three times, for the expert formats)."""

    call_bytes: int
    calls: list[Callable[[], object]]
    cached: Callable[[], object] | None = None


def _expert_format(make_layer: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], table: int | None,
                   unit: float, blocksize: int, pool_bytes: int, generator: torch.Generator) -> Format:
    """Decode's routed experts: TOP_K SwiGLU experts a call (``accumulate_experts``), from a pool."""
    inter, hidden = EXPERT

    def expert() -> SwiGLUKernel:
        tensors = (*make_layer(inter, hidden), *make_layer(inter, hidden), *make_layer(hidden, inter))
        return SwiGLUKernel(hidden, inter, NativeWeights(table, unit, blocksize, tensors))

    first = expert()
    expert_bytes = sum(t.numel() * t.element_size() for t in first.weights.tensors)
    pool = [first] + [expert() for _ in range(max(TOP_K, pool_bytes // expert_bytes) - 1)]
    x = torch.randn(1, hidden, generator=generator).bfloat16()
    out = torch.zeros(1, hidden, dtype=torch.bfloat16)
    mix = [1.0 / TOP_K] * TOP_K

    def run(experts: list[SwiGLUKernel]) -> Callable[[], object]:
        return lambda: accumulate_experts(experts, mix, x, out)

    calls = [run(pool[i:i + TOP_K]) for i in range(0, len(pool) - TOP_K + 1, TOP_K)]
    return Format(TOP_K * expert_bytes, calls, run(pool[:2] * (TOP_K // 2)))


def _formats(pool_bytes: int, generator: torch.Generator) -> dict[str, Format]:
    lib = native_library()
    assert lib is not None, "the native library is not built"

    def uint8(count: int) -> torch.Tensor:
        return torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)

    def scales(count: int, dtype: torch.dtype) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 0.01 + 0.005).to(dtype)

    formats = {"int8 experts": _expert_format(
        lambda n, k: (uint8(n * k).view(torch.int8).view(n, k), scales(n, torch.float32)), None, 0.0, 0, pool_bytes, generator)}
    if native_4bit_available():
        codebook = native_codebook("nf4")
        formats["nf4 experts"] = _expert_format(
            lambda n, k: (uint8(n * k // 2), scales(n * k // BLOCKSIZE, torch.bfloat16)),
            codebook.address, codebook.unit, BLOCKSIZE, pool_bytes, generator)
    vocab, hidden = LM_HEAD
    x = torch.randn(1, hidden, generator=generator).bfloat16()
    blocks = vocab * hidden // ACT_BLOCK  # one fp16 step per block of Q6_BLOCK_BYTES codes
    q6_bytes = blocks * (Q6_BLOCK_BYTES + 2)
    q6 = [(uint8(blocks * Q6_BLOCK_BYTES), scales(blocks, torch.float16).view(vocab, -1))
          for _ in range(max(1, pool_bytes // q6_bytes))]
    formats["q6 lm_head"] = Format(q6_bytes, [lambda w=w, s=s: q6_native_mm(lib, x, w, s) for w, s in q6])
    bf16 = (torch.randn(LM_HEAD, generator=generator) * 0.02).bfloat16()
    formats["bf16 lm_head"] = Format(2 * bf16.numel(), [lambda: bf16_native_mm(x, bf16)])
    return formats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pool-mb", type=int, default=512, help="bytes of distinct weights per format")
    parser.add_argument("--cached-calls", type=int, default=100, help="calls on two cached experts per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    formats = _formats(args.pool_mb << 20, generator)
    probe = measure_bandwidth()
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, form in (formats.items() if r % 2 == 0 else reversed(formats.items())):
            started = time.perf_counter()
            for call in form.calls:
                call()
            rates.setdefault((name, "memory"), []).append(
                form.call_bytes * len(form.calls) / (time.perf_counter() - started))
            if form.cached is not None:
                form.cached()
                started = time.perf_counter()
                for _ in range(args.cached_calls):
                    form.cached()
                rates.setdefault((name, "cache"), []).append(
                    form.call_bytes * args.cached_calls / (time.perf_counter() - started))
    print(f"one activation row, {args.threads} threads, {args.rounds} alternated rounds, {args.pool_mb} MB pools; "
          f"probe {probe / 1e9:.1f} GB/s")
    for (name, where), values in rates.items():
        rate = statistics.median(values)
        print(f"  {name:13s} from {where:6s} {rate / 1e9:5.1f} GB/s ({rate / probe:4.0%} of the probe)")


if __name__ == "__main__":
    main()
