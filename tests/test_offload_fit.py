"""A model fits itself: memory read from the cgroup too, a plan of its own when the model is too big,
refusals that show their sum, a tok/s prediction from measured bandwidths, and peak RSS in budget.

Expected byte counts are worked out here from the tiny fixture's config (hidden 64, intermediate
192, moe_intermediate 32, 16 routed + 2 shared experts, top-4, 3 layers of which 1 dense, vocab
512, untied lm_head), not by asking the code under test.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from dsmoe import load
from dsmoe.errors import UsageError
from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.offload import Budgets, Resources, make_plan, read_trace, simulate, store_of
from dsmoe.offload import bandwidth
from dsmoe.checkpoint import free_memory as memory_module
from dsmoe.checkpoint.free_memory import cgroup_room
from dsmoe.offload.plan import predict
from dsmoe.offload.schedule import READ_WORKERS
from dsmoe.cli.offload_view import plan_table

MiB = 2**20
# By hand, fp32 (4 bytes a weight). One routed expert: 3 x 64 x 32 = 6,144 weights = 24,576 bytes.
EXPERT = 3 * 64 * 32 * 4
# Everything else: embedding and lm_head 2 x 512 x 64 = 65,536; final norm 64; per layer attention
# 4 x 64 x 64 and two norms 2 x 64 (3 layers: 49,536); the dense MLP 3 x 64 x 192 = 36,864; per MoE
# layer two shared experts 2 x 6,144 and the router 16 x 64 (2 layers: 26,624). 178,624 weights.
REST = (65_536 + 64 + 49_536 + 36_864 + 26_624) * 4
# With experts on disk the CPU reads embedding rows from the file: 512 x 64 fewer weights held.
REST_ON_DISK = REST - 512 * 64 * 4
PER_SLOT = 2 * EXPERT  # one expert in each of the 2 MoE layers
WORKSPACE = 2 * EXPERT + 128 * MiB  # two experts in flight, activations and KV cache
MODEL = REST + 16 * PER_SLOT


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


V1_UNLIMITED = str(2**63 - 4096)


def test_cgroup_v1_room_is_the_limit_less_what_is_not_page_cache(tmp_path):
    memory = "sys/fs/cgroup/memory"
    root = _write(tmp_path, {
        "proc/self/cgroup": "5:cpu,cpuacct:/\n4:memory:/capped/job\n0::/\n",
        f"{memory}/capped/job/memory.limit_in_bytes": "2000000000\n",
        f"{memory}/capped/job/memory.usage_in_bytes": "1500000000\n",
        f"{memory}/capped/job/memory.stat": "cache 500000000\ntotal_cache 500000000\n"
                                            "total_inactive_file 300000000\ntotal_active_file 100000000\n",
        f"{memory}/capped/memory.limit_in_bytes": V1_UNLIMITED,
        f"{memory}/memory.limit_in_bytes": V1_UNLIMITED,
    })
    # 2.0 GB - (1.5 GB used - 0.4 GB of file pages the kernel can drop) = 0.9 GB.
    assert cgroup_room(root) == 900_000_000
    # A parent's tighter cap binds: 1.0 GB - (0.95 GB - 0.05 GB of cache) = 0.1 GB.
    _write(root, {f"{memory}/capped/memory.limit_in_bytes": "1000000000",
                  f"{memory}/capped/memory.usage_in_bytes": "950000000",
                  f"{memory}/capped/memory.stat": "total_cache 50000000\n"})
    assert cgroup_room(root) == 100_000_000


def test_cgroup_v2_room_and_unlimited_and_no_cgroup(tmp_path):
    group = "sys/fs/cgroup/user.slice/app"
    root = _write(tmp_path, {
        "proc/self/cgroup": "0::/user.slice/app\n",
        f"{group}/memory.max": "1000000000\n",
        f"{group}/memory.current": "800000000\n",
        f"{group}/memory.stat": "anon 500000000\nfile 300000000\nactive_file 100000000\ninactive_file 150000000\n",
        "sys/fs/cgroup/user.slice/memory.max": "max\n",
    })
    # 1.0 GB - (0.8 GB - 0.25 GB of active and inactive file pages; shmem in "file" is not dropped).
    assert cgroup_room(root) == 450_000_000
    _write(root, {f"{group}/memory.max": "max\n"})
    assert cgroup_room(root) is None
    assert cgroup_room(tmp_path / "nowhere") is None


def test_cgroup_namespace_reads_the_mount_root(tmp_path):
    # Inside a container the process sees its own cgroup as "/", whatever the host calls it.
    root = _write(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "600000000",
                             "sys/fs/cgroup/memory.current": "100000000", "sys/fs/cgroup/memory.stat": "file 0\n"})
    assert cgroup_room(root) == 500_000_000


def test_measure_takes_the_cgroup_when_it_is_smaller(monkeypatch):
    monkeypatch.setattr(memory_module, "cgroup_room", lambda: 12345)
    measured = Resources.measure(torch.device("cpu"))
    assert (measured.ram_available, measured.ram_source) == (12345, "memory cgroup limit")
    monkeypatch.setattr(memory_module, "cgroup_room", lambda: None)
    assert Resources.measure(torch.device("cpu")).ram_source == "MemAvailable"


# 90% of this is 135,450,000 bytes: less than the whole model and its workspace (135,718,656), room
# for (135,450,000 - REST - WORKSPACE) // PER_SLOT = 468,624 // 49,152 = 9 experts per layer.
TIGHT = Resources(gpu_free=None, ram_available=150_500_000, process_rss=0)
ROOMY = Resources(gpu_free=None, ram_available=10**12, process_rss=0)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))


def test_a_model_too_big_for_ram_gets_its_experts_on_disk_and_the_same_output(tiny_path, prompt):
    assert MODEL + 128 * MiB > TIGHT.ram_available * 0.9 >= REST_ON_DISK + WORKSPACE + PER_SLOT
    # (150.5 MB x 0.9 - 134,266,880 - 583,424) // 49,152 = 12 slots a layer.
    resident, _ = load(tiny_path, dtype="fp32", resources=ROOMY)
    assert store_of(resident) is None
    fitted, _ = load(tiny_path, dtype="fp32", resources=TIGHT)
    store = store_of(fitted)
    assert store is not None and store.plan.on_disk
    assert [(t.name, t.slots) for t in store.plan.tiers] == [("ram", 12), ("disk", 16)]
    assert all(not moe.experts for moe in fitted.moe_layers())
    assert store.plan.fitted is not None and "12 of 16 per layer" in store.plan.fitted
    assert "150.50 MB is available" in store.plan.fitted and "135.72 MB at float32" in store.plan.fitted
    with torch.inference_mode():
        assert torch.equal(fitted(prompt), resident(prompt))
        assert torch.equal(fitted.generate(prompt, max_new_tokens=6), resident.generate(prompt, max_new_tokens=6))
    assert store.stats.misses() > 0
    store.detach()


def test_the_cli_says_in_one_line_that_it_planned_for_itself(capsys, monkeypatch, tiny_path):
    args = ["generate", "The software", "-m", str(tiny_path), "-n", "6", "--dtype", "fp32"]
    plain = run_cli(capsys, *args)
    monkeypatch.setattr(Resources, "measure", classmethod(lambda cls, device: TIGHT))
    fitted = run_cli(capsys, *args)
    assert plain.code == fitted.code == 0, fitted.err
    assert fitted.out == plain.out
    lines = [line for line in fitted.err.splitlines() if "routed experts stay on disk" in line]
    assert len(lines) == 1 and "--max-ram sets the budget" in lines[0]
    assert "routed experts stay on disk" not in plain.err


def test_refusals_do_the_arithmetic(tiny_path):
    config = open_checkpoint(tiny_path).config
    used = Resources(gpu_free=None, ram_available=10**12, process_rss=300_000_000)
    with pytest.raises(UsageError) as refused:
        make_plan(config, torch.device("cpu"), Budgets(max_ram=0.1e9), used, torch.float32)
    message = str(refused.value)
    # 300,000,000 + 134,266,880 + 583,424 + 49,152 = 434,899,456 bytes: 0.44 GB rounded up.
    assert 300_000_000 + WORKSPACE + REST_ON_DISK + PER_SLOT == 434_899_456
    for part in ("--max-ram 0.1 (100.00 MB) is too small", "the process already uses 300.00 MB",
                 "134.27 MB", "the resident weights 583.4 kB", "one expert per MoE layer 49.2 kB",
                 "add up to 434.90 MB", "the least that works is --max-ram 0.44"):
        assert part in message, (part, message)
    assert "-0." not in message
    make_plan(config, torch.device("cpu"), Budgets(max_ram=0.44e9), used, torch.float32)  # the least works
    with pytest.raises(UsageError):
        make_plan(config, torch.device("cpu"), Budgets(max_ram=0.43e9), used, torch.float32)
    # No budget and too little free: what would have to be free, 134,899,456 / 0.9 -> 0.15 GB.
    with pytest.raises(UsageError, match=r"available RAM \(90.00 MB.*add up to 134.90 MB; it needs at least 0.15 GB"):
        make_plan(config, torch.device("cpu"), Budgets(), Resources(None, 100_000_000, 0), torch.float32)


def test_an_impossible_budget_is_one_line_with_the_numbers(capsys, tiny_path):
    result = run_cli(capsys, "generate", "hi", "-m", str(tiny_path), "-n", "2", "--max-ram", "0.1")
    assert result.code == 1 and "Traceback" not in result.err
    assert "--max-ram 0.1 (100.00 MB) is too small" in result.err and "the least that works is --max-ram" in result.err


# A --max-ram that leaves 4 of 16 experts per layer in RAM (nothing else used by the process).
FOUR_SLOTS = REST_ON_DISK + WORKSPACE + 4 * PER_SLOT + 1


def test_prediction_matches_a_hand_computation(tiny_path):
    plan = make_plan(open_checkpoint(tiny_path).config, torch.device("cpu"), Budgets(max_ram=FOUR_SLOTS),
                     ROOMY, torch.float32)
    assert plan.on_disk and plan.device_slots == 4
    # A token reads the resident part but 511 of the 512 embedding rows (714,496 - 130,816 bytes) and
    # 2 layers x top-4 experts (196,608 bytes): 780,288 bytes from RAM. Even routing hits 4/16, so
    # 3/4 of the experts come from disk: 147,456 bytes.
    even = predict(plan, memory_bandwidth=10e9, disk_bandwidth=1e9)
    assert (even.memory_bytes, even.disk_bytes, even.hit_rate) == (780_288, 147_456, 0.25)
    assert even.seconds_per_token == pytest.approx(780_288 / 10e9 + 147_456 / 1e9)
    assert even.tokens_per_second == pytest.approx(4434.88, abs=0.01)
    given = predict(plan, memory_bandwidth=10e9, disk_bandwidth=1e9, hit_rate=0.5)
    assert given.disk_bytes == 98_304 and given.tokens_per_second == pytest.approx(1 / 1.763328e-4)
    # A simulated count of the bytes a decode step reads (misses and wrong guesses) replaces the misses'.
    counted = predict(plan, memory_bandwidth=10e9, disk_bandwidth=1e9, hit_rate=0.5, disk_bytes=150_000)
    assert counted.disk_bytes == 150_000 and counted.seconds_per_token == pytest.approx(780_288 / 10e9 + 150e-6)
    whole = make_plan(open_checkpoint(tiny_path).config, torch.device("cpu"), Budgets(), ROOMY, torch.float32)
    assert predict(whole, 10e9, 1e9).disk_bytes == 0
    # Four slots copied into within RAM: each of the 3/4 that miss is read and written once more,
    # 780,288 + 2 x 196,608 x 3/4 = 1,075,200 bytes, none from disk.
    copies = make_plan(open_checkpoint(tiny_path).config, torch.device("cpu"), Budgets(expert_cache=4), ROOMY,
                       torch.float32)
    assert (predict(copies, 10e9, 1e9).memory_bytes, predict(copies, 10e9, 1e9).disk_bytes) == (1_075_200, 0)
    caption = str(plan_table(plan, even).caption)
    assert "predicted decode: 4434.9 tok/s" in caption and "RAM hit rate 25%" in caption
    with pytest.raises(UsageError, match="between 0 and 1"):
        predict(plan, 10e9, 1e9, hit_rate=1.5)


def test_info_plan_predicts_from_a_hit_rate_or_a_trace(capsys, monkeypatch, tiny_path, tmp_path):
    trace = tmp_path / "routing.jsonl"
    recorded = run_cli(capsys, "generate", "The software", "-m", str(tiny_path), "-n", "6", "--dtype", "fp32",
                       "--expert-cache", "4", "--trace", str(trace))
    assert recorded.code == 0, recorded.err
    monkeypatch.setattr(Resources, "measure", classmethod(lambda cls, device: ROOMY))
    base = ["info", str(tiny_path), "--plan", "--dtype", "fp32", "--max-ram", str(FOUR_SLOTS / 1e9)]
    given = run_cli(capsys, *base, "--hit-rate", "0.5")
    assert given.code == 0, given.err
    assert "predicted decode:" in given.out and "RAM hit rate 50%" in given.out
    simulated = run_cli(capsys, *base, "--trace", str(trace))
    assert simulated.code == 0, simulated.err
    assert "predicted decode:" in simulated.out and "RAM hit rate" in simulated.out
    alone = run_cli(capsys, "info", str(tiny_path), "--hit-rate", "0.5")
    assert alone.code == 1 and "go with --plan" in alone.err


def test_info_plan_replays_the_prefetch_of_a_bench_trace(capsys, monkeypatch, tiny_path, tmp_path):
    """``bench --trace`` under a disk plan records the prefetcher's guesses; ``info --plan --trace``
    predicts with the decode steps' hit rate of their replay, prefetch included (as the run had it)."""
    monkeypatch.setattr(Resources, "measure", classmethod(lambda cls, device: ROOMY))
    trace = tmp_path / "bench.jsonl"
    budget = ["--dtype", "fp32", "--max-ram", str(FOUR_SLOTS / 1e9)]
    ran = run_cli(capsys, "bench", "-m", str(tiny_path), *budget, "--prompt-tokens", "12", "-n", "8", "--json",
                  "--trace", str(trace))
    assert ran.code == 0, ran.err
    routing = read_trace(trace)
    assert routing.has_guesses
    with_guesses, without = simulate(routing, "lru", 4), simulate(routing, "lru", 4, prefetch=False)
    assert with_guesses.decode_hit_rate != without.decode_hit_rate
    shown = run_cli(capsys, "info", str(tiny_path), "--plan", *budget, "--trace", str(trace))
    assert shown.code == 0, shown.err
    assert f"RAM hit rate {with_guesses.decode_hit_rate:.0%}" in shown.out
    plain = run_cli(capsys, "info", str(tiny_path), "--plan", *budget, "--no-prefetch", "--trace", str(trace))
    assert f"RAM hit rate {without.decode_hit_rate:.0%}" in plain.out


