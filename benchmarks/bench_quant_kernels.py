"""Microseconds per quantized matmul on DeepSeekMoE-16B shapes, and quantize_checkpoint's rate.

    python benchmarks/bench_quant_kernels.py                 # kernels at batch 1 and 64
    python benchmarks/bench_quant_kernels.py --batches 1,8,16,32,64 --shapes 2048x2048
    python benchmarks/bench_quant_kernels.py --convert       # also the conversion rate

Every timing is the median of several timed rounds (the machine is shared); ratios are against
bf16 ``F.linear`` measured in the same run. Errors are relative to dequant(W) @ x in fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dsmoe.quant import QuantSpec, quantize_linear
from dsmoe.quant.linear import Linear4bit, Linear8bit

SHAPES = [(1408, 2048), (2048, 1408), (2048, 2048), (10944, 2048)]


def _time_us(fn: Callable[[], torch.Tensor], budget_s: float) -> float:
    """Median over rounds of the mean call time; rounds sized so the whole takes about budget_s."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(budget_s / 5 / once))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps)
    return statistics.median(rounds) * 1e6


def _int_mm_dynamic(module: Linear8bit) -> Callable[[torch.Tensor], torch.Tensor]:
    """Candidate: per-row int8 activations, int8 x int8 -> int32 (LLM.int8 without outliers)."""
    from dsmoe.quant import kernels

    weight_t = module.weight.t()
    return lambda x: kernels.int8_dynamic_mm(x, weight_t, module.scale)


def _bits_per_weight(module: torch.nn.Module) -> float:
    tensors = module.checkpoint_tensors()
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return 8 * stored / (module.in_features * module.out_features)


