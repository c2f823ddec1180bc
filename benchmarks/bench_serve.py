"""What the HTTP server costs: tokens/s and time to first token through ``dsmoe serve``, against
the decode loop ``dsmoe generate`` runs (``generate_ids``), in the same run.

    python benchmarks/bench_serve.py                                           # the demo model
    dsmoe bench --synthetic 16b:layers=8 --save /tmp/dsmoe-16/16b8              # 9 GB of random bf16 weights
    flock /tmp/dsmoe-heavy.lock python benchmarks/bench_serve.py --model /tmp/dsmoe-16/16b8 --bits 4

The server runs in its own process (``dsmoe serve --port 0``); the in-process baseline and the
single-client stream alternate, ``--rounds`` times, and the table gives medians and the median of
the paired ratios. Every request decodes exactly ``--tokens`` tokens (``ignore_eos``), greedy.
With 4 and 16 clients the requests queue (one model, served in order): the aggregate tokens/s
should stay at the single-client rate, and the time to first token grows with the queue.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from dsmoe import load
from dsmoe.model.generate import SamplingSettings, generate_ids

DSMOE = Path(sys.executable).with_name("dsmoe")


def baseline(model, tokenizer, prompt: str, tokens: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Time to first token and decode tokens/s of the library loop, no server in between."""
    ids = tokenizer.encode(prompt)
    settings = SamplingSettings(max_new_tokens=tokens, stop_ids=[])
    started = time.perf_counter()
    first = None
    n = 0
    for _ in generate_ids(model, ids, settings):
        first = first or time.perf_counter()
        n += 1
    end = time.perf_counter()
    return {"ttft": first - started, "tps": (n - 1) / (end - first), "tokens": n}


def stream(url: str, prompt: str, tokens: int, out: list[dict[str, float]]) -> None:
    """One streaming client: time to the first text chunk, decode tokens/s after it."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    used = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
    end = time.perf_counter()
    out.append({"ttft": first - started, "tps": (used - 1) / (end - first), "tokens": used,
                "started": started, "end": end})


def clients(url: str, prompt: str, tokens: int, count: int) -> dict[str, float]:
    results: list[dict[str, float]] = []
    threads = [threading.Thread(target=stream, args=(url, f"{prompt} {i}", tokens, results)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["started"] for r in results)
    return {"clients": count, "aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "median_ttft": statistics.median(r["ttft"] for r in results),
            "max_ttft": max(r["ttft"] for r in results)}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [str(DSMOE), "serve", "--port", "0", "--threads", str(args.threads), "--max-queue", "64",
               "--dtype", args.dtype]
    if args.model:
        command += ["--model", args.model]
    if args.bits:
        command += ["--bits", str(args.bits)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"dsmoe serve did not start: {line!r}")
    return proc, match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--bits", type=int, default=None)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", default="4,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="The history of the river begins")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model or str(Path(__file__).resolve().parents[1] / "demo"),
                            dtype=args.dtype, bits=args.bits)
    proc, url = start_server(args)
    try:
        baseline(model, tokenizer, args.prompt, 4)  # warm both sides
        warm: list[dict[str, float]] = []
        stream(url, args.prompt, 4, warm)
        rounds = []
        for r in range(args.rounds):  # alternate which side goes first
            if r % 2 == 0:
                ours = baseline(model, tokenizer, args.prompt, args.tokens)
                served: list[dict[str, float]] = []
                stream(url, args.prompt, args.tokens, served)
            else:
                served = []
                stream(url, args.prompt, args.tokens, served)
                ours = baseline(model, tokenizer, args.prompt, args.tokens)
            rounds.append({"baseline": ours, "server": served[0]})
        many = [clients(url, args.prompt, args.tokens, int(c)) for c in args.clients.split(",") if c]
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def median(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    ratio = statistics.median(r["server"]["tps"] / r["baseline"]["tps"] for r in rounds)
    report = {
        "model": args.model or "demo", "bits": args.bits, "dtype": args.dtype, "tokens": args.tokens,
        "threads": args.threads, "rounds": args.rounds,
        "baseline_tps": median("baseline", "tps"), "server_tps": median("server", "tps"),
        "baseline_ttft": median("baseline", "ttft"), "server_ttft": median("server", "ttft"),
        "paired_tps_ratio": ratio, "overhead_per_token": 1 / ratio - 1, "concurrent": many,
    }
    print(f"{report['model']} bits={args.bits} {args.tokens} tokens, {args.threads} threads, {args.rounds} rounds")
    print(f"  generate loop : {report['baseline_tps']:8.1f} tokens/s  first token {report['baseline_ttft'] * 1e3:7.1f} ms")
    print(f"  server, 1     : {report['server_tps']:8.1f} tokens/s  first token {report['server_ttft'] * 1e3:7.1f} ms"
          f"  (paired ratio {ratio:.3f}, overhead {report['overhead_per_token']:+.1%} per token)")
    for m in many:
        print(f"  server, {m['clients']:<6}: {m['aggregate_tps']:8.1f} tokens/s in all, first token median "
              f"{m['median_ttft'] * 1e3:.0f} ms, max {m['max_ttft'] * 1e3:.0f} ms")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
