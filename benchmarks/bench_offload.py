"""Peak RSS and speed of CPU decoding with routed experts on disk, under a --max-ram budget.

    python benchmarks/bench_offload.py                              # 3.3 GB checkpoint, 1.5 GB budget
    python benchmarks/bench_offload.py --max-ram 1.0 --tokens 32
    python benchmarks/bench_offload.py --dir /tmp/ckpt --layers 12 --experts 64

A synthetic checkpoint in the official layout (random weights, bf16, one shard per layer) is
written once to ``--dir`` (in /tmp by default; never commit it). Each configuration then runs in a
fresh process, so its peak RSS (``ru_maxrss``, which includes touched mmap'd pages) is its own:
the fully resident load first, to show the model does not fit the budget, then the disk tier.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

GB = 1e9


def make_checkpoint(folder: Path, layers: int, experts: int, hidden: int, moe_intermediate: int) -> None:
    from safetensors.torch import save_file

    from dsmoe.checkpoint.config import DeepseekConfig
    from dsmoe.model.deepseek import DeepseekForCausalLM

    raw = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 32000,
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128,
        "max_position_embeddings": 4096, "moe_intermediate_size": moe_intermediate,
        "n_routed_experts": experts, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    with torch.device("meta"):
        model = DeepseekForCausalLM(DeepseekConfig.from_dict(raw))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    weight_map = {}
    for i, (key, names) in enumerate(groups.items(), start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                fan_in = shapes[name][-1]
                tensors[name] = (torch.randn(shapes[name], generator=generator) / fan_in**0.5).to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def run_one(folder: str, max_ram: float | None, tokens: int, prefetch: bool) -> dict[str, object]:
    """One configuration in this (fresh) process; returns what to report."""
    from dsmoe import load
    from dsmoe.offload import Budgets, OffloadOptions, load_offloaded

    torch.set_num_threads(2)
    started = time.perf_counter()
    store = None
    if max_ram is None:
        model, _ = load(folder)
    else:
        model, _, store = load_offloaded(folder, OffloadOptions(Budgets(max_ram=max_ram * GB), prefetch=prefetch))
    loaded = time.perf_counter()
    prompt = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=tokens)
    done = time.perf_counter()
    result: dict[str, object] = {
        "max_ram_gb": max_ram, "prefetch": prefetch, "load_s": round(loaded - started, 1),
        "decode_tok_s": round(tokens / (done - loaded), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
    }
    if store is not None:
        result.update(ram_slots=store.plan.device_slots, hit_rate=round(store.stats.hit_rate(), 3),
                      prefetch_accuracy=round(store.stats.prefetch_accuracy(), 3),
                      disk_mb_per_token=round(store.stats.bytes_per_token("disk->ram") / 1e6, 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/dsmoe-offload-bench", help="Where the synthetic checkpoint lives.")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=704)
    parser.add_argument("--max-ram", type=float, default=1.5, help="GB budget for the disk-tier runs.")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--skip-resident", action="store_true", help="Do not run the fully loaded baseline.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        settings = json.loads(args.child)
        print(json.dumps(run_one(args.dir, settings["max_ram"], args.tokens, settings["prefetch"])))
        return
    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        print(f"writing the synthetic checkpoint to {folder} ...", file=sys.stderr)
        make_checkpoint(folder, args.layers, args.experts, args.hidden, args.moe_intermediate)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(json.dumps({"checkpoint": str(folder), "size_gb": round(size / GB, 3)}))
    runs = [] if args.skip_resident else [{"max_ram": None, "prefetch": False}]
    runs += [{"max_ram": args.max_ram, "prefetch": False}, {"max_ram": args.max_ram, "prefetch": True}]
    for settings in runs:
        child = [sys.executable, __file__, "--dir", args.dir, "--tokens", str(args.tokens), "--child", json.dumps(settings)]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(out.returncode)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
