"""``dsmoe simulate``: replay a routing trace under each cache policy and size."""

from __future__ import annotations

import typer
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import console, full_width, guarded
from dsmoe.cli.offload_view import PrefetchOption, mb
from dsmoe.errors import UsageError
from dsmoe.offload import read_trace, sweep


def _sizes(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--slots takes comma-separated integers, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--slots needs sizes of at least 1, got {value!r}")
    return sizes


@app.command("simulate")
@guarded
def simulate(
    trace: str = typer.Argument(..., help="A routing trace recorded with 'dsmoe generate --trace FILE' or 'dsmoe bench --trace FILE'."),
    policy: list[str] = typer.Option([], "--policy", help="Policies to replay, comma-separated or repeated (default: all)."),
    slots: str = typer.Option(None, "--slots", help="Comma-separated slots per layer (default: 1, 2, 4, ... and top-k)."),
    prefetch: bool = PrefetchOption,
) -> None:
    """Replay TRACE under each policy and cache size: hit rate and bytes moved per token, as a run
    with the same --expert-cache and --prefetch counts them."""
    recorded = read_trace(trace)
    policies = [part.strip().lower() for value in policy for part in value.split(",") if part.strip()]
    results = sweep(recorded, policies or None, _sizes(slots), prefetch)
    head = recorded.header
    if not prefetch:
        replayed = "no prefetch"
    elif recorded.has_guesses:
        replayed = "prefetch replayed from the trace's guesses"
    else:
        replayed = "no prefetch guesses in the trace (a run without an expert store): read-ahead only"
    table = Table(title=f"{trace}: {recorded.tokens} tokens, {len(head.moe_layers)} MoE layers x "
                  f"{head.n_experts} experts (top-{head.top_k}), {mb(head.expert_bytes)} each; {replayed}",
                  title_justify="left")
    for column in ("policy", "slots/layer", "hit rate", "misses/token", "prefetched/token", "moved/token"):
        table.add_column(column, justify="right")
    for r in results:
        per_token = r.misses / r.tokens if r.tokens else 0.0
        guessed = r.prefetched / r.tokens if r.tokens else 0.0
        table.add_row(r.policy, str(r.slots), f"{r.hit_rate:.1%}", f"{per_token:.2f}", f"{guessed:.2f}",
                      mb(r.bytes_per_token))
    console.print(full_width(table))