def test_disk_probe_reads_with_o_direct(tmp_path, monkeypatch):
    data = tmp_path / "shard.bin"
    data.write_bytes(os.urandom(9 * MiB + 123))  # not a whole number of chunks: the last read is short
    buffered = []
    monkeypatch.setattr(bandwidth, "_read_buffered", lambda *a: buffered.append(a) or 0)
    try:
        rate = bandwidth.disk_bandwidth([data])
    except OSError:
        pytest.skip(f"{tmp_path} takes O_DIRECT opens but not reads")
    assert rate > 0 and buffered == []


def test_disk_probe_keeps_as_many_reads_in_flight_as_the_disk_tier(tmp_path, monkeypatch):
    data = tmp_path / "shard.bin"
    data.write_bytes(os.urandom(16 * MiB))
    busy, most, lock, real = [0], [0], threading.Lock(), os.preadv

    def slow_read(fd, buffers, offset):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.05)
        with lock:
            busy[0] -= 1
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", slow_read)
    assert bandwidth.disk_bandwidth([data], limit=16 * MiB) > 0
    assert most[0] == READ_WORKERS == 4


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_disk_probe_falls_back_to_buffered_reads_where_o_direct_is_refused(monkeypatch):
    calls = []
    real_buffered, real_open = bandwidth._read_buffered, os.open
    monkeypatch.setattr(bandwidth, "_read_buffered", lambda *a: calls.append(a[0]) or real_buffered(*a))
    fd, name = tempfile.mkstemp(dir="/dev/shm")
    try:
        os.write(fd, os.urandom(5 * MiB))
        os.close(fd)
        try:
            os.close(os.open(name, os.O_RDONLY | os.O_DIRECT))
        except OSError:  # older kernels' tmpfs refuses O_DIRECT with EINVAL, as the probe expects
            pass
        else:  # tmpfs takes O_DIRECT since Linux 6.6: refuse it as older ones do
            def refuse_direct(path, flags, *rest):
                if flags & os.O_DIRECT:
                    raise OSError(errno.EINVAL, "Invalid argument", path)
                return real_open(path, flags, *rest)
            monkeypatch.setattr(os, "open", refuse_direct)
        assert bandwidth.disk_bandwidth([Path(name)], limit=4 * MiB) > 0
    finally:
        monkeypatch.undo()
        os.unlink(name)
    assert calls == [Path(name)]


