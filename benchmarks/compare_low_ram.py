"""dsmoe against llama.cpp on identical weights when the machine has less memory than the model.

The cap is a memory cgroup, which charges the page cache a process fills as a small machine's RAM
would (../shared/notes/memory-caps.md): cgroup v1 (``memory.limit_in_bytes``) where the machine
mounts it, else v2 (``memory.max``); the report says which. Each run gets a fresh cgroup, starts
inside it (a shell writes its own pid into ``cgroup.procs``, then execs the tool) after the page
cache was dropped, and is read back for its peak usage, how often it hit the cap and whether the
OOM killer ended it (exit 137: recorded as such, the comparison goes on).

dsmoe runs ``dsmoe bench --model DIR --json --max-ram B`` with B the budget the cap implies (the
cap less ``CAP_MARGIN``), and in the ``fit`` mode with no budget flag at all (dsmoe then fits itself
to what it finds); llama.cpp runs ``llama-bench --repack 0`` (served from its mmapped file: its
repacked copy would be anonymous memory the cap cannot page out). Same weights, prompt and decode
lengths and threads; runs alternate, and the report gives medians and paired ratios.

Reproduce (llama.cpp is a benchmark-only dependency; see benchmarks/build_llama_cpp.sh), as root:

    python benchmarks/compare_low_ram.py --llama-cpp /tmp/llamacpp --layers 8 --runs 3

That writes the checkpoints as compare_llama_cpp.py does (same folder layout, so --work can point
at one it made) and caps at 75% and 50% of the model's bytes. 28 layers on an 8 GB laptop:

    python benchmarks/compare_low_ram.py --llama-cpp /tmp/llamacpp --layers 28 --from-source --cap-gib 6

A skewed router (random weights route almost evenly, the worst case for a cache):

    python benchmarks/compare_low_ram.py --llama-cpp /tmp/llamacpp --layers 8 --skew 1.0

Existing files, with no preparation: ``--model DSMOE_DIR --gguf FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_llama_cpp as base  # noqa: E402  (the script beside this one, not a package)

GiB = 2**30
GB = 1e9
CAP_FRACTIONS = (0.75, 0.5)
# ``--max-ram`` bounds dsmoe's resident set; the cgroup charges more than that: the page cache of
# the resident weights' buffered reads at load (reclaimable) and the kernel's own memory for the
# process (page tables, slab). Experts come from the expert pack with direct reads, which add no
# page cache, so a quarter of a gigabyte is left over (the issue's runs, before the pack, left
# half a gigabyte: a 2.0 GiB cap with --max-ram 1.6 GB).
CAP_MARGIN = 256 * 2**20
DSMOE_MODES = ("budget", "fit")
OOM_EXIT = 128 + 9  # SIGKILL, which the OOM killer sends
CGROUP_ROOT = Path("/sys/fs/cgroup")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


# --- the cgroup ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupKind:
    """Where memory cgroups are made on this machine, and the names of their files."""

    version: int
    parent: Path
    limit: str
    peak: str

    def describe(self) -> str:
        return f"cgroup v{self.version} ({self.parent / '<run>' / self.limit})"


def detect_cgroup(root: Path = CGROUP_ROOT) -> CgroupKind | None:
    """v1 where its memory hierarchy is mounted (``root/memory``), else v2 where the unified
    hierarchy (``root``, or ``root/unified`` beside v1 mounts) offers the memory controller."""
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return CgroupKind(1, root / "memory", "memory.limit_in_bytes", "memory.max_usage_in_bytes")
    for unified in (root, root / "unified"):
        controllers = unified / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            return CgroupKind(2, unified, "memory.max", "memory.peak")
    return None


@dataclass
class Cgroup:
    """One run's cgroup: made with its cap, read after the run, removed."""

    kind: CgroupKind
    path: Path

    @classmethod
    def create(cls, kind: CgroupKind, name: str, limit: int) -> "Cgroup":
        if kind.version == 2:
            control = kind.parent / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")  # so children get memory.max
        path = kind.parent / name
        path.mkdir()
        (path / kind.limit).write_text(str(limit))
        return cls(kind, path)

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside this cgroup: the shell moves itself in, then becomes ``cmd``."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def peak(self) -> int | None:
        text = self._read(self.kind.peak)
        return int(text) if text is not None else None

    def counters(self) -> tuple[int | None, int | None]:
        """(times usage hit the cap, processes the OOM killer ended), where the kernel says."""
        if self.kind.version == 1:
            failcnt = self._read("memory.failcnt")
            return (int(failcnt) if failcnt is not None else None,
                    _field(self._read("memory.oom_control"), "oom_kill"))
        events = self._read("memory.events")
        return _field(events, "max"), _field(events, "oom_kill")

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # a process still inside (it is being killed): the kernel drops the folder with it


