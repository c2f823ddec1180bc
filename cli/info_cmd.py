"""``dsmoe info``: what a checkpoint is and what it costs, without loading its weights."""

from __future__ import annotations

import typer
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import BitsOption, DtypeOption, console, default_model, guarded
from dsmoe.cli.offload_view import ExpertCacheOption, GpuMemOption, MaxRamOption, plan_table
from dsmoe.model.checkpoint import open_checkpoint
from dsmoe.model.deepseek import parameter_counts, weight_bytes
from dsmoe.offload import plan_for, requested_offload


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@app.command("info")
@guarded
def info(
    model: str = typer.Argument(None, help="Checkpoint folder or Hugging Face repo id (default: the demo model)."),
    plan: bool = typer.Option(False, "--plan", help="Also show where the experts would live under these budgets."),
    expert_cache: int = ExpertCacheOption,
    gpu_mem: float = GpuMemOption,
    max_ram: float = MaxRamOption,
    dtype: str = DtypeOption,
    bits: int = BitsOption,
) -> None:
    """Architecture, experts, parameters (total and per token) and weight bytes at each precision."""
    checkpoint = open_checkpoint(model or default_model())
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
    table.add_row("weights", f"bf16 {_gb(weight_bytes(config, 16))}, 8-bit {_gb(weight_bytes(config, 8))}, "
                  f"4-bit {_gb(weight_bytes(config, 4))}")
    quant = config.quantization_config
    stored = "bf16/fp32 as stored" if quant is None else f"quantized ({quant.get('quant_method', '?')})"
    table.add_row("checkpoint", f"{stored}, {_gb(checkpoint.total_bytes())} on disk")
    table.add_row("tokenizer", "yes" if (checkpoint.path / "tokenizer.json").exists() else "none (token ids only)")
    console.print(table)
    if plan:
        options = requested_offload(expert_cache, gpu_mem, max_ram, always=True)
        console.print(plan_table(plan_for(checkpoint, options, dtype, bits)))
