"""What several commands show or take about the expert store: its flags, plan and stats tables."""

from __future__ import annotations

import typer
from rich.table import Table

from dsmoe.cli.common import full_width, human_bytes
from dsmoe.offload import Plan, StoreStats
from dsmoe.offload.plan import Prediction

ExpertCacheOption = typer.Option(None, "--expert-cache", help="Expert slots per MoE layer on the compute device.")
GpuMemOption = typer.Option(None, "--gpu-mem", help="GB of GPU memory for the model; experts that do not fit stay in RAM.")
MaxRamOption = typer.Option(None, "--max-ram", help="GB of RAM the process may use; below the model's size experts stay on disk.")
PolicyOption = typer.Option("lru", "--policy", help="Expert cache eviction: lru or lfu.")
PrefetchOption = typer.Option(True, "--prefetch/--no-prefetch", help="Guess the next layer's experts and load them early.")


def mb(n: float) -> str:
    return human_bytes(n)


def plan_table(plan: Plan, prediction: Prediction | None = None) -> Table:
    """What lives where, the bytes per token expected over each link, and the decode speed predicted."""
    table = Table(title=f"expert placement (compute on {plan.compute})", title_justify="left")
    for column in ("tier", "holds", "size", "budget"):
        table.add_column(column)
    n, layers = plan.n_experts, len(plan.moe_layers)
    for tier in plan.tiers:
        experts = "all routed experts" if tier.slots >= n else f"{tier.slots} of {n} experts per layer"
        holds = f"{experts} + everything else" if tier.holds_rest else experts
        budget = human_bytes(tier.budget) if tier.budget is not None else ""
        table.add_row(tier.name, holds, human_bytes(plan.tier_bytes(tier)), budget)
    parts = [f"{layers} MoE layers x {n} experts of {mb(plan.expert_bytes)}, top-{plan.top_k}"]
    parts += [f"{link}: ~{mb(b)}/token (even routing)" for link, b in plan.expected_link_bytes().items()]
    parts += plan.notes
    if prediction is not None:
        parts.append(prediction_line(prediction))
    table.caption = "; ".join(parts)
    table.caption_justify = "left"
    return full_width(table)


def prediction_line(prediction: Prediction) -> str:
    """The predicted decode speed with the sum behind it."""
    reads = f"{mb(prediction.memory_bytes)}/token from RAM at {prediction.memory_bandwidth / 1e9:.1f} GB/s"
    if prediction.disk_bytes:
        reads += (f" + {mb(prediction.disk_bytes)}/token from disk at {prediction.disk_bandwidth / 1e9:.2f} GB/s "
                  f"(RAM hit rate {prediction.hit_rate:.0%})")
    return f"predicted decode: {prediction.tokens_per_second:.1f} tok/s ({reads})"


def stats_table(stats: StoreStats) -> Table:
    """Per-layer hits, misses and prefetch accuracy, and bytes moved per token."""
    table = Table(title=f"expert cache over {stats.tokens} tokens", title_justify="left")
    for column in ("layer", "hits", "misses", "hit rate", "predicted", "prefetch acc.", "prefetched", "run on host"):
        table.add_column(column, justify="right")
    for idx, s in sorted(stats.layers.items()):
        table.add_row(str(idx), str(s.hits), str(s.misses), f"{stats.hit_rate(idx):.1%}", str(s.predicted),
                      f"{stats.prefetch_accuracy(idx):.1%}" if s.predicted else "", str(s.prefetched), str(s.host_runs))
    table.add_row("all", str(stats.hits()), str(stats.misses()), f"{stats.hit_rate():.1%}", "",
                  f"{stats.prefetch_accuracy():.1%}", "", "", style="bold")
    moved = [f"{link}: {mb(stats.bytes_per_token(link))}/token" for link in sorted(stats.link_bytes)]
    table.caption = "bytes moved: " + ("; ".join(moved) if moved else "none")
    table.caption_justify = "left"
    return full_width(table)
