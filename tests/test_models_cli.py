"""``dsmoe pull``, ``list`` and ``rm`` with the real huggingface_hub client against a local hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import FakeHub

REPO = "test-org/tiny-deepseek"
DSMOE_FILES = {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(tiny_path: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    repo = tmp_path / "served"
    shutil.copytree(tiny_path, repo, ignore=shutil.ignore_patterns("reference.safetensors"))
    (repo / "README.md").write_text("# a model card dsmoe does not read\n")
    (repo / "pytorch_model.bin").write_bytes(b"a pickle dsmoe never downloads")
    with FakeHub({REPO: repo}) as server:
        yield server


def _gets(hub: FakeHub) -> set[str]:
    """The files the client downloaded (GET) from the hub so far."""
    return {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from dsmoe.cli.main import main; main()", *args],
                          capture_output=True, text=True, timeout=180, env=env)


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"),
                HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1",
                OMP_NUM_THREADS="1")


def test_pull_list_rm_against_a_local_hub(hub: FakeHub, env: dict[str, str], tiny_path: Path, tmp_path: Path):
    biggest = max(DSMOE_FILES, key=lambda name: (tiny_path / name).stat().st_size)
    hub.cut.add(biggest)  # every download of the largest shard drops halfway
    failed = _run(env, "pull", REPO)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "run it again to resume" in failed.stderr.strip().splitlines()[-1]
    first = _gets(hub)
    hub.cut.clear()
    hub.requests.clear()
    pulled = _run(env, "pull", REPO)
    assert pulled.returncode == 0, pulled.stderr
    again = _gets(hub)
    assert biggest in again and not (again & (first - {biggest}))  # finished files are not fetched again
    assert first | again == DSMOE_FILES  # only the files dsmoe reads: no README, no pickle

    snapshot = Path(pulled.stdout.split("ready at ")[1].split(" (use it")[0])
    assert {p.name for p in snapshot.iterdir()} == DSMOE_FILES
    for name in DSMOE_FILES:
        assert _sha(snapshot / name) == _sha(tiny_path / name), name

    quantized = tmp_path / "tiny-nf4"
    made = _run(env, "quantize", "-m", REPO, str(quantized), "--bits", "4")  # the repo id, from the cache now
    assert made.returncode == 0, made.stderr

    listed = _run(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["name"]: m for m in json.loads(listed.stdout)}
    assert set(models) == {REPO, str(quantized.resolve())}
    assert models[REPO]["format"] == "bf16" and models[REPO]["layers"] == 3 and models[REPO]["source"] == "hf-cache"
    assert models[REPO]["size_bytes"] == sum((tiny_path / name).stat().st_size for name in DSMOE_FILES)
    assert models[str(quantized.resolve())]["format"] == "nf4"
    table = _run(env, "list")
    assert REPO in table.stdout and "Hugging Face cache" in table.stdout and "dsmoe quantize" in table.stdout

    removed = _run(env, "rm", REPO)
    assert removed.returncode == 0 and f"removed {REPO}" in removed.stdout, removed.stderr
    assert not (tmp_path / "hf" / "hub" / "models--test-org--tiny-deepseek").exists()
    gone = _run(env, "rm", str(quantized))
    assert gone.returncode == 0, gone.stderr
    assert not quantized.exists()
    assert json.loads(_run(env, "list", "--json").stdout) == []
    unknown = _run(env, "rm", "nobody/nothing")
    assert unknown.returncode == 1 and "dsmoe list" in unknown.stderr and "Traceback" not in unknown.stderr


def test_pull_of_a_missing_repo_is_one_line(env: dict[str, str]):
    result = _run(env, "pull", "test-org/no-such-model")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "test-org/no-such-model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
