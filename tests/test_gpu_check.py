"""benchmarks/gpu_check.sh, as far as a machine without a GPU can run it: the script parses (and passes
shellcheck where installed), and its CPU mode runs the same Python check on the in-RAM stand-in device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_offload_check  # noqa: E402

from dsmoe.perf.synthetic import SyntheticCheckpoint  # noqa: E402


def test_the_script_parses_and_is_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_tensors_drawn_ahead_are_the_serial_ones():
    spec = "16b:layers=2,vocab_size=300,hidden_size=64,intermediate_size=96,moe_intermediate_size=16,n_routed_experts=8"
    ahead, serial = gpu_offload_check.DrawnAhead(spec, 3, workers=4), SyntheticCheckpoint(spec, 3)
    names = serial.tensor_names()
    for name in names[5:] + names[:5]:  # out of the order it draws in, too
        assert torch.equal(ahead.get(name), serial.get(name)), name
    ahead.close()


def test_cpu_mode_runs_the_check(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout, (tmp_path / "offload.log").read_text())
    result = json.loads((tmp_path / "gpu_offload.json").read_text())
    runs = {r["configuration"]: r for r in result["runs"]}
    assert list(runs) == ["all resident", "--expert-cache 4", "--expert-cache 8"]
    assert len(result["reference_tokens"]) == 6
    assert all(r["tokens_equal"] and r["max_logit_diff"] == 0 for r in runs.values())
    # The plan's even-routing bytes, by hand: 2 MoE layers x top-4 x (1 - slots/16) x one bf16 expert
    # (3 x 64 x 32 weights x 2 bytes = 12288).
    assert runs["--expert-cache 4"]["expected_link_bytes_per_token"] == {"ram->cpu": 2 * 4 * 0.75 * 12288}
    assert runs["--expert-cache 8"]["expected_link_bytes_per_token"] == {"ram->cpu": 2 * 4 * 0.5 * 12288}
    for slots in (4, 8):
        run = runs[f"--expert-cache {slots}"]
        assert run["device_slots"] == slots and 0 < run["expert_cache_hit_rate"] < 1
        assert run["decode_link_bytes_per_token"]["ram->cpu"] > 0
    summary = (tmp_path / "summary.txt").read_text()
    assert "CPU mode" in summary and "offload: exit 0" in summary
