"""benchmarks/compare_low_ram.py's own parts: cgroup detection and use, cap arithmetic, output parsing,
the report's medians and paired ratios (the measurement itself is the benchmark's, not a test's)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_low_ram as low  # noqa: E402

# Captured from `llama-bench -m 16b-L8-Q4_0.gguf --repack 0 -t 2 -p 8 -n 4 -r 1 -o json` here on
# 2026-12-02, fields the script does not read dropped.
LLAMA_SAMPLE = [
    {"model_type": "deepseek 16B Q4_0", "n_threads": 2, "repack": False, "n_prompt": 8, "n_gen": 0,
     "avg_ns": 399359554, "avg_ts": 20.032074, "stddev_ts": 0.0},
    {"model_type": "deepseek 16B Q4_0", "n_threads": 2, "repack": False, "n_prompt": 0, "n_gen": 4,
     "avg_ns": 244312845, "avg_ts": 16.372451, "stddev_ts": 0.0},
]
# Captured from `dsmoe bench --model 16b8-q4 --json --threads 2 --prompt-tokens 8 --new-tokens 3
# --max-ram 1.6` the same day (the disk tier in use), whole.
DSMOE_SAMPLE = {
    "model": "/work/bench/16b8-q4", "bits": 4, "threads": 2, "prompt_tokens": 8, "new_tokens": 3,
    "load_seconds": 12.705811682993954, "prefill_tokens_per_s": 1.4997154580479122,
    "decode_tokens_per_s": 0.807595318647731, "time_to_first_token_s": 5.334345230003237,
    "peak_rss_bytes": 1622466560, "bytes_per_token": 597442560, "bandwidth_bytes_per_s": 10688226958.220476,
    "roofline_fraction": 0.045142362386478375, "expert_cache_hit_rate": 0.35655737704918034, "native_kernels": "AVX2",
    "decode_link_bytes_per_token": {"disk->ram": 211692141.0},
    "expected_link_bytes_per_token": {"disk->ram": 185213952.0}, "expert_host_runs": 0,
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_detects_v1_first_then_v2_with_the_memory_controller(tmp_path):
    v1 = tmp_path / "v1"
    _write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(v1 / "unified" / "cgroup.controllers", "memory\n")  # a hybrid machine: v1 wins
    kind = low.detect_cgroup(v1)
    assert kind is not None and (kind.version, kind.parent) == (1, v1 / "memory")
    assert kind.limit == "memory.limit_in_bytes" and kind.peak == "memory.max_usage_in_bytes"

    v2 = tmp_path / "v2"
    _write(v2 / "cgroup.controllers", "cpuset cpu io memory hugetlb pids\n")
    kind = low.detect_cgroup(v2)
    assert kind is not None and (kind.version, kind.parent, kind.limit, kind.peak) == (2, v2, "memory.max", "memory.peak")

    hybrid = tmp_path / "hybrid"  # this machine's unified mount, were v1's memory folder gone
    _write(hybrid / "unified" / "cgroup.controllers", "hugetlb\n")
    assert low.detect_cgroup(hybrid) is None
    _write(hybrid / "unified" / "cgroup.controllers", "memory hugetlb\n")
    kind = low.detect_cgroup(hybrid)
    assert kind is not None and (kind.version, kind.parent) == (2, hybrid / "unified")


def test_cgroup_files_are_written_and_read_in_each_version(tmp_path):
    v1 = low.CgroupKind(1, tmp_path / "v1", "memory.limit_in_bytes", "memory.max_usage_in_bytes")
    v1.parent.mkdir()
    group = low.Cgroup.create(v1, "run", 2 * 2**30)
    assert (group.path / "memory.limit_in_bytes").read_text() == "2147483648"
    _write(group.path / "memory.max_usage_in_bytes", "2147479552\n")
    _write(group.path / "memory.failcnt", "4242\n")
    _write(group.path / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert group.peak() == 2147479552 and group.counters() == (4242, 1)

    v2 = low.CgroupKind(2, tmp_path / "v2", "memory.max", "memory.peak")
    _write(v2.parent / "cgroup.subtree_control", "cpu\n")
    group = low.Cgroup.create(v2, "run", 1500)
    assert (v2.parent / "cgroup.subtree_control").read_text() == "+memory"
    assert (group.path / "memory.max").read_text() == "1500"
    _write(group.path / "memory.events", "low 0\nhigh 0\nmax 17\noom 1\noom_kill 0\noom_group_kill 0\n")
    assert group.peak() is None and group.counters() == (17, 0)  # a kernel without memory.peak


def test_the_wrapped_command_writes_its_own_pid_and_keeps_it(tmp_path):
    group = low.Cgroup(low.CgroupKind(1, tmp_path, "", ""), tmp_path)
    (tmp_path / "cgroup.procs").write_text("")
    import subprocess

    done = subprocess.run(group.wrap(["sh", "-c", "echo $$"]), capture_output=True, text=True, check=True)
    # The pid written into cgroup.procs is the command's own: exec kept the process.
    assert (tmp_path / "cgroup.procs").read_text().strip() == done.stdout.strip()


def test_caps_and_budgets_by_hand():
    # 75% and 50% of 2.8 GB, then 6 GiB.
    assert low.caps(2_800_000_000, [0.75, 0.5], [6]) == [
        ("75% of the model", 2_100_000_000), ("50% of the model", 1_400_000_000), ("6 GiB", 6 * 1024**3)]
    assert low.budget_for(2 * 1024**3) == 2 * 1024**3 - 256 * 1024**2  # the 0.25 GiB margin
    with pytest.raises(SystemExit, match="leaves no budget"):
        low.budget_for(256 * 1024**2)


def test_commands_carry_the_budget_and_the_same_lengths(tmp_path):
    args = low.argparse.Namespace(threads=2, prompt_tokens=64, new_tokens=32, from_source=False, bits=4)
    cmd = low.dsmoe_command(Path("/ckpt"), args, 2 * 1024**3 - 512 * 1024**2)
    assert cmd[cmd.index("--max-ram") + 1] == "1.611"  # 1610612736 bytes in GB
    assert "--max-ram" not in low.dsmoe_command(Path("/ckpt"), args, None)
    llama = low.llama_command(Path("/bin"), Path("/m.gguf"), args)
    assert llama[:5] == ["/bin/llama-bench", "-m", "/m.gguf", "--repack", "0"]
    for flag, value in (("-t", "2"), ("-p", "64"), ("-n", "32")):
        assert llama[llama.index(flag) + 1] == value
    assert cmd[cmd.index("--prompt-tokens") + 1] == "64" and cmd[cmd.index("--new-tokens") + 1] == "32"


def test_outputs_of_both_tools_parse():
    assert low.parse_output("llama.cpp", json.dumps(LLAMA_SAMPLE)) == {"prefill": 20.032074, "decode": 16.372451}
    figures = low.parse_output("dsmoe", json.dumps(DSMOE_SAMPLE))
    assert figures == {"prefill": 1.4997154580479122, "decode": 0.807595318647731,
                       "peak_rss_gib": 1622466560 / 2**30, "hit_rate": 0.35655737704918034,
                       "disk_bytes_per_token": 211692141.0, "plan_disk_bytes_per_token": 185213952.0}
    resident = {k: v for k, v in DSMOE_SAMPLE.items() if "link" not in k} | {"expert_cache_hit_rate": None}
    assert low.parse_output("dsmoe", json.dumps(resident))["disk_bytes_per_token"] is None


def test_exit_codes_and_statuses():
    assert low.exit_code(-9) == 137 and low.exit_code(0) == 0 and low.exit_code(1) == 1

    def status(code: int | None, oom: int | None, figures: dict | None = None) -> str:
        return low.Run("c", 1, 0, "dsmoe budget", [], code, 1.0, None, None, oom, figures or {}).status

    assert status(0, 0, {"decode": 1.0}) == "ok"
    assert status(137, 1) == "OOM-killed" and status(137, None) == "OOM-killed"
    assert status(137, 0) == "failed (exit 137)"  # killed by someone else
    assert status(None, 0) == "timed out" and status(0, 0) == "failed (exit 0)"  # no figures read


def _run(round_: int, tool: str, decode: float | None, prefill: float = 10.0, code: int = 0) -> low.Run:
    figures = {} if decode is None else {"decode": decode, "prefill": prefill, "hit_rate": 0.5,
                                         "disk_bytes_per_token": 60e6, "plan_disk_bytes_per_token": 50e6}
    return low.Run("75% of the model", 2 * 2**30, round_, tool, [], code, 5.0, 2**30 + round_ * 2**28, round_,
                   1 if code == 137 else 0, figures)


def test_report_medians_and_paired_ratios_by_hand():
    runs = [_run(0, "dsmoe budget", 2.0, 30.0), _run(0, "llama.cpp", 1.0, 20.0),
            _run(1, "dsmoe budget", 4.0, 30.0), _run(1, "llama.cpp", 1.0, 10.0),
            _run(2, "dsmoe budget", 3.0, 30.0), _run(2, "llama.cpp", 2.0, 15.0),
            _run(3, "dsmoe budget", None, code=137), _run(3, "llama.cpp", 9.0, 90.0),
            _run(4, "dsmoe budget", 8.0, 80.0), _run(4, "llama.cpp", None, code=1)]
    text = low.report(runs, "header")
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| 75% of the model (")}
    ours, theirs = rows["dsmoe budget"], rows["llama.cpp"]
    assert ours[2] == "4/5 (OOM-killed)" and theirs[2] == "4/5 (failed (exit 1))"
    assert ours[3] == "3.50" and theirs[3] == "1.50"  # medians of 2, 4, 3, 8 and of 1, 1, 2, 9
    # Paired over rounds 0-2 only (round 3's dsmoe run was killed, round 4's llama.cpp run failed):
    # decode 2/1, 4/1, 3/2 -> 2.00; prefill 30/20, 30/10, 30/15 -> 2.00.
    assert ours[5] == "2.00" and ours[6] == "2.00" and theirs[5] == ""
    assert ours[7] == "2.00 GiB"  # the largest peak: round 4's, 1 + 4/4 GiB
    assert ours[8] == "4" and ours[9] == "50%" and ours[10] == "60.0 MB (50.0 MB)"
    assert text.count("| OOM-killed | 137 |") == 1


def test_the_plan_prediction_parses_and_sits_beside_the_measured_runs(tmp_path):
    line = "predicted decode: 12.5 tok/s (310.2 MB/token from RAM at 18.0 GB/s + 41.0 MB/token from disk"
    assert low.parse_output("dsmoe fit plan", f"a table\n{line}\n") == {"predicted_decode": 12.5}
    with pytest.raises(ValueError):
        low.parse_output("dsmoe fit plan", "a table without it")
    args = low.argparse.Namespace(from_source=False, bits=4)
    cmd = low.plan_command(Path("/ckpt"), args, None, tmp_path / "t.jsonl")
    assert cmd[:4] == ["dsmoe", "info", "/ckpt", "--plan"] and cmd[cmd.index("--trace") + 1] == str(tmp_path / "t.jsonl")
    plan = low.Run("75% of the model", 2 * 2**30, -1, "dsmoe fit plan", [], 0, 1.0, 2**30, 0, 0,
                   {"predicted_decode": 2.5})
    runs = [_run(0, "dsmoe fit", 2.0), _run(0, "llama.cpp", 1.0), _run(1, "dsmoe fit", 4.0),
            _run(1, "llama.cpp", 1.0), _run(2, "dsmoe fit", 3.0), _run(2, "llama.cpp", 1.0), plan]
    text = low.report(runs, "header")
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| 75% of the model (")}
    assert "dsmoe fit plan" not in rows  # its figure is the last column of the run it predicts
    assert rows["dsmoe fit"][11] == "2.50 (1.20x)" and rows["llama.cpp"][11] == ""  # median 3.0 / 2.5
    assert "| dsmoe fit plan | ok | 0 | 1 | predicted 2.50 |" in text


def test_model_bytes_is_the_larger_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "b.safetensors").write_bytes(b"x" * 200)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)  # not weights
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 400)
    assert low.model_bytes(tmp_path, gguf) == 500
    assert low.model_bytes(None, gguf) == 400  # dsmoe reads the bf16 source: the GGUF's size counts


def test_a_run_over_its_cap_is_recorded_as_oom_killed():
    """A real cgroup: a process that writes 256 MiB under a 64 MiB cap is killed by the kernel, and
    one that fits reports its figures and its peak."""
    kind = low.detect_cgroup()
    if kind is None or os.geteuid() != 0 or not os.access(kind.parent, os.W_OK):
        pytest.skip("no writable memory cgroup here (needs root and cgroup v1 or v2 with memory)")
    cap = ("64 MiB", 64 * 2**20)
    hog = low.run_capped(kind, cap, 0, "dsmoe budget", [sys.executable, "-c", "b = b'x' * (256 << 20)"], 60, drop=False)
    assert hog.status == "OOM-killed" and hog.exit_code == 137 and (hog.failcnt or 0) > 0
    assert hog.peak_bytes is None or hog.peak_bytes <= 64 * 2**20
    fits = low.run_capped(kind, cap, 0, "llama.cpp", ["echo", json.dumps(LLAMA_SAMPLE)], 60, drop=False)
    assert fits.status == "ok" and fits.figures == {"prefill": 20.032074, "decode": 16.372451}
    assert not any(p.name.startswith(f"dsmoe-low-ram-{os.getpid()}-") for p in kind.parent.iterdir())
