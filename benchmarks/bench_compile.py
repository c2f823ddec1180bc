"""Does torch.compile pay on the CPU decode step? Attention three ways, same process.

    python benchmarks/bench_compile.py [--layers 4] [--bits 4] [--tokens 30]

dsmoe's default bf16 decode step (each layer as two native calls, attention included), then the
module path with PyTorch's attention, eager and compiled. Only attention is compiled: the MoE
layer calls C kernels and reads its routing back to Python, which break any graph around it. The
KV cache grows every step, so shapes are dynamic.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsmoe.perf.synthetic import SyntheticCheckpoint
from dsmoe.model import deepseek
from dsmoe.model.deepseek import Attention, DecoderLayer, DeepseekForCausalLM
from dsmoe.model.loader import load_model


def decode_ms(model: DeepseekForCausalLM, tokens: int) -> float:
    """Milliseconds per decode step after a 16-token prompt and 5 warm-up steps."""
    cache = model.new_cache(1, 16 + 5 + tokens)
    token = torch.tensor([[5]])
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 16)), cache=cache)
        for _ in range(5):
            model(token, cache=cache, last_only=True)
        started = time.perf_counter()
        for _ in range(tokens):
            model(token, cache=cache, last_only=True)
    return (time.perf_counter() - started) / tokens * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8, 16])
    parser.add_argument("--tokens", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(SyntheticCheckpoint(f"16b:layers={args.layers}"), bits=None if args.bits == 16 else args.bits,
                       quantize_lm_head=args.bits != 16)
    native = [decode_ms(model, args.tokens) for _ in range(2)]
    # The module path with PyTorch's attention from here on.
    DecoderLayer.decode_plan = lambda self, x: None  # type: ignore[method-assign]
    deepseek.native_attention = lambda x, head_dim: False
    eager = [decode_ms(model, args.tokens) for _ in range(2)]
    started = time.perf_counter()
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = torch.compile(module.forward, dynamic=True)
    decode_ms(model, 3)
    compile_s = time.perf_counter() - started
    compiled = [decode_ms(model, args.tokens) for _ in range(2)]
    print(f"native decode step {min(native):.1f} ms/token; PyTorch attention eager {min(eager):.1f}, compiled "
          f"{min(compiled):.1f} (eager / compiled {min(eager) / min(compiled):.2f}), compile time {compile_s:.0f} s")


if __name__ == "__main__":
    main()
