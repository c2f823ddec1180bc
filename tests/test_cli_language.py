"""What a new user meets first: one flag language across commands, and output that says what happened."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import typer

from cli_runner import run_cli
from dsmoe import load
from dsmoe.cli import common
from dsmoe.cli.app import app

FIXTURE_ARGS = ["--dtype", "fp32"]


def _commands() -> dict[str, set[str]]:
    """Every command's option names, as click parses them."""
    from dsmoe.cli import main  # noqa: F401  (registers the commands)

    group = typer.main.get_command(app)
    return {name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
            for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


def _option(command: str, flag: str):  # type: ignore[no-untyped-def]
    group = typer.main.get_command(app)
    return next(p for p in group.commands[command].params if flag in p.opts)  # type: ignore[attr-defined]


def test_one_flag_language_across_commands():
    options = _commands()
    loads = ["chat", "generate", "eval", "bench", "info", "quantize", "perplexity"]
    for name in loads:
        assert "-m" in options[name] and "--model" in options[name], name
    for name in ["chat", "generate", "bench"]:
        assert _option(name, "-n").opts[:2] == ["--max-new-tokens", "-n"] or set(_option(name, "-n").opts) >= {
            "--max-new-tokens", "-n"}, name
    for name in ["chat", "generate", "eval", "bench", "quantize", "perplexity"]:
        assert "--threads" in options[name], name
    for name, opts in options.items():
        if "-t" in opts:  # -t is --threads wherever it appears (llama.cpp's meaning), never --temperature or --task
            assert set(_option(name, "-t").opts) == {"--threads", "-t"}, name
    for name in ["chat", "generate", "eval", "perplexity"]:
        assert "--ctx-size" in options[name], name
    assert "--temp" in options["generate"] and "--temp" in options["chat"]


def test_bench_keeps_the_old_new_tokens_name_hidden(capsys, tiny_path):
    help_text = run_cli(capsys, "bench", "--help").out
    assert "--max-new-tokens" in help_text and "--new-tokens" not in help_text.replace("--max-new-tokens", "")
    old = run_cli(capsys, "bench", "-m", str(tiny_path), "--prompt-tokens", "4", "--new-tokens", "3", "--json")
    assert old.code == 0, old.err
    assert json.loads(old.out)["new_tokens"] == 3


def test_threads_flag_sets_the_thread_count(capsys, tiny_path):
    result = run_cli(capsys, "generate", "hi", "-m", str(tiny_path), "-n", "2", "-t", "1")
    assert result.code == 0, result.err
    assert torch.get_num_threads() == 1


def test_no_arguments_prints_the_help_and_exits_zero(capsys):
    result = run_cli(capsys)
    assert result.code == 0
    assert "Usage" in result.out and "generate" in result.out
    assert "error" not in result.err


def test_debug_works_after_the_command(capsys, tmp_path):
    with pytest.raises(Exception, match="no such folder"):
        run_cli(capsys, "info", str(tmp_path / "nowhere"), "--debug")
    plain = run_cli(capsys, "info", str(tmp_path / "nowhere"))
    assert plain.code == 1 and "Traceback" not in plain.err


def test_boolean_flags_show_no_type(capsys):
    for command in ["generate", "chat", "quantize", "bench", "eval", "info"]:
        result = run_cli(capsys, command, "--help")
        assert result.code == 0
        assert "<bool>" not in result.out, command
        assert "--help" in result.out


@pytest.mark.parametrize("command", [
    ["generate", "hi"], ["chat"], ["bench"], ["eval", "--task", "mmlu"], ["info", "--plan"], ["perplexity", "-f", "x"],
])
def test_bad_bits_reads_the_same_everywhere(capsys, tiny_path, command):
    result = run_cli(capsys, *command, "-m", str(tiny_path), "--bits", "3")
    assert result.code == 1 and "Traceback" not in result.err
    assert result.err.strip() == "error: --bits must be 4 or 8 (or 16: no quantization), got 3"


def test_quantize_takes_model_and_says_bits_the_same_way(capsys, tiny_path, tmp_path):
    bad = run_cli(capsys, "quantize", "-m", str(tiny_path), str(tmp_path / "q"), "--bits", "3")
    assert bad.err.strip() == "error: --bits must be 4 or 8, got 3"
    good = run_cli(capsys, "quantize", "-m", str(tiny_path), "-o", str(tmp_path / "q"), "--bits", "8")
    assert good.code == 0, good.err
    assert (tmp_path / "q" / "config.json").is_file()


def test_simulate_takes_policies_as_a_list(capsys, tiny_path, tmp_path):
    trace = tmp_path / "run.jsonl"
    made = run_cli(capsys, "generate", "The software", "-m", str(tiny_path), "-n", "6", "--expert-cache", "2",
                   "--trace", str(trace))
    assert made.code == 0, made.err
    result = run_cli(capsys, "simulate", str(trace), "--slots", "2", "--policy", "lru,lfu")
    assert result.code == 0, result.err
    rows = [line.split()[1] for line in result.out.splitlines() if re.search(r"\b(lru|lfu|belady)\b", line)]
    assert sorted(rows) == ["lfu", "lru"]


def test_tables_are_full_width_when_piped(capsys, tiny_path, tmp_path):
    deep = tmp_path / ("a-long-folder-name-" * 6) / "tiny-deepseek-checkpoint"
    shutil.copytree(tiny_path, deep)
    result = run_cli(capsys, "info", "-m", str(deep))
    assert result.code == 0, result.err
    assert str(deep) in result.out  # the title on one line, not folded at 80 columns
    assert max(len(line) for line in result.out.splitlines()) > 80


def test_sizes_show_a_small_model(capsys, tiny_path):
    result = run_cli(capsys, "info", str(tiny_path))
    weights = next(line for line in result.out.splitlines() if "weights" in line)
    # 378,880 parameters (see test_cli) at 2 bytes: 758 kB, not "0.00 GB"
    assert re.search(r"bf16 7\d\d kB", weights), weights
    assert "0.00 GB" not in result.out


@pytest.mark.parametrize("flags, expected", [
    (["--bits", "4", "--quant-type", "fp4", "--double-quant", "--quantize-lm-head"],
     "quantized: fp4, 4-bit, double quant, lm_head q6"),  # q6: the head beside 4-bit weights
    (["--bits", "4"], "quantized: nf4, 4-bit, lm_head q6"),  # the default layout stores what a run uses
    (["--bits", "4", "--layout", "transformers"], "quantized: nf4, 4-bit, lm_head stored unquantized (q6 when run)"),
    (["--bits", "8", "--layout", "transformers"],
     "quantized: int8 (LLM.int8), 8-bit, lm_head stored unquantized (int8 when run)"),
    (["--bits", "8"], "quantized: int8 (LLM.int8), 8-bit, lm_head int8"),
])
def test_info_names_a_quantized_format(capsys, tiny_path, tmp_path, flags, expected):
    dst = tmp_path / "q"
    assert run_cli(capsys, "quantize", str(tiny_path), str(dst), *flags).code == 0
    result = run_cli(capsys, "info", str(dst))
    assert result.code == 0, result.err
    assert expected in result.out


# --- generate -------------------------------------------------------------------------------------

def _piped(text: str) -> io.TextIOWrapper:
    """Standard input as a pipe gives it: text over a byte buffer (the CLI reads the bytes)."""
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8")


def _greedy(tiny_path: Path, prompt: str, n: int) -> str:
    model, tokenizer = load(tiny_path, dtype=torch.float32)
    ids = tokenizer.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n)[0]
    return tokenizer.decode(out[len(ids):].tolist()).rstrip("\ufffd")


