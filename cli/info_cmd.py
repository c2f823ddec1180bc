"""``dsmoe info``: what a checkpoint is and what it costs, without loading its weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import ModelOption, console, default_model, full_width, guarded, human_bytes
from dsmoe.cli.loading import load_flags
from dsmoe.cli.offload_view import plan_table
from dsmoe.errors import DsmoeError, UsageError
from dsmoe.checkpoint.reader import Checkpoint, open_checkpoint
from dsmoe.model.deepseek import parameter_counts, weight_bytes
from dsmoe.loading import LoadOptions
from dsmoe.offload import Plan, plan_for, read_trace, simulate
from dsmoe.offload.bandwidth import PROBE_BYTES, disk_bandwidth
from dsmoe.offload.plan import Prediction, predict
from dsmoe.perf.runner import measure_bandwidth
from dsmoe.quant import spec_from_config
from dsmoe.quant.spec import lm_head_format


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def stored_format(quant: dict[str, Any] | None) -> str:
    """How the weights are stored: floats, or the bitsandbytes format with its options."""
    if quant is None:
        return "bf16/fp32 as stored"
    try:
        spec = spec_from_config(quant)
    except DsmoeError:
        return f"quantized ({quant.get('quant_method', 'unknown method')})"
    name = "int8 (LLM.int8)" if spec.bits == 8 else spec.quant_type
    extras = [f"{spec.bits}-bit"]
    if spec.double_quant:
        extras.append("double quant")
    run_head = lm_head_format(None, None, spec.bits)  # what a load with no lm_head flag runs it in
    extras.append(f"lm_head {spec.lm_head}" if spec.quantize_lm_head else f"lm_head stored unquantized ({run_head} when run)")
    return f"quantized: {name}, {', '.join(extras)}"


@app.command("info")
@guarded
@load_flags
def info(
    model: str = typer.Argument(None, help="Checkpoint folder or Hugging Face repo id (default: the demo model)."),
    model_flag: str = ModelOption,
    plan: bool = typer.Option(False, "--plan", help="Also show where the experts would live under these budgets "
                              "and the decode tok/s predicted from the measured RAM and disk bandwidth."),
    hit_rate: float = typer.Option(None, "--hit-rate", help="With --plan: the RAM hit rate to predict with "
                                   "(default: what even routing gives)."),
    trace: Path = typer.Option(None, "--trace", help="With --plan: predict with the hit rate `dsmoe simulate` "
                               "finds for its decode steps on this routing trace (from --trace of generate or "
                               "bench), prefetch replayed where the trace recorded its guesses."),
    *,
    load: LoadOptions,
) -> None:
    """Architecture, experts, parameters (total and per token) and weight bytes at each precision."""
    if model is not None and model_flag is not None:
        raise UsageError("give MODEL or --model, not both")
    checkpoint = open_checkpoint(model or model_flag or default_model())
    config = checkpoint.config
    counts = parameter_counts(config)
    table = Table(title=str(checkpoint.path), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("architecture", ", ".join(checkpoint.raw_config.get("architectures", ["DeepseekForCausalLM"])))
    table.add_row("layers", f"{config.num_hidden_layers} ({len(config.moe_layers)} MoE, "
                  f"{config.num_hidden_layers - len(config.moe_layers)} dense)")
    table.add_row("hidden size", str(config.hidden_size))
    table.add_row("attention", f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, "
                  f"head dim {config.head_dim}")
    if config.n_routed_experts:
        table.add_row("experts", f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}) + "
                      f"{config.n_shared_experts or 0} shared, intermediate {config.moe_intermediate_size}")
    table.add_row("context", str(config.max_position_embeddings))
    table.add_row("vocabulary", str(config.vocab_size))
    table.add_row("parameters", f"{_params(counts['total'])} total, {_params(counts['active'])} active per token")
    table.add_row("weights", f"bf16 {human_bytes(weight_bytes(config, 16))}, 8-bit {human_bytes(weight_bytes(config, 8))}, "
                  f"4-bit {human_bytes(weight_bytes(config, 4))}")
    table.add_row("checkpoint", f"{stored_format(config.quantization_config)}, {human_bytes(checkpoint.total_bytes())} on disk")
    table.add_row("tokenizer", "yes" if (checkpoint.path / "tokenizer.json").exists() else "none (token ids only)")
    console.print(full_width(table))
    if plan:
        placement = plan_for(checkpoint, load.store_options(), load.dtype, load.bits,
                             lm_head_int8=load.quantize_lm_head)
        console.print(plan_table(placement, _prediction(checkpoint, placement, load, hit_rate, trace)))
        if placement.fitted is not None:  # what a load with no budget would say, and do
            console.print(placement.fitted, markup=False)
    elif hit_rate is not None or trace is not None:
        raise UsageError("--hit-rate and --trace go with --plan")


def _prediction(checkpoint: Checkpoint, plan: Plan, load: LoadOptions, hit_rate: float | None,
                trace: Path | None) -> Prediction | None:
    """The CPU plan's decode speed from bandwidths measured now (GPU plans: none, nothing measures the GPU)."""
    if plan.compute != "cpu":
        return None
    disk_bytes = None
    if trace is not None:
        if hit_rate is not None:
            raise UsageError("give --hit-rate or --trace, not both")
        routing = read_trace(trace)
        if routing.header.n_experts != plan.n_experts:
            raise UsageError(f"{trace} records {routing.header.n_experts} experts per layer, this model has {plan.n_experts}")
        slots = (plan.tiers[-2] if len(plan.tiers) > 1 else plan.tiers[0]).slots
        if slots >= plan.n_experts:
            hit_rate = 1.0
        else:
            replay = simulate(routing, load.policy, slots, load.prefetch)
            hit_rate = replay.decode_hit_rate if replay.decode_hit_rate is not None else replay.hit_rate
            disk_bytes = replay.decode_bytes_per_token if replay.decode_bytes_per_token is not None else \
                replay.bytes_per_token
    memory = measure_bandwidth(PROBE_BYTES, repeats=3)
    disk = disk_bandwidth(sorted(checkpoint.path.glob("*.safetensors"))) if plan.on_disk else math.inf
    return predict(plan, memory, disk, hit_rate, disk_bytes)
