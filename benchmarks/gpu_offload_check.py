"""The GPU tier on a lent GPU: one synthetic model, fully resident, then its routed experts in a store
under GPU budgets. Run by benchmarks/gpu_check.sh; runs on the CPU too (``--device cpu
--expert-cache ...``, the in-RAM stand-in device), which is how its tests run it.

For each configuration: greedy tokens equal to the resident run's (the store runs the same modules
with the same kernels, so they must be identical; a run whose misses the cost model sends to the
CPU rounds differently and is reported, not required to match), decode tok/s, bytes per decoded
token over the host->GPU link against the plan's even-routing figure, and how many misses ran on
the host. The model is built once (its 16B random weights take minutes to draw) and each store is
handed the same expert modules in turn. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.loader import load_model
from dsmoe.offload import ExpertStore, OffloadOptions, attach
from dsmoe.offload.plan import GB, Budgets, Resources, make_plan
from dsmoe.offload.store import CostModel
from dsmoe.perf.runner import measure_bandwidth, run_benchmark
from dsmoe.perf.synthetic import SyntheticCheckpoint
from dsmoe.quant import Linear6bit, Linear8bit

# Tensors drawn ahead of the loader: each is seeded by its name, so drawing them on worker threads
# gives the same weights, and the serial draw (about 100 M values/s a core) no longer bounds the load.
DRAW_AHEAD = 24


class DrawnAhead(SyntheticCheckpoint):
    """A synthetic checkpoint whose tensors are drawn on a thread pool in the loader's order."""

    def __init__(self, spec: str, seed: int, workers: int) -> None:
        super().__init__(spec, seed)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="draw")
        self._order = self.tensor_names()  # the model's parameter order, which the loader follows
        self._pending: dict[str, Future[torch.Tensor]] = {}
        self._next = 0

    def get(self, name: str) -> torch.Tensor:
        while self._next < len(self._order) and len(self._pending) < DRAW_AHEAD:
            ahead = self._order[self._next]
            self._pending[ahead] = self._pool.submit(super().get, ahead)
            self._next += 1
        future = self._pending.pop(name, None)
        return future.result() if future is not None else super().get(name)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