def test_generate_reads_the_prompt_from_stdin_and_from_a_file(capsys, tiny_path, tmp_path, monkeypatch):
    prompt = "Permission is hereby granted"
    expected = _greedy(tiny_path, prompt, 8)
    monkeypatch.setattr(sys, "stdin", _piped(prompt))
    piped = run_cli(capsys, "generate", "-", "-m", str(tiny_path), *FIXTURE_ARGS, "-n", "8")
    assert piped.code == 0, piped.err
    assert piped.out.rstrip("\n") == expected
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    from_file = run_cli(capsys, "generate", "-f", str(tmp_path / "prompt.txt"), "-m", str(tiny_path), *FIXTURE_ARGS,
                        "-n", "8")
    assert from_file.code == 0, from_file.err
    assert from_file.out == piped.out
    neither = run_cli(capsys, "generate", "-m", str(tiny_path))
    assert neither.code == 1 and "give a prompt" in neither.err


def test_generate_reports_tokens_per_second(capsys, tiny_path):
    result = run_cli(capsys, "generate", "hello", "-m", str(tiny_path), "-n", "6")
    assert result.code == 0, result.err
    assert re.search(r"\d+ prompt tokens, 6 new tokens, .* [\d.]+ tokens/s", result.err), result.err


def test_a_prompt_longer_than_the_context_is_an_error(capsys, tiny_path):
    long_prompt = "word " * 600  # the fixture's context is 512 tokens
    result = run_cli(capsys, "generate", long_prompt, "-m", str(tiny_path), "-n", "4")
    assert result.code == 1 and result.out == ""
    assert "context holds 512" in result.err and "Traceback" not in result.err
    short = run_cli(capsys, "generate", "word " * 20, "-m", str(tiny_path), "--ctx-size", "10")
    assert short.code == 1 and "context holds 10" in short.err


