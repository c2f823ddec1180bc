"""dsmoe against llama.cpp on identical weights at DeepSeekMoE 16B's geometry, same machine, same run.

Reproduce (llama.cpp is a benchmark-only dependency; see benchmarks/build_llama_cpp.sh):

    bash benchmarks/build_llama_cpp.sh /tmp/llamacpp            # builds llama.cpp + a converter venv
    python benchmarks/compare_llama_cpp.py --llama-cpp /tmp/llamacpp --layers 8 --bits 4 8 --runs 3

Steps: write the synthetic checkpoint once in the official HF layout (`dsmoe bench --synthetic
16b:layers=N --save`), convert it with llama.cpp's own converter, quantize to Q4_0 / Q8_0 (and
with `dsmoe quantize` to our 4/8-bit, lm_head in 8-bit as llama.cpp also quantizes it), then
alternate `llama-bench` and `dsmoe bench` runs (2 threads each, 64-token prefill, 32-token decode)
and report medians and the ratio dsmoe / llama.cpp. Prints a markdown table and writes JSON.

28 layers at 8-bit, where the disk holds the bf16 source and one 8-bit copy but not two:

    python benchmarks/compare_llama_cpp.py --llama-cpp /tmp/llamacpp --layers 28 --bits 8 --runs 3 --from-source

What a user runs, with each tool's defaults (issue 21's acceptance): `dsmoe bench --model HF_DIR
--bits N` with no other flag, on the bf16 checkpoint, against `llama-bench` with only the model and
the same prompt and decode lengths (its own thread count):

    python benchmarks/compare_llama_cpp.py --llama-cpp /tmp/llamacpp --layers 8 --bits 4 8 --runs 3 --defaults
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

LLAMA_TYPES = {4: "Q4_0", 8: "Q8_0"}

# llama.cpp's converter refuses tokenizers it does not know; ours is a plain byte-level BPE, which
# it tokenizes like deepseek-llm's (see ../shared/notes/llama-cpp.md).
CONVERT_WRAPPER = """
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-llm"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def prepare(args: argparse.Namespace, work: Path) -> dict[int, Path]:
    """One GGUF and one dsmoe checkpoint per bit width, made once and reused.

    The bf16 HF checkpoint (33 GB at 28 layers) and the Q8_0 file Q4_0 is made from are written
    only while something made from them is missing, so deleting them afterwards frees the disk
    (with --from-source dsmoe loads the bf16 checkpoint itself, so it stays).
    """
    hf = work / f"hf-16b-L{args.layers}"
    src = args.llama_cpp / "src"
    bins = args.llama_cpp / "build" / "bin"
    q8 = work / f"16b-L{args.layers}-Q8_0.gguf"
    ggufs = {bits: work / f"16b-L{args.layers}-{LLAMA_TYPES[bits]}.gguf" for bits in args.bits}
    missing = [path for bits in args.bits for path in (ggufs[bits], dsmoe_checkpoint(work, args, bits))
               if not path.exists() and path != hf]
    if (missing or args.from_source or args.defaults) and not hf.exists():
        run(["dsmoe", "bench", "--synthetic", f"16b:layers={args.layers}", "--save", str(hf)])
    if any(not path.exists() for path in ggufs.values()) and not q8.exists():
        run([str(args.llama_cpp / "venv" / "bin" / "python"), "-c", CONVERT_WRAPPER, str(src), str(hf),
             "--outtype", "q8_0", "--outfile", str(q8)])
    for bits in args.bits:
        if bits == 4 and not ggufs[bits].exists():
            # Q4_0 from the Q8_0 file: speed depends on the format, not on rounding twice.
            run([str(bins / "llama-quantize"), "--allow-requantize", str(q8), str(ggufs[bits]), "Q4_0", "2"])
        ours = dsmoe_checkpoint(work, args, bits)
        if not (args.from_source or args.defaults) and not ours.exists():
            # Our own quantized copy of the same weights, so each run loads without re-quantizing.
            cmd = ["dsmoe", "quantize", str(hf), str(ours), "--bits", str(bits)]
            done = run(cmd + (["--quantize-lm-head"] if args.quantize_lm_head else []))
            print(done.stdout.strip(), file=sys.stderr)  # its size, rate and peak RSS
    return ggufs


def dsmoe_checkpoint(work: Path, args: argparse.Namespace, bits: int) -> Path:
    """dsmoe's quantized copy, or with --from-source the bf16 checkpoint it quantizes while loading."""
    if args.from_source or args.defaults:
        return work / f"hf-16b-L{args.layers}"
    head = "-lmhead8" if args.quantize_lm_head else ""
    return work / f"dsmoe-16b-L{args.layers}-{bits}bit{head}"


def llama_bench(bins: Path, gguf: Path, args: argparse.Namespace) -> dict[str, float]:
    threads = [] if args.defaults else ["-t", "2"]
    out = run(["/usr/bin/time", "-f", "maxrss_kb=%M", str(bins / "llama-bench"), "-m", str(gguf), *threads,
               "-p", str(args.prompt_tokens), "-n", str(args.new_tokens), "-r", "1", "-o", "json"])
    rss_kb = int(out.stderr.rsplit("maxrss_kb=", 1)[1].split()[0])
    return {**llama_rates(json.loads(out.stdout)), "peak_rss_gib": rss_kb / 2**20}