@torch.inference_mode()
def greedy(model: DeepseekForCausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after ``prompt`` and the logits of the last step (on the CPU, fp32)."""
    cache = model.new_cache(1, prompt.shape[1] + new_tokens)
    logits = model(prompt.to(model.device), cache=cache, last_only=True)
    tokens = []
    for _ in range(new_tokens):
        token = logits[0, -1].argmax()
        tokens.append(int(token))
        logits = model(token.view(1, 1), cache=cache, last_only=True)
    return tokens, logits[0, -1].float().cpu()


def take_back(model: DeepseekForCausalLM, store: ExpertStore) -> None:
    """Detach ``store`` and give the model back its experts (in host memory) for the next store."""
    modules = store.source.modules  # type: ignore[attr-defined]  (a ResidentSource: every expert in RAM)
    n = store.plan.n_experts
    store.detach()
    for moe in model.moe_layers():
        moe.experts = nn.ModuleList(modules[(moe.layer_idx, e)] for e in range(n))


def configurations(args: argparse.Namespace) -> list[tuple[str, Budgets, CostModel | None]]:
    chosen: list[tuple[str, Budgets, CostModel | None]] = []
    for gb in args.gpu_mem:
        chosen.append((f"--gpu-mem {gb:g}", Budgets(gpu_mem=gb * GB), None))
    for slots in args.expert_cache:
        chosen.append((f"--expert-cache {slots}", Budgets(expert_cache=slots), None))
    if args.host_compute_at is not None:
        chosen.append((f"--gpu-mem {args.host_compute_at:g}, cost model may run misses on the CPU",
                       Budgets(gpu_mem=args.host_compute_at * GB), CostModel()))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", default="16b", help="the synthetic spec (default all 28 layers)")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8, 16])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu-mem", type=float, nargs="*", default=[], help="GPU budgets, GB")
    parser.add_argument("--expert-cache", type=int, nargs="*", default=[], help="slot counts per layer")
    parser.add_argument("--host-compute-at", type=float, default=None,
                        help="also a run at this --gpu-mem whose cost model may run misses on the CPU")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--draw-threads", type=int, default=8)
    parser.add_argument("--host-bandwidth", type=float, default=None,
                        help="host memory GB/s for the roofline column (default: measured, a 1 GB buffer)")
    parser.add_argument("--output", type=Path, required=True, help="JSON results file")
    args = parser.parse_args()
    device = torch.device(args.device)
    bits = None if args.bits == 16 else args.bits

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    # Host memory's: the roofline figure is the CPU's, not the GPU's.
    bandwidth = args.host_bandwidth * GB if args.host_bandwidth else measure_bandwidth()
    started = time.perf_counter()
    model = load_model(DrawnAhead(args.synthetic, 0, args.draw_threads), dtype=torch.bfloat16, bits=bits, device=device)
    load_s = time.perf_counter() - started
    say(f"built synthetic {args.synthetic} at {args.bits} bits on {device} in {load_s:.0f} s")
    lm_head_bits = 8 if isinstance(model.lm_head, Linear8bit) else 6 if isinstance(model.lm_head, Linear6bit) else 16
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    reference, reference_logits = greedy(model, prompt, args.new_tokens)
    resident = run_benchmark(model, "resident", args.bits, load_s, args.prompt_tokens, args.new_tokens,
                             bandwidth=bandwidth, lm_head_bits=lm_head_bits)
    rows = [{"configuration": "all resident", "tokens_equal": True, "max_logit_diff": 0.0, **resident.to_dict()}]
    say(f"resident: {resident.decode_tokens_per_s:.2f} tok/s decode")
    for moe in model.moe_layers():  # the store copies experts in from host memory
        moe.experts.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    for name, budgets, cost in configurations(args):
        plan = make_plan(model.config, device, budgets, Resources.measure(device), torch.bfloat16, bits)
        store = attach(model, plan, OffloadOptions(budgets=budgets, host_compute=cost))
        tokens, logits = greedy(model, prompt, args.new_tokens)
        result = run_benchmark(model, name, args.bits, load_s, args.prompt_tokens, args.new_tokens,
                               bandwidth=bandwidth, lm_head_bits=lm_head_bits, store=store)
        rows.append({"configuration": name, "device_slots": plan.device_slots, "tokens_equal": tokens == reference,
                     "max_logit_diff": float((logits - reference_logits).abs().max()), **result.to_dict()})
        say(f"{name}: {plan.device_slots} slots, tokens equal: {tokens == reference}, "
            f"{result.decode_tokens_per_s:.2f} tok/s decode")
        take_back(model, store)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    args.output.write_text(json.dumps({"synthetic": args.synthetic, "bits": args.bits, "device": str(device),
                                       "reference_tokens": reference, "runs": rows}, indent=2))
    print(f"\nsynthetic {args.synthetic}, {args.bits}-bit, on {device}; {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} greedy tokens\n")
    print("| configuration | slots/layer | tokens equal to resident | max logit diff | decode tok/s "
          "| prefill tok/s | hit rate | link bytes per decoded token (plan, even routing) | misses run on host |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        moved, expected = row["decode_link_bytes_per_token"] or {}, row["expected_link_bytes_per_token"] or {}
        links = "; ".join(f"{link} {b / 1e6:.3g} MB ({expected.get(link, 0) / 1e6:.3g} MB)" for link, b in moved.items())
        hit = row["expert_cache_hit_rate"]
        print(f"| {row['configuration']} | {row.get('device_slots', 'all')} | {row['tokens_equal']} "
              f"| {row['max_logit_diff']:.3g} | {row['decode_tokens_per_s']:.2f} | {row['prefill_tokens_per_s']:.1f} "
              f"| {'' if hit is None else f'{hit:.0%}'} | {links} | {row['expert_host_runs'] or ''} |")
    identical = [r["tokens_equal"] for r in rows if "cost model" not in r["configuration"]]
    if not all(identical):
        raise SystemExit("offloaded greedy tokens differ from the resident run's")


if __name__ == "__main__":
    main()