def test_generation_stops_at_the_context_with_a_notice(capsys, tiny_path):
    _, tokenizer = load(tiny_path)
    prompt = "The software"
    room = 16 - len(tokenizer.encode(prompt))
    result = run_cli(capsys, "generate", prompt, "-m", str(tiny_path), "-n", "100", "--ctx-size", "16")
    assert result.code == 0, result.err
    assert "stopped at the end of the context (16 tokens)" in result.err
    assert f"{room} new tokens" in result.err


# --- chat -----------------------------------------------------------------------------------------

def _chat(capsys, monkeypatch, tiny_path, text: str, *args: str):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sys, "stdin", _piped(text))
    return run_cli(capsys, "chat", "-m", str(tiny_path), *FIXTURE_ARGS, *args)


def test_piped_chat_runs_slash_commands(capsys, monkeypatch, tiny_path):
    script = "/set temperature 0.5\n/set seed 3\nHello there\n/stats\n/reset\n/stats\n/exit\nNever sent\n"
    result = _chat(capsys, monkeypatch, tiny_path, script, "-n", "4")
    assert result.code == 0, result.err
    assert len(result.out.splitlines()) == 1  # one reply: the commands and the line after /exit got none
    assert "temperature = 0.5" in result.err and "seed = 3" in result.err
    assert "seed 3" in result.err  # in /stats' sampling row
    assert "conversation cleared" in result.err
    assert re.search(r"generated\s+4 tokens in 1 reply\b", result.err), result.err
    assert "/set" not in result.out and "Never" not in result.out


def test_piped_chat_reports_a_failed_command(capsys, monkeypatch, tiny_path):
    result = _chat(capsys, monkeypatch, tiny_path, "/set temperature hot\nHello\n", "-n", "2")
    assert result.code == 1
    assert "temperature must be a number" in result.err
    assert len(result.out.splitlines()) == 1  # the message after the mistake still got its reply


def test_a_reply_cut_by_max_new_tokens_is_marked(capsys, monkeypatch, tiny_path):
    result = _chat(capsys, monkeypatch, tiny_path, "Hello there\n", "-n", "3")
    assert result.code == 0, result.err
    assert "[cut off at max_new_tokens = 3; /set max_new_tokens N for longer replies]" in result.err


def test_save_keeps_the_sampling_settings(capsys, monkeypatch, tiny_path, tmp_path):
    saved = tmp_path / "chat.json"
    first = _chat(capsys, monkeypatch, tiny_path, f"/set temperature 0.7\n/set top_k 5\n/set seed 11\nHi\n/save {saved}\n",
                  "-n", "3")
    assert first.code == 0, first.err
    settings = json.loads(saved.read_text(encoding="utf-8"))["settings"]
    assert settings["temperature"] == 0.7 and settings["top_k"] == 5 and settings["seed"] == 11
    assert settings["max_new_tokens"] == 3
    again = _chat(capsys, monkeypatch, tiny_path, f"/load {saved}\n/stats\n")
    assert again.code == 0, again.err
    assert "temperature 0.7, top_p 1.0, top_k 5" in again.err and "max_new_tokens 3, seed 11" in again.err


def test_stats_counts_read_naturally_and_the_cache_agrees_with_the_context(capsys, monkeypatch, tiny_path):
    result = _chat(capsys, monkeypatch, tiny_path, "/stats\nHello\n/stats\n", "-n", "3")
    assert result.code == 0, result.err
    first, second = result.err.split("turns")[1:3]
    assert re.search(r"generated\s+0 tokens in 0 replies", first)
    assert re.search(r"generated\s+3 tokens in 1 reply\b", second)
    context = int(re.search(r"context\s+(\d+) / 512 tokens", second).group(1))
    cached = int(re.search(r"KV cache\s+(\d+) tokens?", second).group(1))
    # what the cache lacks goes in with the next message, and /stats says so
    assert 0 < cached < context
    assert f"{context - cached} tokens of the conversation go in with the next message" in second


# --- progress -------------------------------------------------------------------------------------

def test_loading_and_quantizing_show_progress_off_a_terminal(capsys, tiny_path, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "QUIET_PROGRESS_S", 0.0)
    result = run_cli(capsys, "generate", "hi", "-m", str(tiny_path), "-n", "2", "--bits", "8")
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if "loading" in line]
    assert lines[-1].startswith(f"loading {tiny_path} and quantizing to 8-bit: 100% (128/128 tensors")
    assert len(lines) == 11  # 0%, 10%, ... 100%
    converted = run_cli(capsys, "quantize", str(tiny_path), str(tmp_path / "q"), "--bits", "4")
    assert converted.code == 0, converted.err
    assert re.search(r"quantizing to nf4: 100% \([\d.]+ kB of [\d.]+ kB", converted.err), converted.err
