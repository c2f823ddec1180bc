"""lm_head's GEMV in int8 against dsmoe's 6-bit format, alternated in one process.

    nice -n 10 python benchmarks/bench_lm_head.py                  # 102400 x 2048 (16B), 2 threads
    nice -n 10 python benchmarks/bench_lm_head.py --rounds 15 --threads 1
    nice -n 10 python benchmarks/bench_lm_head.py --model /work/bench/16b8-q4 \
        --float-source /work/bench/compare/hf-16b-L8                # whole decode steps, int8 vs q6 head

Each round times a few calls of each format back to back (int8 then q6, the order swapping each
round), so both see the same machine load; the output is the median of the rounds' per-call
times, the bytes each call reads over that time, and the median of the paired q6 / int8 ratios.
The weight is random (the kernels' speed does not depend on the values).

With ``--model`` (a stored 4-bit checkpoint) whole greedy decode steps are timed instead: the model
is loaded once and its lm_head swapped between an int8 and a q6 one before every step, both
quantized here from the float lm_head of ``--float-source`` (the checkpoint's bf16 source), so the
steps differ in the head alone and neighbouring steps share the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsmoe import load
from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.model.layer_plan import building_detached
from dsmoe.native.library import native_library
from dsmoe.perf.runner import time_generation
from dsmoe.quant import kernels, quantize_linear
from dsmoe.quant.linear import quantize_int8_native
from dsmoe.quant.q6 import q6_native_mm, quantize_q6_native
from dsmoe.quant.spec import INT8, Q6


def bench_decode(model_path: str, float_source: str, rounds: int, new_tokens: int) -> None:
    """Greedy decode steps with the two heads alternating step by step (which goes first swaps each
    round), so neighbouring steps see the same machine: per-step medians and the median of each
    pair's ratio, robust to a machine whose load swings over seconds."""
    model, _ = load(model_path)
    weight = open_checkpoint(float_source).get("lm_head.weight")
    heads = {"int8": quantize_linear(weight, INT8), "q6": quantize_linear(weight, Q6)}
    del weight
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    def use(name: str) -> None:
        # No layer plan holds lm_head: swapping it must not make them stale (a rebuild per step).
        with building_detached():
            model.lm_head = heads[name]  # type: ignore[assignment]  # a quantized linear's interface

    for name in heads:  # warm-up
        use(name)
        time_generation(model, prompt, 4)
    steps: dict[str, list[float]] = {name: [] for name in heads}
    ratios = []
    for r in range(rounds):
        order = ("int8", "q6") if r % 2 == 0 else ("q6", "int8")
        cache = model.new_cache(1, prompt.shape[1] + 2 * new_tokens + 1)
        token = model(prompt, cache=cache, last_only=True)[0, -1].argmax().view(1, 1)
        for _ in range(new_tokens):
            pair = {}
            for name in order:
                use(name)
                started = time.perf_counter()
                token = model(token, cache=cache, last_only=True)[0, -1].argmax().view(1, 1)
                int(token)
                pair[name] = time.perf_counter() - started
                steps[name].append(pair[name])
            ratios.append(pair["q6"] / pair["int8"])
    print(f"{model_path}: decode steps, {torch.get_num_threads()} threads, {rounds} rounds of {new_tokens} "
          "step pairs, the heads alternating step by step")
    for name, values in steps.items():
        ms = statistics.median(values) * 1e3
        print(f"  {name:5s} median {ms:6.2f} ms/token ({1e3 / ms:5.1f} tok/s), best {min(values) * 1e3:6.2f} ms")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"  q6 / int8 step time: median {statistics.median(ratios):.3f} "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, {len(ratios)} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="102400x2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=5, help="calls per format per round")
    parser.add_argument("--model", help="a stored 4-bit checkpoint: time whole decodes instead")
    parser.add_argument("--float-source", help="with --model: the checkpoint holding its float lm_head")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        if not args.float_source:
            parser.error("--model needs --float-source")
        bench_decode(args.model, args.float_source, args.rounds, args.new_tokens)
        return
    lib = native_library()
    assert lib is not None, "the native library is not built"
    n, k = (int(v) for v in args.shape.split("x"))
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    q, scb = quantize_int8_native(lib, weight)
    scale = scb / 127.0
    packed, steps = quantize_q6_native(lib, weight)
    del weight
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    calls = {"int8": lambda: kernels.int8_native_mm(x, q, scale), "q6": lambda: q6_native_mm(lib, x, packed, steps)}
    nbytes = {"int8": q.numel() + 4 * scale.numel(), "q6": packed.numel() + 2 * steps.numel()}
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.rounds):
        for name in (("int8", "q6") if r % 2 == 0 else ("q6", "int8")):
            start = time.perf_counter()
            for _ in range(args.calls):
                calls[name]()
            times[name].append((time.perf_counter() - start) / args.calls)
    print(f"lm_head {n} x {k}, one bf16 row, {args.threads} threads, {args.rounds} alternated rounds "
          f"of {args.calls} calls")
    for name in calls:
        ms = statistics.median(times[name]) * 1e3
        print(f"  {name:5s} {nbytes[name] / 1e6:6.1f} MB  {ms:6.2f} ms  {nbytes[name] / ms / 1e6:5.1f} GB/s")
    ratios = [a / b for a, b in zip(times["q6"], times["int8"])]
    print(f"  q6 / int8 time: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
