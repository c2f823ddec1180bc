"""``dsmoe generate``: one prompt in, streamed text out."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    CtxSizeOption, ModelOption, TemperatureOption, ThreadsOption, console, err_console, guarded, max_new_tokens_option,
    read_text_file, stdin_text, use_threads,
)
from dsmoe.cli.loading import load_flags, load_with_progress
from dsmoe.cli.offload_view import plan_table, stats_table
from dsmoe.errors import UsageError
from dsmoe.loading import LoadOptions
from dsmoe.model.generate import SamplingSettings, TextStream, stream_text
from dsmoe.offload import TraceHeader, TraceRecorder, store_of


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt argument, stdin for ``-``, or the text of ``-f FILE``."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("give the prompt as an argument or with -f FILE, not both")
    if prompt_file is not None:
        return read_text_file(prompt_file)
    if prompt == "-":
        return stdin_text()
    if prompt is None:
        raise UsageError("give a prompt: as an argument, '-' to read stdin, or -f FILE")
    return prompt


@app.command("generate")
@guarded
@load_flags
def generate(
    prompt: str = typer.Argument(None, help="The prompt text ('-': read it from stdin)."),
    prompt_file: Path = typer.Option(None, "--file", "-f", help="Read the prompt from this file."),
    model: str = ModelOption,
    max_new_tokens: int = max_new_tokens_option(128),
    temperature: float = TemperatureOption,
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest (0: all)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as one user turn of the chat template."),
    ctx_size: int = CtxSizeOption,
    threads: int = ThreadsOption,
    stats: bool = typer.Option(False, "--stats", help="Show the expert cache's hits, misses and bytes moved."),
    trace: str = typer.Option(None, "--trace", help="Record every MoE layer's routed experts to this file."),
    *,
    load: LoadOptions,
) -> None:
    """Generate a continuation of PROMPT, streaming it as it is decoded."""
    text = read_prompt(prompt, prompt_file)
    use_threads(threads)
    loaded, tokenizer = load_with_progress(model, load.replace(offload=load.offload or stats))
    store = store_of(loaded)
    if store is not None:
        err_console.print(plan_table(store.plan))
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer.json, so it cannot take a text prompt")
    ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
    context = ctx_size or loaded.config.max_position_embeddings
    room = context - len(ids)
    if room < 1:
        raise UsageError(f"the prompt is {len(ids)} tokens and the context holds {context} "
                         f"(--ctx-size; the model was trained on {loaded.config.max_position_embeddings})")
    settings = SamplingSettings(
        max_new_tokens=min(max_new_tokens, room), temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed, stop_ids=loaded.config.eos_token_ids,
    )
    started = time.perf_counter()
    first: float | None = None
    recorder = None
    if trace is not None:
        header = TraceHeader.for_model(loaded, store.plan.expert_bytes if store else None, model or "demo")
        recorder = TraceRecorder(trace, header)
        loaded.set_routing_observer(recorder, recorder.guessed)
    stream = TextStream(tokenizer, stop)
    try:
        for piece in stream_text(loaded, tokenizer, ids, settings, stream=stream):
            first = first or time.perf_counter()
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    except BaseException:
        if recorder is not None:
            recorder.abort()
        raise
    console.print()
    if recorder is not None:
        recorder.close()
    ended = time.perf_counter()
    new_tokens = len(stream.ids)
    if max_new_tokens > room and new_tokens >= settings.max_new_tokens and not stream.stopped:
        err_console.print(f"[yellow]stopped at the end of the context ({context} tokens); "
                          f"--ctx-size sets it[/]", soft_wrap=True)
    ttft = (first - started) if first else ended - started
    rate = (new_tokens - 1) / (ended - first) if first and new_tokens > 1 and ended > first else 0.0
    err_console.print(
        f"[dim]{len(ids)} prompt tokens, {new_tokens} new tokens, time to first text {ttft:.2f} s, "
        f"{rate:.1f} tokens/s, {ended - started:.2f} s total[/]", soft_wrap=True,
    )
    if stats and store is not None:
        err_console.print(stats_table(store.stats))
