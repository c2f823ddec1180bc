"""What an expert store costs when every expert has a slot: the same checkpoint resident and with
``--expert-cache`` of all its experts, in one process, alternated.

    python benchmarks/bench_store_overhead.py /work/bench/16b8-q4 --rounds 7

With a slot for every expert the slots are the loaded weights (no copy) and decode runs the native
step through the store, so the two should match (issue 15: within 5%). Prints each side's median
prefill and decode tok/s and the median of the per-round ratios (this machine's memory bandwidth
swings between runs, so only paired ratios are read).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsmoe
from dsmoe.loading import LoadOptions
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.offload import store_of


def timed(model: DeepseekForCausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy run with a KV cache."""
    cache = model.new_cache(1, prompt.shape[1] + new_tokens + 1)
    started = time.perf_counter()
    token = model(prompt, cache=cache, last_only=True)[0, -1].argmax().view(1, 1)
    int(token)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, cache=cache, last_only=True)[0, -1].argmax().view(1, 1)
    int(token)
    done = time.perf_counter()
    return prompt.shape[1] / (prefilled - started), new_tokens / (done - prefilled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a stored (quantized) checkpoint folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resident, _ = dsmoe.load(args.model)
    n_experts = resident.config.n_routed_experts
    slotted, _ = dsmoe.load(args.model, LoadOptions(expert_cache=n_experts))
    assert store_of(resident) is None and store_of(slotted) is not None
    prompt = torch.randint(0, resident.config.vocab_size, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[tuple[float, float]]] = {"resident": [], "slots": []}
    with torch.inference_mode():
        for model in (resident, slotted):
            timed(model, prompt[:, :8], 4)  # warm-up: kernels and plans built once
        for _ in range(args.rounds):
            for name, model in (("resident", resident), ("slots", slotted)):
                rates[name].append(timed(model, prompt, args.new_tokens))
    print(f"{args.model}: {args.rounds} alternated rounds, {args.threads} threads, "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens")
    for i, phase in enumerate(("prefill", "decode")):
        ratios = [s[i] / r[i] for r, s in zip(rates["resident"], rates["slots"])]
        print(f"{phase}: resident {statistics.median(r[i] for r in rates['resident']):.1f} tok/s, "
              f"all experts in slots {statistics.median(s[i] for s in rates['slots']):.1f} tok/s, "
              f"paired ratio {statistics.median(ratios):.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
