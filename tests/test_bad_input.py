"""Every mistake a user can make with a checkpoint or a flag: one line, non-zero, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cli_runner import run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.code != 0
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def shard(path: Path, n: int = 1) -> Path:
    return path / f"model-0000{n}-of-00002.safetensors"


def test_missing_folder(capsys, tmp_path):
    result = run_cli(capsys, "info", str(tmp_path / "nowhere"))
    assert_one_line_error(result, "nowhere", "no such folder")


def test_folder_without_config(capsys, tmp_path):
    result = run_cli(capsys, "info", str(tmp_path))
    assert_one_line_error(result, "config.json")


def test_missing_shard(capsys, tiny_copy):
    shard(tiny_copy, 2).unlink()
    result = run_cli(capsys, "generate", "-m", str(tiny_copy), "hi")
    assert_one_line_error(result, "model-00002-of-00002.safetensors", "missing")


def test_truncated_shard(capsys, tiny_copy):
    data = shard(tiny_copy).read_bytes()
    shard(tiny_copy).write_bytes(data[: len(data) // 2])
    result = run_cli(capsys, "info", str(tiny_copy))
    assert_one_line_error(result, "model-00001-of-00002.safetensors", "truncated")


def test_corrupted_header(capsys, tiny_copy):
    data = bytearray(shard(tiny_copy).read_bytes())
    data[8:16] = b"\xff" * 8
    shard(tiny_copy).write_bytes(bytes(data))
    result = run_cli(capsys, "info", str(tiny_copy))
    assert_one_line_error(result, "model-00001-of-00002.safetensors", "corrupted")


def _rewrite_shard(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(capsys, tiny_copy):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    owner = tiny_copy / index["weight_map"].pop(name)
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _rewrite_shard(owner, lambda t: t.pop(name))
    result = run_cli(capsys, "generate", "-m", str(tiny_copy), "hi")
    assert_one_line_error(result, name, "missing")


def test_tensor_of_wrong_shape(capsys, tiny_copy):
    name = "model.layers.0.self_attn.q_proj.weight"
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    owner = tiny_copy / index["weight_map"][name]
    _rewrite_shard(owner, lambda t: t.__setitem__(name, t[name][:, :32].contiguous()))
    result = run_cli(capsys, "generate", "-m", str(tiny_copy), "hi")
    assert_one_line_error(result, name, "shape")


def test_unknown_model_type(capsys, tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "llama"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    result = run_cli(capsys, "info", str(tiny_copy))
    assert_one_line_error(result, "model_type", "llama")


def test_bad_config_value(capsys, tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["num_experts_per_tok"] = 99
    (tiny_copy / "config.json").write_text(json.dumps(config))
    result = run_cli(capsys, "info", str(tiny_copy))
    assert_one_line_error(result, "num_experts_per_tok")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "--max-new-tokens", "many", "hi"], "--max-new-tokens"),
        (["generate", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "--dtype", "int3", "hi"], "int3"),
        (["generate", "--frobnicate", "hi"], "--frobnicate"),
    ],
)
def test_bad_flag_values(capsys, tiny_path, args, fragment):
    result = run_cli(capsys, *args[:1], "-m", str(tiny_path), *args[1:])
    assert_one_line_error(result, fragment)


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(Exception, match="no such folder"):
        run_cli(capsys, "--debug", "info", str(tmp_path / "nowhere"))


def test_unknown_repo_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_cli(capsys, "info", "deepseek-ai/deepseek-moe-16b-base")
    assert_one_line_error(result, "deepseek-ai/deepseek-moe-16b-base", "cache")


def test_console_script_exit_code_and_one_line(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-c", "from dsmoe.cli.main import main; main()", "info", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no such folder" in proc.stderr