SPEC = "16b:layers=4,hidden_size=512,intermediate_size=1024,moe_intermediate_size=512,vocab_size=4096"
# 64 routed experts of 3 x 512 x 512 bf16 weights (1.57 MB) in 3 MoE layers: 302 MB of experts.
EXPERTS_BYTES = 64 * 3 * 3 * 512 * 512 * 2


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory) -> Path:
    from dsmoe.perf.synthetic import SyntheticCheckpoint, save_checkpoint

    path = tmp_path_factory.mktemp("synthetic") / "model"
    save_checkpoint(SyntheticCheckpoint(SPEC), path)
    return path


# The child's own high-water mark: VmHWM belongs to the address space exec made. (ru_maxrss from
# wait4 would not do: Linux carries the forking parent's peak, this test process's, across exec.)
CHILD = """
import os, sys
from dsmoe.cli.main import main
sys.argv = ["dsmoe", *sys.argv[1:]]
try:
    main()
finally:
    status = open("/proc/self/status").read()
    peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    open(os.environ["PEAK_FILE"], "w").write(peak)
"""


def _peak_rss(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Peak RSS in bytes of one child running the CLI, and what it wrote to stderr."""
    peak_file = tmp_path / "peak.txt"
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PEAK_FILE": str(peak_file)})
    assert child.returncode == 0, child.stderr
    return int(peak_file.read_text()) * 1024, child.stderr  # VmHWM is in kB (KiB)


def test_peak_rss_stays_under_max_ram(synthetic_path, tmp_path):
    run = ["generate", "hello", "-m", str(synthetic_path), "-n", "2", "--dtype", "bf16", "--stats"]
    resident, _ = _peak_rss(tmp_path, *run)
    # Half the experts' bytes less than the resident run's peak: experts must go to disk.
    budget = resident - EXPERTS_BYTES // 2
    peak, err = _peak_rss(tmp_path, *run, "--max-ram", f"{budget / 1e9:.3f}")
    assert "disk->ram" in err, err
    assert peak < budget, (peak, budget, resident)


def _own_memory_cgroup() -> Path | None:
    """This process's v1 memory cgroup folder, where a child cgroup can be made; None elsewhere."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.strip("/")
            return folder if (folder / "memory.limit_in_bytes").exists() and os.access(folder, os.W_OK) else None
    return None


CAP = 500 * 10**6  # below what the synthetic model needs in memory (302 MB of experts + the interpreter + workspace)


def test_with_no_flag_a_run_capped_below_the_model_plans_itself_and_completes(synthetic_path, tmp_path):
    parent = _own_memory_cgroup()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory controller here to cap a child with")
    group = parent / f"dsmoe-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(CAP))
        join = group / "cgroup.procs"
        child = subprocess.run(
            [sys.executable, "-c", CHILD, "generate", "hello", "-m", str(synthetic_path), "-n", "2", "--dtype", "bf16"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PEAK_FILE": str(tmp_path / "peak.txt")},
            preexec_fn=lambda: join.write_text(str(os.getpid())),  # joins the capped cgroup before exec
        )
    finally:
        group.rmdir()
    assert child.returncode == 0, child.stderr  # 137 would be the OOM killer
    assert "memory cgroup limit" in child.stderr and "routed experts stay on disk" in child.stderr, child.stderr
