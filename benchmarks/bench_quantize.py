"""Seconds to quantize DeepSeekMoE-16B weight shapes: the native quantizer against the code it
replaces (bitsandbytes' pure-torch ``quantize_4bit``, PyTorch's ``quantize_int8``), same bytes.

    python benchmarks/bench_quantize.py                  # NF4 and int8 on an expert's and attention's shapes
    python benchmarks/bench_quantize.py --rounds 9 --formats nf4,fp4,int8

Both sides run in the same process, alternated round by round; each line is the medians and the
median of the paired ratios. The machine is shared: read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bitsandbytes.functional import quantize_4bit

from dsmoe.native.library import native_library, native_library_problem
from dsmoe.quant.linear import quantize_4bit_native, quantize_int8, quantize_int8_native

SHAPES = [(1408, 2048), (2048, 2048), (10944, 2048)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--formats", default="nf4,int8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = native_library()
    if lib is None:
        raise SystemExit(f"the native library is not in use: {native_library_problem()}")
    print(f"threads {args.threads}; seconds per weight (median of {args.rounds}), bf16 input")
    for quant_type in args.formats.split(","):
        for shape in SHAPES:
            weight = torch.randn(shape).to(torch.bfloat16)
            if quant_type == "int8":
                sides = {"peer": lambda: quantize_int8(weight), "native": lambda: quantize_int8_native(lib, weight)}
            else:
                sides = {"peer": lambda: quantize_4bit(weight, blocksize=64, quant_type=quant_type),
                         "native": lambda: quantize_4bit_native(lib, weight, 64, quant_type)}
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, run in sides.items():
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
            ratio = statistics.median(p / n for p, n in zip(times["peer"], times["native"]))
            print(f"{quant_type:5} {shape[0]:>6}x{shape[1]:<5} peer {statistics.median(times['peer']):.4f} s  "
                  f"native {statistics.median(times['native']):.4f} s  speedup {ratio:.1f}x")


if __name__ == "__main__":
    main()
