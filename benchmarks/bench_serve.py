"""What the HTTP server costs: tokens/s and time to first token through ``dsmoe serve``, against
the decode loop ``dsmoe generate`` runs (``generate_ids``), and against llama.cpp's ``llama-server``
on the same weights, in the same run.

    python benchmarks/bench_serve.py                                           # the demo model

The 16B geometry (8 layers, random weights). Its byte-level tokenizer decodes only 266 of the
102,400 ids, so a random model's tokens stream as no text at all; ``--prepare-vocab`` writes a copy
of the checkpoint (links to the weights) whose vocabulary gives every id a word, so that every
token is a text chunk on both servers, as with a real model:

    dsmoe bench --synthetic 16b:layers=8 --save /work/bench/16b8               # 9 GB of random bf16 weights
    python benchmarks/bench_serve.py --prepare-vocab /work/bench/16b8 /work/bench/compare/hf-16b-L8
    python benchmarks/compare_llama_cpp.py --llama-cpp /work/bench/llamacpp --work /work/bench/compare \\
        --layers 8 --bits 4 --prepare-only                       # Q4_0 GGUF + dsmoe 4-bit, lm_head 8-bit
    flock /tmp/dsmoe-heavy.lock python benchmarks/bench_serve.py --model /work/bench/compare/dsmoe-16b-L8-4bit-lmhead8 \\
        --llama-server /work/bench/llamacpp --gguf /work/bench/compare/16b-L8-Q4_0.gguf

Each server runs in its own process (``dsmoe serve --port 0``; ``llama-server`` with its default
slots). The in-process baseline and the single-client streams alternate (the order rotates),
``--rounds`` times; the table gives medians and the medians of the paired ratios. Every request
sends the same token ids (the prompt as the dsmoe tokenizer encodes it, BOS included) and decodes
exactly ``--tokens`` tokens (``ignore_eos``), greedy. With 4 and 16 clients the requests queue
(dsmoe serves one at a time; llama-server batches up to its slot count): ``--client-rounds``
rounds, the two servers alternated.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from dsmoe import load
from dsmoe.model.generate import SamplingSettings, generate_ids

DSMOE = Path(sys.executable).with_name("dsmoe")
Run = dict[str, float]


def baseline(model, ids: list[int], tokens: int) -> Run:  # type: ignore[no-untyped-def]
    """Time to first token and decode tokens/s of the library loop, no server in between."""
    settings = SamplingSettings(max_new_tokens=tokens, stop_ids=[])
    started = time.perf_counter()
    first = None
    n = 0
    for _ in generate_ids(model, ids, settings):
        first = first or time.perf_counter()
        n += 1
    end = time.perf_counter()
    return {"ttft": first - started, "tps": (n - 1) / (end - first), "tokens": n}


def stream(url: str, ids: list[int], tokens: int, out: list[Run]) -> None:
    """One streaming client: time to the first text chunk, decode tokens/s after it."""
    body = {"prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    used = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=1200) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or time.perf_counter()
    end = time.perf_counter()
    if first is None or used != tokens:
        raise SystemExit(f"{url}: {used} tokens, {'no' if first is None else 'some'} text; the benchmark needs "
                         f"{tokens} tokens that decode to text (see --prepare-vocab)")
    out.append({"ttft": first - started, "tps": (used - 1) / (end - first), "tokens": used,
                "started": started, "end": end})


def clients(url: str, prompts: list[list[int]], tokens: int) -> Run:
    results: list[Run] = []
    threads = [threading.Thread(target=stream, args=(url, ids, tokens, results)) for ids in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(results) != len(prompts):
        raise SystemExit(f"{url}: {len(prompts) - len(results)} of {len(prompts)} clients failed")
    wall = max(r["end"] for r in results) - min(r["started"] for r in results)
    return {"clients": len(prompts), "aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "median_ttft": statistics.median(r["ttft"] for r in results),
            "max_ttft": max(r["ttft"] for r in results), "wall": wall}


def start_dsmoe(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, dict[str, Any]]:
    """llama-server on the GGUF, its defaults but the threads and the loopback port; waits for /health."""
    port = free_port()
    command = [str(args.llama_server / "build" / "bin" / "llama-server"), "-m", str(args.gguf),
               "-t", str(args.threads), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                props = httpx.get(f"{url}/props", timeout=5).json()
                return proc, url, {"slots": props.get("total_slots"), "build": props.get("build_info")}
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("llama-server did not become healthy within 600 s")


def prepare_vocab(src: Path, dst: Path) -> None:
    """``dst``: ``src``'s files as links, and a tokenizer whose every id decodes to a word (" w<id>").

    The weights stay the same; only ids the byte-level vocabulary leaves unnamed get a name, so a
    random model's tokens stream as text (as a real model's do) instead of nothing.
    """
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name != "tokenizer.json":
            (dst / path.name).symlink_to(path.resolve())
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tokenizer["added_tokens"]}
    size = json.loads((src / "config.json").read_text())["vocab_size"]
    vocab.update({f"Ġw{i}": i for i in range(size) if i not in used})  # Ġ is the byte-level space
    # transformers' LlamaTokenizerFast appends "<unk>" after the vocabulary when it has none, which
    # llama.cpp's converter refuses past vocab_size: the last id is that token instead.
    vocab.pop(f"Ġw{size - 1}", None)
    vocab["<unk>"] = size - 1
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))


def rotate(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def med(runs: list[Run], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired(ours: list[Run], theirs: list[Run], key: str) -> float:
    """The median of the round-by-round ratios, so that the machine's drift cancels."""
    return statistics.median(a[key] / b[key] for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--bits", type=int, default=None)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", default="4,16")
    parser.add_argument("--client-rounds", type=int, default=1, help="rounds of each concurrent load")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="The history of the river begins")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="folder made by build_llama_cpp.sh: also measure its llama-server on --gguf")
    parser.add_argument("--gguf", type=Path, default=None, help="the same weights as a GGUF (e.g. Q4_0)")
    parser.add_argument("--prepare-vocab", nargs=2, type=Path, metavar=("SRC", "DST"),
                        help="write DST: SRC with a vocabulary that names every id, and stop")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    args = parser.parse_args()
    if args.prepare_vocab:
        prepare_vocab(*args.prepare_vocab)
        return
    if bool(args.llama_server) != bool(args.gguf):
        parser.error("--llama-server and --gguf go together")

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model or str(Path(__file__).resolve().parents[1] / "demo"),
                            dtype=args.dtype, bits=args.bits)
    ids = tokenizer.encode(args.prompt)
    prompts = {count: [tokenizer.encode(f"{args.prompt} {i}") for i in range(count)]
               for count in (int(c) for c in args.clients.split(",") if c)}
    procs: list[subprocess.Popen[str]] = []
    urls: dict[str, str] = {}
    llama_info: dict[str, Any] = {}
    try:
        proc, urls["dsmoe serve"] = start_dsmoe(args)
        procs.append(proc)
        if args.llama_server:
            proc, urls["llama-server"], llama_info = start_llama(args)
            procs.append(proc)
        baseline(model, ids, 4)  # warm every side
        for url in urls.values():
            stream(url, ids, 4, [])
        sides = ["generate loop", *urls]
        single: dict[str, list[Run]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in rotate(sides, r):
                if side == "generate loop":
                    single[side].append(baseline(model, ids, args.tokens))
                else:
                    out: list[Run] = []
                    stream(urls[side], ids, args.tokens, out)
                    single[side].append(out[0])
        many: dict[int, dict[str, list[Run]]] = {}
        for count, batch in prompts.items():
            many[count] = {side: [] for side in urls}
            for r in range(args.client_rounds):
                for side in rotate(list(urls), r + count):
                    many[count][side].append(clients(urls[side], batch, args.tokens))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)

    report: dict[str, Any] = {
        "model": args.model or "demo", "bits": args.bits, "dtype": args.dtype, "tokens": args.tokens,
        "threads": args.threads, "rounds": args.rounds, "client_rounds": args.client_rounds,
        "prompt_tokens": len(ids), "gguf": str(args.gguf) if args.gguf else None, "llama_server": llama_info,
        "single": single, "concurrent": many,
    }
    serve, loop = single["dsmoe serve"], single["generate loop"]
    ratio = paired(serve, loop, "tps")
    report["paired_tps_ratio"] = ratio
    report["overhead_per_token"] = 1 / ratio - 1
    print(f"{report['model']} bits={args.bits}, {len(ids)} prompt tokens, {args.tokens} new tokens, "
          f"{args.threads} threads, {args.rounds} rounds")
    for side, runs in single.items():
        line = f"  {side:<14}: {med(runs, 'tps'):7.2f} tokens/s  first token {med(runs, 'ttft') * 1e3:7.1f} ms"
        if side == "dsmoe serve":
            line += f"  (paired ratio to the loop {ratio:.3f}: overhead {1 / ratio - 1:+.1%} per token)"
        if side == "llama-server":
            report["serve_vs_llama_tps"] = paired(serve, runs, "tps")
            report["serve_vs_llama_ttft"] = paired(serve, runs, "ttft")
            line += (f"  (dsmoe serve / llama-server, paired: tokens/s {report['serve_vs_llama_tps']:.3f}, "
                     f"first token {report['serve_vs_llama_ttft']:.3f}; {llama_info.get('slots')} slots)")
        print(line)
    for count, both in many.items():
        for side, runs in both.items():
            line = (f"  {side}, {count:>2} clients: {med(runs, 'aggregate_tps'):7.2f} tokens/s in all, first token "
                    f"median {med(runs, 'median_ttft') * 1e3:.0f} ms, max {med(runs, 'max_ttft') * 1e3:.0f} ms")
            if side == "llama-server":
                line += f"  (dsmoe / llama-server, paired: {paired(both['dsmoe serve'], runs, 'aggregate_tps'):.3f})"
            print(line)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
