"""The offload flags through the CLI: plan, stats, trace, simulate, and their mistakes."""

from __future__ import annotations

from cli_runner import run_cli


def test_generate_with_one_slot_matches_the_resident_run_and_records_a_trace(capsys, tiny_path, tmp_path):
    args = ["generate", "The software", "-m", str(tiny_path), "-n", "8", "--dtype", "fp32"]
    plain = run_cli(capsys, *args)
    trace = tmp_path / "run.jsonl"
    offloaded = run_cli(capsys, *args, "--expert-cache", "1", "--policy", "lfu", "--stats", "--trace", str(trace))
    assert plain.code == offloaded.code == 0, offloaded.err
    assert offloaded.out == plain.out
    assert "expert placement" in offloaded.err and "1 of 16 experts per layer" in offloaded.err
    assert "expert cache over" in offloaded.err and "ram->cpu" in offloaded.err
    simulated = run_cli(capsys, "simulate", str(trace), "--slots", "1,4", "--policy", "lru", "--no-prefetch")
    assert simulated.code == 0, simulated.err
    rows = [line for line in simulated.out.splitlines() if "lru" in line]
    assert len(rows) == 2 and "0.0%" in rows[0]  # one slot, top-4 routing, no prefetch: nothing can hit
    replayed = run_cli(capsys, "simulate", str(trace), "--slots", "1", "--policy", "lru")
    assert "prefetch replayed from the trace's guesses" in replayed.out
    row = next(line for line in replayed.out.splitlines() if "lru" in line)
    assert "0.0%" not in row  # the prefetcher's guess lands in the slot before its layer runs


def test_info_plan_shows_the_tiers(capsys, tiny_path):
    result = run_cli(capsys, "info", str(tiny_path), "--plan", "--expert-cache", "2")
    assert result.code == 0, result.err
    assert "expert placement (compute on cpu)" in result.out and "2 of 16 experts per layer" in result.out


def test_offload_mistakes_are_one_line(capsys, tiny_path, tmp_path):
    base = ["generate", "hi", "-m", str(tiny_path), "-n", "2"]
    for extra, message in [
        (["--policy", "fifo"], "unknown cache policy"),
        (["--gpu-mem", "4"], "--gpu-mem needs a CUDA GPU"),
        (["--max-ram", "-1"], "--max-ram must be a positive"),
        (["--expert-cache", "0"], "--expert-cache must be at least 1"),
    ]:
        result = run_cli(capsys, *base, *extra)
        assert result.code == 1 and message in result.err and "Traceback" not in result.err, (extra, result.err)
    missing = run_cli(capsys, "simulate", str(tmp_path / "nope.jsonl"))
    assert missing.code == 1 and "no such trace file" in missing.err
