"""The CLI's error boundary: every command, fed bad inputs, answers one ``error:`` line and a
non-zero exit, never a traceback; and the library raises only ``DsmoeError`` for bad input."""

from __future__ import annotations

import errno
import io
import json
import math
from pathlib import Path

import pytest

from cli_runner import run_cli
from dsmoe.cli.app import app
from dsmoe.errors import DsmoeError

NOT_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over a Latin-1 argument


def _config_edit(folder: Path, **changes) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _tokenizer_config_edit(folder: Path, **changes) -> None:  # type: ignore[no-untyped-def]
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.update(changes)
    path.write_text(json.dumps(config))


def _not_a_checkpoint(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


# Each case: (command, arguments, how to prepare the tiny copy, words the error line must hold).
# {tiny} is the shared fixture, {copy} a writable copy, {tmp} the test's folder.
CASES: list[tuple[str, list[str], object, tuple[str, ...]]] = [
    ("generate", ["-m", "{tiny}", "--temperature", "nan", "hi"], None, ("temperature",)),
    ("generate", ["-m", "{tiny}", "--temperature", "inf", "hi"], None, ("temperature",)),
    ("generate", ["-m", "{tiny}", "--repetition-penalty", "nan", "hi"], None, ("repetition_penalty",)),
    ("generate", ["-m", "{tiny}", "--max-ram", "inf", "hi"], None, ("--max-ram",)),
    ("generate", ["-m", "{tiny}", "--gpu-mem", "nan", "hi"], None, ("--gpu-mem",)),
    ("generate", ["-m", "{tiny}", NOT_UTF8], None, ("UTF-8",)),
    ("generate", ["-m", "{copy}", "hi"], lambda c: _config_edit(c, vocab_size=100), ("vocabulary", "vocab_size")),
    ("generate", ["-m", "{copy}", "hi"], lambda c: _tokenizer_config_edit(c, chat_template="{% if %}"), ("chat_template",)),
    ("generate", ["-m", "{copy}", "hi"], lambda c: _tokenizer_config_edit(c, chat_template=7), ("chat_template",)),
    ("chat", ["-m", "{tiny}", "--system", NOT_UTF8], None, ("UTF-8",)),
    ("chat", ["-m", "{tiny}", "--temperature", "nan"], None, ("temperature",)),
    ("chat", ["-m", "{tiny}"], "stdin", ("UTF-8", "standard input")),
    ("info", ["{copy}"], lambda c: _config_edit(c, num_attention_heads=0), ("num_attention_heads",)),
    ("info", ["{copy}"], lambda c: _config_edit(c, rope_scaling="linear"), ("rope_scaling",)),
    ("info", ["{copy}"], lambda c: _config_edit(c, quantization_config="nf4"), ("quantization_config",)),
    ("info", ["{copy}"], lambda c: _config_edit(c, rope_theta="abc"), ("rope_theta",)),
    ("info", ["{copy}"], lambda c: _config_edit(c, rope_theta=0), ("rope_theta",)),
    ("info", ["{copy}"], lambda c: _config_edit(c, max_position_embeddings=0), ("max_position_embeddings",)),
    ("info", ["{copy}"], lambda c: _config_edit(c, num_hidden_layers=True), ("num_hidden_layers",)),
    ("info", ["{copy}", "--max-ram", "nan"], None, ("--max-ram",)),
    ("eval", ["--task", "mmlu", "-m", "{tiny}", "--shots", "-1"], None, ("shots",)),
    ("eval", ["--task", "mmlu", "-m", "{tiny}", "--limit", "0"], None, ("limit",)),
    ("eval", ["--task", "mmlu", "-m", "{tiny}", "--batch-size", "0"], None, ("batch_size",)),
    ("eval", ["--task", "mmlu", "-m", "{tiny}", "--max-ram", "nan"], None, ("--max-ram",)),
    ("eval", ["--task", "mmlu", "-m", "{tiny}", "--output", "{tmp}/a-file/out.json"], "file", ("--output",)),
    ("eval", ["--task", "mmlu", "-m", "{tiny}", "--log-samples", "{tmp}"], None, ("--log-samples", "folder")),
    ("quantize", ["{tiny}", "{tmp}/q", "--shard-size", "nan"], None, ("--shard-size",)),
    ("quantize", ["{tiny}", "{tmp}/q", "--shard-size", "-inf"], None, ("--shard-size",)),
    ("quantize", ["{tiny}", "{tmp}/mine", "--force"], lambda c: _not_a_checkpoint(c.parent / "mine"), ("--force",)),
    ("quantize", ["{tiny}", "{tmp}/a-file/q"], "file", ("cannot write",)),
    ("bench", ["--synthetic", "16b:layers=0"], None, ("num_hidden_layers",)),
    ("bench", ["--synthetic", "16b:layers=2", "--max-ram", "nan"], None, ("--max-ram",)),
    ("simulate", ["{tmp}/no-such.trace"], None, ("no-such.trace",)),
    ("serve", ["-m", "{tmp}/nowhere"], None, ("nowhere",)),
    ("perplexity", ["-m", "{tiny}", "--file", "{tmp}/none.txt"], None, ("none.txt",)),
    ("list", ["--frobnicate"], None, ("--frobnicate",)),
    ("pull", [NOT_UTF8], None, ("UTF-8",)),
    ("rm", ["{tmp}/never-made"], None, ("never-made",)),
    ("simulate", ["{tmp}/t.trace", "--slots", "99"], "trace", ("slots", "99")),
]


def test_every_command_has_bad_inputs_here():
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    missing = commands - {case[0] for case in CASES}
    assert not missing, f"add bad inputs for {sorted(missing)} to CASES"


@pytest.mark.parametrize("command, args, prepare, words", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line(capsys, monkeypatch, tiny_path, tiny_copy, tmp_path, command, args, prepare, words):
    if prepare == "stdin":
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello \xff\xfe there\n")))
    elif prepare == "file":
        (tmp_path / "a-file").write_text("x")
    elif prepare == "trace":
        made = run_cli(capsys, "generate", "-m", str(tiny_path), "-n", "2", "--trace", str(tmp_path / "t.trace"), "hi")
        assert made.code == 0, made.err
    elif prepare is not None:
        prepare(tiny_copy)  # type: ignore[operator]
    filled = [a.format(tiny=tiny_path, copy=tiny_copy, tmp=tmp_path) for a in args]
    result = run_cli(capsys, command, *filled)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code != 0 and "Traceback" not in result.err + result.out, result.err
    assert len(lines) == 1 and lines[0].startswith("error:"), result.err
    for word in words:
        assert word in lines[0], lines[0]


def test_quantize_on_a_full_disk_leaves_nothing(capsys, monkeypatch, tiny_path, tmp_path):
    from dsmoe.quant import convert

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "write_safetensors", full)
    result = run_cli(capsys, "quantize", str(tiny_path), str(tmp_path / "q"), "--shard-size", "0.0001")
    assert result.code == 1 and "No space left on device" in result.err and "Traceback" not in result.err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- the library


def _library_cases(tiny: Path, tmp: Path):  # type: ignore[no-untyped-def]
    from dsmoe import load
    from dsmoe.perf.synthetic import SyntheticCheckpoint
    from dsmoe.evals.runner import EvalSettings
    from dsmoe.checkpoint.config import DeepseekConfig
    from dsmoe.model.generate import SamplingSettings
    from dsmoe.loading import LoadOptions
    from dsmoe.quant import QuantSpec
    from dsmoe.quant.convert import quantize_checkpoint

    config = json.loads((tiny / "config.json").read_text())
    nan = math.nan
    return {
        "temperature nan": lambda: SamplingSettings(temperature=nan),
        "repetition_penalty nan": lambda: SamplingSettings(repetition_penalty=nan),
        "top_p nan": lambda: SamplingSettings(top_p=nan),
        "max_ram inf": lambda: LoadOptions(max_ram=math.inf),
        "shots -1": lambda: EvalSettings(model="m", tasks=["t"], shots=-1),
        "limit 0": lambda: EvalSettings(model="m", tasks=["t"], limit=0),
        "layers=0": lambda: SyntheticCheckpoint("16b:layers=0"),
        "rope_theta -1": lambda: DeepseekConfig.from_dict({**config, "rope_theta": -1}),
        "rope_scaling str": lambda: DeepseekConfig.from_dict({**config, "rope_scaling": "linear"}),
        "eos list of str": lambda: DeepseekConfig.from_dict({**config, "eos_token_id": ["x"]}),
        "shard bytes 0": lambda: quantize_checkpoint(tiny, tmp / "q", QuantSpec(bits=8, quant_type="int8"),
                                                     shard_bytes=0),
        "load a file": lambda: load(tiny / "config.json"),
        "load nowhere": lambda: load(tmp / "nowhere"),
    }


def test_the_library_raises_only_dsmoe_errors(tiny_path, tmp_path):
    for name, call in _library_cases(tiny_path, tmp_path).items():
        with pytest.raises(DsmoeError):
            call()
        assert not (tmp_path / "q").exists(), name


def test_chat_session_survives_deep_json_and_nan_temperature(tiny_path, tmp_path):
    from dsmoe import load
    from dsmoe.errors import UsageError
    from dsmoe.model.chat import ChatSession

    model, tokenizer = load(tiny_path, dtype="fp32")
    session = ChatSession(model, tokenizer)
    with session.ask("hello") as reply:
        "".join(reply)
    before = list(session.messages)
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UsageError, match="nested too deeply"):
        session.load(deep)
    with pytest.raises(UsageError, match="temperature"):
        session.set("temperature", "nan")
    with pytest.raises(UsageError, match="not a regular file"):
        session.load(tmp_path)
    assert session.messages == before and math.isfinite(session.settings.temperature)
    with session.ask("still here?") as reply:
        "".join(reply)
    assert len(session.messages) == len(before) + 2