def llama_rates(rows: list[dict[str, float]]) -> dict[str, float]:
    """Prefill and decode tok/s from ``llama-bench -o json``: one row per test (pp N, then tg N)."""
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prefill": prefill, "decode": decode}


def dsmoe_bench(checkpoint: Path, args: argparse.Namespace, bits: int) -> dict[str, float]:
    if args.defaults:  # the README's command and nothing else (bench's lengths are 64 and 32 already)
        cmd = ["dsmoe", "bench", "--model", str(checkpoint), "--bits", str(bits), "--json"]
        if (args.prompt_tokens, args.new_tokens) != (64, 32):
            cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        result = json.loads(run(cmd).stdout)
        return _dsmoe_figures(result)
    cmd = ["dsmoe", "bench", "--model", str(checkpoint), "--threads", "2", "--json",
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if args.from_source:
        cmd += ["--bits", str(bits)] + (["--quantize-lm-head"] if args.quantize_lm_head else [])
    return _dsmoe_figures(json.loads(run(cmd).stdout))


def _dsmoe_figures(result: dict[str, float]) -> dict[str, float]:
    return {"prefill": result["prefill_tokens_per_s"], "decode": result["decode_tokens_per_s"],
            "peak_rss_gib": result["peak_rss_bytes"] / 2**30, "roofline": result["roofline_fraction"],
            "bandwidth_gbs": result["bandwidth_bytes_per_s"] / 1e9, "bytes_per_token_gb": result["bytes_per_token"] / 1e9,
            "load_s": result["load_seconds"]}


def _loads(runs: list[dict[str, float]]) -> str:
    return ", ".join(f"{r['load_s']:.1f}" for r in runs)


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired(ours: list[dict[str, float]], theirs: list[dict[str, float]], key: str) -> float:
    """The median of run-by-run ratios: each dsmoe run against the llama.cpp run right after it, so
    that the machine's drift (its memory bandwidth moved 28-46 GB/s within minutes) cancels."""
    return statistics.median(a[key] / b[key] for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="folder made by build_llama_cpp.sh")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-quantize-lm-head", dest="quantize_lm_head", action="store_false",
                        help="keep dsmoe's lm_head in bf16 (llama.cpp's Q4_0/Q8_0 quantize it)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dsmoe-llama-compare"))
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    parser.add_argument("--prepare-only", action="store_true", help="write the checkpoints and stop")
    parser.add_argument("--from-source", action="store_true",
                        help="dsmoe quantizes the bf16 checkpoint while loading, each run, instead of writing its "
                             "own copy (the same weights; for when the disk cannot hold both copies)")
    parser.add_argument("--defaults", action="store_true",
                        help="each tool as a user runs it: dsmoe bench --model HF_DIR --bits N and nothing else, "
                             "llama-bench with its own thread count")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ggufs = prepare(args, args.work)
    if args.prepare_only:
        return
    bins = args.llama_cpp / "build" / "bin"
    results = {}
    for bits in args.bits:
        ours, theirs = [], []
        for _ in range(args.runs):  # alternate, so drift in the machine hits both alike
            ours.append(dsmoe_bench(dsmoe_checkpoint(args.work, args, bits), args, bits))
            theirs.append(llama_bench(bins, ggufs[bits], args))
        results[bits] = {"dsmoe": ours, "llama.cpp": theirs}
    threads = "each tool's default threads and flags" if args.defaults else "2 threads"
    print(f"\n16B geometry, {args.layers} layers, {threads}, median of {args.runs} alternated runs; "
          "'paired' is the median of each run's ratio to the llama.cpp run after it\n")
    print("| weights | dsmoe prefill | llama.cpp prefill | ratio | paired | dsmoe decode | llama.cpp decode | ratio "
          "| paired | dsmoe roofline | dsmoe peak RSS | llama.cpp peak RSS | dsmoe load s (each run) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for bits, both in results.items():
        ours, theirs = both["dsmoe"], both["llama.cpp"]
        print(f"| {bits}-bit vs {LLAMA_TYPES[bits]} | {median(ours, 'prefill'):.1f} | {median(theirs, 'prefill'):.1f} "
              f"| {median(ours, 'prefill') / median(theirs, 'prefill'):.2f} | {paired(ours, theirs, 'prefill'):.2f} "
              f"| {median(ours, 'decode'):.2f} | {median(theirs, 'decode'):.2f} "
              f"| {median(ours, 'decode') / median(theirs, 'decode'):.2f} | {paired(ours, theirs, 'decode'):.2f} "
              f"| {median(ours, 'roofline'):.0%} | {median(ours, 'peak_rss_gib'):.2f} GiB "
              f"| {median(theirs, 'peak_rss_gib'):.2f} GiB | {_loads(ours)} |")
    if args.output:
        args.output.write_text(json.dumps({"layers": args.layers, "defaults": args.defaults, "results": results},
                                          indent=2))


if __name__ == "__main__":
    main()
