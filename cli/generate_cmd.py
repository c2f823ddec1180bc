"""``dsmoe generate``: one prompt in, streamed text out."""

from __future__ import annotations

import time

import typer

from dsmoe.cli.app import app
from dsmoe.cli.common import BitsOption, DtypeOption, ModelOption, QuantTypeOption, console, err_console, guarded
from dsmoe.cli.loading import load_with_progress
from dsmoe.cli.offload_view import (
    ExpertCacheOption, GpuMemOption, MaxRamOption, PolicyOption, PrefetchOption, plan_table, stats_table,
)
from dsmoe.errors import UsageError
from dsmoe.model.generate import SamplingSettings, stream_text
from dsmoe.offload import TraceHeader, TraceRecorder, requested_offload, store_of


@app.command("generate")
@guarded
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: str = ModelOption,
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest (0: all)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as one user turn of the chat template."),
    dtype: str = DtypeOption,
    bits: int = BitsOption,
    quant_type: str = QuantTypeOption,
    expert_cache: int = ExpertCacheOption,
    gpu_mem: float = GpuMemOption,
    max_ram: float = MaxRamOption,
    policy: str = PolicyOption,
    prefetch: bool = PrefetchOption,
    stats: bool = typer.Option(False, "--stats", help="Show the expert cache's hits, misses and bytes moved."),
    trace: str = typer.Option(None, "--trace", help="Record every MoE layer's routed experts to this file."),
) -> None:
    """Generate a continuation of PROMPT, streaming it as it is decoded."""
    offload = requested_offload(expert_cache, gpu_mem, max_ram, policy, prefetch, always=stats)
    loaded, tokenizer = load_with_progress(model, dtype, bits, quant_type, offload)
    store = store_of(loaded)
    if store is not None:
        err_console.print(plan_table(store.plan))
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer.json, so it cannot take a text prompt")
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed, stop_ids=loaded.config.eos_token_ids,
    )
    started = time.perf_counter()
    first: float | None = None
    pieces = 0
    recorder = None
    if trace is not None:
        header = TraceHeader.for_model(loaded, store.plan.expert_bytes if store else None, model or "demo")
        recorder = TraceRecorder(trace, header)
        loaded.set_routing_observer(recorder)
    try:
        for piece in stream_text(loaded, tokenizer, ids, settings, stop_strings=stop):
            first = first or time.perf_counter()
            pieces += 1
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    except BaseException:
        if recorder is not None:
            recorder.abort()
        raise
    console.print()
    if recorder is not None:
        recorder.close()
    elapsed = time.perf_counter() - started
    ttft = (first - started) if first else elapsed
    err_console.print(
        f"[dim]{len(ids)} prompt tokens, time to first text {ttft:.2f} s, {elapsed:.2f} s total[/]"
    )
    if stats and store is not None:
        err_console.print(stats_table(store.stats))