def bench_kernels(shapes: list[tuple[int, int]], batches: list[int], budget_s: float) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        weight = torch.randn(out_f, in_f) * 0.02
        w_bf16 = weight.to(torch.bfloat16)
        start = time.perf_counter()
        nf4 = quantize_linear(w_bf16, QuantSpec(bits=4, quant_type="nf4"), torch.bfloat16)
        nf4_load_ms = (time.perf_counter() - start) * 1e3
        nf4_std = quantize_linear(w_bf16, QuantSpec(bits=4, quant_type="nf4"), torch.float16)  # standard layout
        int8 = quantize_linear(w_bf16, QuantSpec(bits=8, quant_type="int8"), torch.bfloat16)
        assert isinstance(nf4, Linear4bit) and isinstance(int8, Linear8bit)
        nf4_ref = nf4.dequantized()
        bnb_absmax = nf4._absmax_f32().view(out_f, -1).t().to(torch.bfloat16).contiguous()  # its scale layout
        int8_ref = int8.dequantized()
        int_mm = _int_mm_dynamic(int8)
        from dsmoe.native.library import native_library
        from dsmoe.quant import kernels

        bnb_weight = kernels.pack_4bit(nf4_std.weight, "cpu", out_f, in_f)  # its CPU layout

        candidates: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None, float]] = {
            "bf16 F.linear": (lambda x: F.linear(x, w_bf16), None, 16.0),
        }
        if kernels.cpu_4bit_kernel_available():  # bitsandbytes' kernel is AVX512-BF16 code: SIGILL without it
            candidates["nf4 bnb CPU kernel (repacked)"] = (
                lambda x: kernels.gemv_4bit_cpu(x, bnb_weight, (out_f, in_f), bnb_absmax, nf4.quant_map,
                                                nf4.blocksize, kernels.cpu_4bit_entry("nf4")), nf4_ref,
                _bits_per_weight(nf4))
        candidates |= {
            "nf4 dequantize + bf16 matmul": (
                lambda x: F.linear(x, nf4_std.dequantized(torch.bfloat16)), nf4_ref, _bits_per_weight(nf4)),
            "int8 _weight_int8pack_mm": (
                lambda x: kernels.int8_weight_only_mm(x, int8.weight, int8.scale, int8.unit), int8_ref,
                _bits_per_weight(int8)),
            "int8 dequantize + bf16 matmul": (
                lambda x: F.linear(x, int8.dequantized(torch.bfloat16)), int8_ref, _bits_per_weight(int8)),
            "int8 _int_mm, dynamic int8 activations": (int_mm, int8_ref, _bits_per_weight(int8)),
        }
        if native_library() is not None:
            candidates["int8 native, int8 activations per 64"] = (
                lambda x: kernels.int8_native_mm(x, int8.weight, int8.scale), int8_ref, _bits_per_weight(int8))
        if nf4.native_codebook is not None:
            candidates["nf4 native, int8 activations per 64"] = (
                lambda x: kernels.native_4bit_mm(x, nf4.weight, (out_f, in_f), nf4.runtime_absmax, nf4.native_codebook,
                                                 nf4.blocksize), nf4_ref, _bits_per_weight(nf4))
        for batch in batches:
            x = torch.randn(batch, in_f).to(torch.bfloat16)
            base = _time_us(lambda: F.linear(x, w_bf16), budget_s)
            for name, (fn, ref, bits) in candidates.items():
                us = base if name.startswith("bf16") else _time_us(lambda: fn(x), budget_s)
                err = None
                if ref is not None:
                    exact = x.float() @ ref.t()
                    err = ((fn(x).float() - exact).norm() / exact.norm()).item()
                row = {"shape": f"{out_f}x{in_f}", "batch": batch, "kernel": name, "us": round(us, 1),
                       "vs_bf16": round(base / us, 2), "bits_per_weight": round(bits, 3),
                       "rel_err": None if err is None else float(f"{err:.2e}")}
                if name.startswith("nf4 bnb"):
                    row["repack_ms_at_load"] = round(nf4_load_ms, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_conversion(layers: int, experts: int) -> dict:
    """Convert a generated bf16 checkpoint with 16B-shaped experts (hidden 2048, experts 1408 wide)."""
    from safetensors.torch import save_file

    from dsmoe.quant.convert import quantize_checkpoint

    hidden, inter, moe_inter, vocab = 2048, 10944, 1408, 1024
    config = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_routed_experts": experts, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(config))
        tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden).bfloat16(),
                   "model.norm.weight": torch.ones(hidden).bfloat16(),
                   "lm_head.weight": torch.randn(vocab, hidden).bfloat16()}
        for i in range(layers):
            p = f"model.layers.{i}"
            tensors[f"{p}.input_layernorm.weight"] = torch.ones(hidden).bfloat16()
            tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden).bfloat16()
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"{p}.self_attn.{proj}.weight"] = (torch.randn(hidden, hidden) * 0.02).bfloat16()
            mlps = [(f"{p}.mlp", inter)] if i == 0 else (
                [(f"{p}.mlp.experts.{e}", moe_inter) for e in range(experts)]
                + [(f"{p}.mlp.shared_experts", 2 * moe_inter)])
            if i > 0:
                tensors[f"{p}.mlp.gate.weight"] = (torch.randn(experts, hidden) * 0.02).bfloat16()
            for name, width in mlps:
                tensors[f"{name}.gate_proj.weight"] = (torch.randn(width, hidden) * 0.02).bfloat16()
                tensors[f"{name}.up_proj.weight"] = (torch.randn(width, hidden) * 0.02).bfloat16()
                tensors[f"{name}.down_proj.weight"] = (torch.randn(hidden, width) * 0.02).bfloat16()
        save_file(tensors, str(src / "model.safetensors"))
        del tensors
        results = {}
        for spec in (QuantSpec(bits=4, quant_type="nf4"), QuantSpec(bits=4, quant_type="nf4", double_quant=True),
                     QuantSpec(bits=8, quant_type="int8")):
            report = quantize_checkpoint(src, Path(tmp) / f"dst-{spec.name}", spec, shard_bytes=256 << 20)
            results[spec.name] = {
                "MB_in": round(report.bytes_in / 1e6), "MB_out": round(report.bytes_out / 1e6),
                "seconds": round(report.seconds, 1), "MB_per_s": round(report.bytes_in / 1e6 / report.seconds, 1),
                "peak_rss_MB": round(report.peak_rss_bytes / 1e6),
            }
            print(json.dumps({spec.name: results[spec.name]}), flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--convert", action="store_true", help="also time quantize_checkpoint")
    parser.add_argument("--convert-layers", type=int, default=3)
    parser.add_argument("--convert-experts", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "load_average": os.getloadavg()}))
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    results: dict = {"kernels": bench_kernels(shapes, [int(b) for b in args.batches.split(",")], args.budget)}
    if args.convert:
        results["conversion"] = bench_conversion(args.convert_layers, args.convert_experts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
