"""One LoadOptions: every loading command takes the same flags, lm-eval's model_args name the same
settings, a bad value reads the same wherever it came from, and dsmoe.load picks memory or a store."""

from __future__ import annotations

import pytest
import torch
import typer.main

from cli_runner import run_cli
from dsmoe import LoadOptions, load
from dsmoe.cli.main import app
from dsmoe.errors import EvalError, UsageError
from dsmoe.offload import store_of
from dsmoe.quant import Bf16Linear, Linear6bit, Linear8bit, QuantSpec
from dsmoe.quant.convert import quantize_checkpoint

LOADING_COMMANDS = ("chat", "generate", "serve", "eval", "bench", "info", "perplexity")
# Written out by hand, as the README lists them.
LOADING_FLAGS = {"--dtype", "--bits", "--quant-type", "--double-quant", "--quantize-lm-head", "--expert-cache",
                 "--gpu-mem", "--max-ram", "--policy", "--prefetch"}


def _flags(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {opt for param in click_command.params for opt in param.opts}


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_loading_command_takes_every_loading_flag(command: str) -> None:
    assert LOADING_FLAGS <= _flags(command)
    assert "--model" in _flags(command)


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_a_bad_loading_value_reads_the_same_in_every_command(capsys: pytest.CaptureFixture[str], command: str) -> None:
    args = {"generate": ["x"], "eval": ["--task", "mmlu"], "perplexity": ["-f", "/dev/null"]}.get(command, [])
    bits = run_cli(capsys, command, *args, "--bits", "3")
    assert (bits.code, bits.err.strip()) == (1, "error: --bits must be 4 or 8 (or 16: no quantization), got 3")
    ram = run_cli(capsys, command, *args, "--max-ram", "-2")
    assert (ram.code, ram.err.strip()) == (1, "error: --max-ram must be a positive number of GB, got -2.0")
    fp4 = run_cli(capsys, command, *args, "--quant-type", "fp4")
    assert (fp4.code, fp4.err.strip()) == (1, "error: --quant-type needs --bits 4")


def test_model_args_are_the_same_settings_under_their_own_names() -> None:
    given = {"dtype": "fp32", "bits": "4", "quant_type": "FP4", "max_ram": "1.5", "prefetch": "false", "policy": "LFU"}
    assert LoadOptions.from_model_args(given) == LoadOptions(dtype="fp32", bits=4, quant_type="fp4", max_ram=1.5,
                                                             prefetch=False, policy="lfu")
    with pytest.raises(EvalError, match=r"^bits must be 4 or 8 \(or 16: no quantization\), got 3$"):
        LoadOptions.from_model_args({"bits": "3"})
    with pytest.raises(EvalError, match=r"^max_ram must be a number, got 'lots'$"):
        LoadOptions.from_model_args({"max_ram": "lots"})
    with pytest.raises(EvalError, match=r"^quant_type needs bits 4$"):
        LoadOptions.from_model_args({"quant_type": "nf4"})
    with pytest.raises(EvalError, match="unknown dsmoe model argument.*: bitz"):
        LoadOptions.from_model_args({"bitz": "4"})
    with pytest.raises(UsageError, match="unknown cache policy 'fifo'"):
        LoadOptions(policy="fifo")


def test_load_holds_the_model_in_memory_unless_a_budget_asks_for_a_store(tiny_path) -> None:  # type: ignore[no-untyped-def]
    resident, _ = load(tiny_path, dtype="fp32")
    assert store_of(resident) is None
    offloaded, _ = load(tiny_path, LoadOptions(dtype="fp32", expert_cache=2, prefetch=False))
    store = store_of(offloaded)
    assert store is not None and store.plan.device_slots == 2
    # The store reaches the model through its channel alone: no hook anywhere.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in offloaded.modules())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(offloaded(ids), resident(ids))
    assert store.stats.tokens == ids.shape[1] and store.stats.misses() > 0


def test_lm_head_is_quantized_in_every_quantized_run_unless_told(tiny_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The fast default: a 4- or 8-bit run computes lm_head quantized (q6 beside 4-bit weights,
    int8 beside 8-bit ones), quantized while loading or from a stored checkpoint that kept it in
    floats (as transformers' 4-bit files do)."""
    def head(*args: object, **settings: object) -> torch.nn.Module:
        return load(*args, **settings)[0].lm_head  # type: ignore[arg-type]

    def floats(module: torch.nn.Module) -> bool:
        """An unquantized head: bf16 weights, run by dsmoe's bf16 kernel (Bf16Linear) on the CPU."""
        return type(module) is Bf16Linear and module.weight.dtype == torch.bfloat16

    assert isinstance(head(tiny_path, bits=4), Linear6bit)
    assert isinstance(head(tiny_path, bits=8), Linear8bit)
    assert floats(head(tiny_path, bits=4, quantize_lm_head=False))
    assert floats(head(tiny_path))  # a float run keeps floats
    assert isinstance(head(tiny_path, quantize_lm_head=True), Linear8bit)  # asked for, alone
    stored = tmp_path / "nf4"
    quantize_checkpoint(tiny_path, stored, QuantSpec(bits=4, quant_type="nf4"))  # lm_head stays bf16 in the file
    assert isinstance(head(stored), Linear6bit)
    assert floats(head(stored, quantize_lm_head=False))
    # The int8 head is LLM.int8's rounding of the float one: close logits, not the same ones.
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        floats = load(tiny_path, bits=8, quantize_lm_head=False)[0](ids).float()
        int8 = load(tiny_path, bits=8)[0](ids).float()
    error = ((int8 - floats).norm() / floats.norm()).item()
    assert 0 < error < 0.02, error
    with pytest.raises(UsageError, match="--quantize-lm-head needs --bits 4 or 8"):
        LoadOptions(bits=16, quantize_lm_head=True)
