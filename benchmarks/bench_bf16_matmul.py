"""bf16 matmuls alone: PyTorch's CPU bf16 ``F.linear``, dsmoe's bf16 kernel (native/bf16.c) and, for
scale, the int8 kernel a quantized run uses on the same shape, alternated in one process.

    nice -n 10 python benchmarks/bench_bf16_matmul.py                 # 16B shapes, 1 and 64 rows, 2 threads
    nice -n 10 python benchmarks/bench_bf16_matmul.py --rows 1 256 --rounds 9 --threads 1

Each round times a few calls of each kernel back to back (the order rotating each round), so all
see the same machine load; the output per shape is the median per-call time, what it is in GMAC/s
and in GB/s of weight read, and the median of the paired ratios to PyTorch's bf16. The weights are
random (the kernels' speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsmoe.native.library import native_library
from dsmoe.quant import kernels
from dsmoe.quant.linear import quantize_int8_native

# The 16B model's linears: lm_head, the dense MLP's up and down, an expert's gate/up and down, q/k/v/o.
SHAPES = [(102400, 2048), (10944, 2048), (2048, 10944), (1408, 2048), (2048, 1408), (2048, 2048)]


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = native_library()
    assert lib is not None, "dsmoe's native library is not built"
    generator = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, rounds {args.rounds}; ms per call (GMAC/s, GB/s of weight), ratio to torch bf16")
    for n, k in SHAPES:
        weight = (torch.randn(n, k, generator=generator) * 0.02).to(torch.bfloat16)
        q, scb = quantize_int8_native(lib, weight)
        scale = scb / 127
        for m in args.rows:
            x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
            runs: dict[str, Callable[[], object]] = {
                "torch bf16": lambda: F.linear(x, weight),
                "dsmoe bf16": lambda: kernels.bf16_native_mm(x, weight),
                "dsmoe int8": lambda: kernels.int8_native_mm(x, q, scale),
            }
            calls = max(1, int(0.2 / max(per_call(runs["dsmoe bf16"], 1), 1e-5)))
            times: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.rounds):
                names = list(runs)
                for name in names[r % len(names):] + names[: r % len(names)]:
                    times[name].append(per_call(runs[name], calls))
            base = times["torch bf16"]
            cells = []
            for name, series in times.items():
                t = statistics.median(series)
                ratio = statistics.median(b / s for b, s in zip(base, series))
                weight_bytes = n * k * (1 if name == "dsmoe int8" else 2)
                cells.append(f"{name} {t * 1e3:.3f} ms ({m * n * k / t / 1e9:.1f}, {weight_bytes / t / 1e9:.1f}) "
                             f"{ratio:.2f}x")
            print(f"{n} x {k}, {m} rows: " + "; ".join(cells))


if __name__ == "__main__":
    main()