def _field(text: str | None, key: str) -> int | None:
    """A ``key value`` line's value from a cgroup file such as memory.events."""
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def drop_caches() -> None:
    """Empty the page cache (machine-wide) so every run starts cold."""
    subprocess.run(["sync"], check=True)
    DROP_CACHES.write_text("1")


# --- caps and budgets ---------------------------------------------------------------------------


def caps(model_bytes: int, fractions: list[float], explicit_gib: list[float]) -> list[tuple[str, int]]:
    """(label, bytes): the fractions of the model's bytes, then the explicit caps."""
    chosen = [(f"{f:.0%} of the model", int(model_bytes * f)) for f in fractions]
    return chosen + [(f"{gib:g} GiB", int(gib * GiB)) for gib in explicit_gib]


def budget_for(cap: int) -> int:
    """The --max-ram a dsmoe run under ``cap`` is given: the cap less what the cgroup charges besides RSS."""
    budget = cap - CAP_MARGIN
    if budget <= 0:
        raise SystemExit(f"a cap of {cap / GiB:.2f} GiB leaves no budget after the {CAP_MARGIN / GiB:.2f} GiB margin")
    return budget


def model_bytes(dsmoe_dir: Path | None, gguf: Path) -> int:
    """The larger of the two tools' weight files, so each cap is at most its share of either file.
    (``dsmoe_dir`` is None when it is the bf16 source, which dsmoe quantizes while loading.)"""
    ours = sum(p.stat().st_size for p in dsmoe_dir.glob("*.safetensors")) if dsmoe_dir is not None else 0
    return max(ours, gguf.stat().st_size)


# --- runs ---------------------------------------------------------------------------------------


@dataclass
class Run:
    cap: str
    cap_bytes: int
    round: int
    tool: str
    """``dsmoe budget``, ``dsmoe fit`` or ``llama.cpp``; with --predict also ``dsmoe MODE trace`` (the
    run that records a routing trace) and ``dsmoe MODE plan`` (``info --plan`` on that trace)."""
    command: list[str]
    exit_code: int | None
    """The shell's convention: 128 + N when signal N ended it; None when it ran past the timeout."""
    seconds: float
    peak_bytes: int | None
    failcnt: int | None
    oom_kills: int | None
    figures: dict[str, float | None] = field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def status(self) -> str:
        if self.exit_code is None:
            return "timed out"
        if self.exit_code == 0 and self.figures:
            return "ok"
        if self.exit_code == OOM_EXIT and self.oom_kills != 0:
            return "OOM-killed"
        return f"failed (exit {self.exit_code})"


def exit_code(returncode: int) -> int:
    """subprocess gives -N for a process signal N ended (it is exec'd, so no shell is in between)."""
    return 128 - returncode if returncode < 0 else returncode


def dsmoe_command(checkpoint: Path, args: argparse.Namespace, budget: int | None) -> list[str]:
    cmd = ["dsmoe", "bench", "--model", str(checkpoint), "--json", "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if args.from_source:
        cmd += ["--bits", str(args.bits), "--quantize-lm-head"]
    if budget is not None:
        cmd += ["--max-ram", f"{budget / GB:.3f}"]
    return cmd


def plan_command(checkpoint: Path, args: argparse.Namespace, budget: int | None, trace: Path) -> list[str]:
    """``dsmoe info --plan`` as the run would be planned: the same budget (or none), under the same cap."""
    cmd = ["dsmoe", "info", str(checkpoint), "--plan", "--trace", str(trace)]
    if args.from_source:
        cmd += ["--bits", str(args.bits), "--quantize-lm-head"]
    if budget is not None:
        cmd += ["--max-ram", f"{budget / GB:.3f}"]
    return cmd


PREDICTED = re.compile(r"predicted decode: ([0-9.]+) tok/s")


def llama_command(bins: Path, gguf: Path, args: argparse.Namespace) -> list[str]:
    return [str(bins / "llama-bench"), "-m", str(gguf), "--repack", "0", "-t", str(args.threads),
            "-p", str(args.prompt_tokens), "-n", str(args.new_tokens), "-r", "1", "-o", "json"]


def dsmoe_figures(result: dict[str, Any]) -> dict[str, float | None]:
    """What the report shows of ``dsmoe bench --json``: speed, hit rate, disk bytes per decoded token
    measured and as the plan expects them (even routing); n/a where a run kept every expert in RAM."""
    moved = result.get("decode_link_bytes_per_token") or {}
    expected = result.get("expected_link_bytes_per_token") or {}
    return {"prefill": result["prefill_tokens_per_s"], "decode": result["decode_tokens_per_s"],
            "peak_rss_gib": result["peak_rss_bytes"] / GiB, "hit_rate": result.get("expert_cache_hit_rate"),
            "disk_bytes_per_token": moved.get("disk->ram"), "plan_disk_bytes_per_token": expected.get("disk->ram")}


def parse_output(tool: str, stdout: str) -> dict[str, float | None]:
    """The figures of a finished run's stdout (JSON from either bench; ``info --plan``'s prediction line)."""
    if tool.endswith(" plan"):
        found = PREDICTED.search(stdout)
        if found is None:
            raise ValueError("no prediction in the output")
        return {"predicted_decode": float(found.group(1))}
    data = json.loads(stdout)
    if tool == "llama.cpp":
        return dict(base.llama_rates(data))
    return dsmoe_figures(data)


def run_capped(kind: CgroupKind, cap: tuple[str, int], round_: int, tool: str, cmd: list[str],
               timeout: float, drop: bool = True) -> Run:
    """One run in a fresh cgroup of ``cap`` bytes, from a cold page cache."""
    label, limit = cap
    if drop:
        drop_caches()
    group = Cgroup.create(kind, f"dsmoe-low-ram-{os.getpid()}-{round_}-{tool.replace(' ', '-')}", limit)
    print("+", f"[{label}: {limit / GiB:.2f} GiB]", " ".join(cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        try:
            done = subprocess.run(group.wrap(cmd), text=True, capture_output=True, timeout=timeout)
            code: int | None = exit_code(done.returncode)
            stdout, stderr = done.stdout, done.stderr
        except subprocess.TimeoutExpired as expired:
            code = None
            stdout = ""
            stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else ""
        seconds = time.perf_counter() - started
        failcnt, oom_kills = group.counters()
        run = Run(label, limit, round_, tool, cmd, code, seconds, group.peak(), failcnt, oom_kills,
                  stderr_tail=stderr[-2000:])
    finally:
        group.remove()
    if code == 0:
        try:
            run.figures = parse_output(tool, stdout)
        except (ValueError, KeyError, StopIteration):
            run.stderr_tail += "\n(unreadable output)\n" + stdout[-1000:]
    print(f"  {run.status}, {seconds:.0f} s, peak {_gib(run.peak_bytes)}, failcnt {run.failcnt}",
          file=sys.stderr, flush=True)
    return run


# --- the report ---------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def _value(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def summary(runs: list[Run], key: str) -> float | None:
    """The median of ``key`` over the runs that finished (None if none did)."""
    done = [r.figures for r in runs if r.status == "ok" and r.figures.get(key) is not None]
    return base.median(done, key) if done else None  # type: ignore[arg-type]  (no None left in `done`)


def paired_ratio(ours: list[Run], theirs: list[Run], key: str) -> float | None:
    """The median over rounds where both finished of dsmoe's ``key`` over llama.cpp's in that round."""
    rounds = {r.round: r for r in theirs if r.status == "ok"}
    pairs = [(a.figures, rounds[a.round].figures) for a in ours if a.status == "ok" and a.round in rounds]
    if not pairs:
        return None
    return base.paired([a for a, _ in pairs], [b for _, b in pairs], key)  # type: ignore[arg-type]


def report(runs: list[Run], header: str) -> str:
    """Markdown: one row per cap and tool (medians, paired ratios), then every run."""
    lines = [header, "",
             "| cap | tool | finished | decode tok/s | prefill tok/s | decode / llama.cpp (paired) "
             "| prefill / llama.cpp (paired) | peak cgroup usage | failcnt | hit rate | disk per decoded token "
             "(plan, even routing) | plan's prediction from a trace: tok/s (measured / predicted) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    caps_seen = list(dict.fromkeys(r.cap for r in runs))
    for cap in caps_seen:
        here = [r for r in runs if r.cap == cap]
        llama = [r for r in here if r.tool == "llama.cpp"]
        for tool in dict.fromkeys(r.tool for r in here if not r.tool.endswith(" plan")):
            mine = [r for r in here if r.tool == tool]
            predicted = summary([r for r in here if r.tool == f"{tool} plan"], "predicted_decode")
            measured = summary(mine, "decode")
            prediction = "" if predicted is None else (
                f"{predicted:.2f} ({measured / predicted:.2f}x)" if measured is not None else f"{predicted:.2f}")
            ok = sum(r.status == "ok" for r in mine)
            states = ", ".join(sorted({r.status for r in mine if r.status != "ok"}))
            finished = f"{ok}/{len(mine)}" + (f" ({states})" if states else "")
            ratios = ["", ""]
            if tool != "llama.cpp":
                ratios = [_value(paired_ratio(mine, llama, key), ".2f") for key in ("decode", "prefill")]
            peaks = [r.peak_bytes for r in mine if r.peak_bytes is not None]
            fails = [r.failcnt for r in mine if r.failcnt is not None]
            disk = summary(mine, "disk_bytes_per_token")
            plan = summary(mine, "plan_disk_bytes_per_token")
            lines.append(
                f"| {cap} ({_gib(mine[0].cap_bytes)}) | {tool} | {finished} | {_value(summary(mine, 'decode'), '.2f')} "
                f"| {_value(summary(mine, 'prefill'), '.1f')} | {ratios[0]} | {ratios[1]} "
                f"| {_gib(max(peaks) if peaks else None)} | {max(fails) if fails else 'n/a'} "
                f"| {_value(summary(mine, 'hit_rate'), '.0%') if tool != 'llama.cpp' else ''} "
                f"| {f'{_mb(disk)} ({_mb(plan)})' if tool != 'llama.cpp' else ''} | {prediction} |")
    lines += ["", "Every run (exit 137 with an OOM kill counted: the kernel ended it at the cap):", "",
              "| cap | round | tool | status | exit | s | decode | prefill | peak | failcnt | hit rate | disk/token |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r.figures
        if r.tool.endswith(" plan"):
            lines.append(f"| {r.cap} | {r.round} | {r.tool} | {r.status} | {r.exit_code} | {r.seconds:.0f} "
                         f"| predicted {_value(f.get('predicted_decode'), '.2f')} | | {_gib(r.peak_bytes)} "
                         f"| {r.failcnt} | | |")
            continue
        lines.append(f"| {r.cap} | {r.round} | {r.tool} | {r.status} | {r.exit_code} | {r.seconds:.0f} "
                     f"| {_value(f.get('decode'), '.2f')} | {_value(f.get('prefill'), '.1f')} | {_gib(r.peak_bytes)} "
                     f"| {r.failcnt} | {_value(f.get('hit_rate'), '.0%')} | {_mb(f.get('disk_bytes_per_token'))} |")
    return "\n".join(lines) + "\n"


# --- the weights --------------------------------------------------------------------------------


def checkpoints(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    """(dsmoe's checkpoint, the GGUF, the dsmoe folder whose bytes count) made as compare_llama_cpp.py
    makes them; with --skew in their own folder, from a skewed synthetic checkpoint."""
    if args.model or args.gguf:
        if not (args.model and args.gguf):
            raise SystemExit("--model and --gguf go together")
        return args.model, args.gguf, None if args.from_source else args.model
    if args.llama_cpp is None:
        raise SystemExit("give --llama-cpp (to make the weights), or --model and --gguf")
    work = args.work / f"skew-{args.skew:g}" if args.skew else args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = work / f"hf-16b-L{args.layers}"
    if args.skew and not hf.exists():  # prepare() then converts and quantizes this one
        base.run(["dsmoe", "bench", "--synthetic", f"16b:layers={args.layers},skew={args.skew:g}", "--save", str(hf)])
    same = argparse.Namespace(layers=args.layers, llama_cpp=args.llama_cpp, bits=[args.bits], defaults=False,
                              from_source=args.from_source, quantize_lm_head=True)
    ggufs = base.prepare(same, work)
    ours = base.dsmoe_checkpoint(work, same, args.bits)
    return ours, ggufs[args.bits], None if args.from_source else ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, default=None, help="folder made by build_llama_cpp.sh")
    parser.add_argument("--model", type=Path, default=None, help="an existing dsmoe checkpoint (with --gguf)")
    parser.add_argument("--gguf", type=Path, default=None, help="llama.cpp's file of the same weights")
    parser.add_argument("--llama-bench", type=Path, default=None,
                        help="the llama-bench binary (default: LLAMA_CPP/build/bin/llama-bench)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--from-source", action="store_true",
                        help="dsmoe quantizes the bf16 checkpoint while loading (for when the disk cannot hold both)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="weights from a skewed router (--synthetic 16b:...,skew=S), in WORK/skew-S")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dsmoe-llama-compare"))
    parser.add_argument("--fractions", type=float, nargs="*", default=list(CAP_FRACTIONS),
                        help="caps as fractions of the model's bytes")
    parser.add_argument("--cap-gib", type=float, nargs="*", default=[], help="explicit caps, GiB")
    parser.add_argument("--dsmoe", nargs="+", default=list(DSMOE_MODES), choices=DSMOE_MODES,
                        help="budget: --max-ram the cap implies; fit: no budget flag (dsmoe fits itself)")
    parser.add_argument("--predict", action="store_true",
                        help="per cap, first a run that records a routing trace, then 'dsmoe info --plan --trace' "
                             "on it in the same cap: the report sets the measured runs beside that prediction")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take before it is killed")
    parser.add_argument("--results", type=Path, default=None, help="folder for report.md and runs.json "
                        "(default WORK/low-ram-results)")
    args = parser.parse_args()
    kind = detect_cgroup()
    if kind is None:
        raise SystemExit("no memory cgroup to make here (neither v1 memory.limit_in_bytes nor v2 memory.max)")
    if not (os.access(kind.parent, os.W_OK) and os.access(DROP_CACHES, os.W_OK)):
        raise SystemExit(f"run as root: each run makes a cgroup in {kind.parent} and drops the page cache")
    dsmoe_dir, gguf, counted = checkpoints(args)
    bench = args.llama_bench or (args.llama_cpp / "build" / "bin" / "llama-bench" if args.llama_cpp else None)
    if bench is None:
        raise SystemExit("give --llama-bench or --llama-cpp")
    size = model_bytes(counted, gguf)
    chosen = caps(size, args.fractions, args.cap_gib)
    runs: list[Run] = []
    for cap in chosen:
        if args.predict:  # a trace from a run of its own, then the plan's prediction from it, both capped
            for mode in args.dsmoe:
                budget = budget_for(cap[1]) if mode == "budget" else None
                trace = (args.results or args.work / "low-ram-results") / f"trace-{cap[1]}-{mode}.jsonl"
                trace.parent.mkdir(parents=True, exist_ok=True)
                runs.append(run_capped(kind, cap, -1, f"dsmoe {mode} trace",
                                       dsmoe_command(dsmoe_dir, args, budget) + ["--trace", str(trace)], args.timeout))
                runs.append(run_capped(kind, cap, -1, f"dsmoe {mode} plan",
                                       plan_command(dsmoe_dir, args, budget, trace), args.timeout))
        for round_ in range(args.runs):  # alternate, so drift in the machine hits both alike
            for mode in args.dsmoe:
                budget = budget_for(cap[1]) if mode == "budget" else None
                runs.append(run_capped(kind, cap, round_, f"dsmoe {mode}", dsmoe_command(dsmoe_dir, args, budget),
                                       args.timeout))
            runs.append(run_capped(kind, cap, round_, "llama.cpp", llama_command(bench.parent, gguf, args),
                                   args.timeout))
    skew = f", skewed router (skew={args.skew:g})" if args.skew else ", random router (near-even routing)"
    layers = json.loads((dsmoe_dir / "config.json").read_text())["num_hidden_layers"]  # --model: not --layers
    header = (f"16B geometry, {layers} layers, dsmoe {args.bits}-bit vs {base.LLAMA_TYPES[args.bits]} mmap "
              f"(--repack 0){skew}; {args.threads} threads, {args.prompt_tokens}-token prefill, {args.new_tokens}-token "
              f"decode; caps by {kind.describe()}, model {size / GiB:.2f} GiB; dsmoe budget = cap - "
              f"{CAP_MARGIN / GiB:.2f} GiB; page cache dropped before each run; median of {args.runs} alternated runs, "
              "'paired' the median of each round's ratio")
    text = report(runs, header)
    print(text)
    results = args.results or args.work / "low-ram-results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "report.md").write_text(text)
    (results / "runs.json").write_text(json.dumps(
        {"cgroup": kind.describe(), "model_bytes": size, "cap_margin": CAP_MARGIN, "skew": args.skew,
         "dsmoe": str(dsmoe_dir), "gguf": str(gguf), "runs": [asdict(r) for r in runs]}, indent=2))
    print(f"wrote {results / 'report.md'} and runs.json", file=sys.stderr)


if __name__ == "__main__":
    main()
