"""How far a quantized model's logits are from the unquantized model's.

The statistics follow llama.cpp's KL-divergence report: mean KL(P_ref || P_quant) per token,
its 99th percentile and maximum, how often the top-1 token agrees, and the perplexity ratio on
the reference model's own next tokens; plus the relative L2 error of the raw logits.

    python -m dsmoe.quant.quality CHECKPOINT [--formats nf4,fp4,nf4-dq,fp4-dq,int8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsmoe.quant.spec import QuantSpec

FORMATS = {
    "int8": QuantSpec(bits=8, quant_type="int8"),
    "nf4": QuantSpec(bits=4, quant_type="nf4"),
    "nf4-dq": QuantSpec(bits=4, quant_type="nf4", double_quant=True),
    "fp4": QuantSpec(bits=4, quant_type="fp4"),
    "fp4-dq": QuantSpec(bits=4, quant_type="fp4", double_quant=True),
}


def compare_logits(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """Statistics of ``quantized`` logits [..., vocab] against ``reference`` logits of the same shape."""
    ref = reference.reshape(-1, reference.shape[-1]).double()
    test = quantized.reshape(-1, quantized.shape[-1]).double()
    ref_logp, test_logp = ref.log_softmax(-1), test.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1)
    ref_top = ref.argmax(-1)
    # Perplexity of each model on the reference's greedy tokens: the ratio shows a systematic shift.
    ref_nll = -ref_logp.gather(-1, ref_top[:, None]).mean()
    test_nll = -test_logp.gather(-1, ref_top[:, None]).mean()
    return {
        "rel_logit_error": ((test - ref).norm() / ref.norm()).item(),
        "top1_agreement": (test.argmax(-1) == ref_top).double().mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "kl_max": kl.max().item(),
        "ppl_ratio": torch.exp(test_nll - ref_nll).item(),
        "tokens": float(ref.shape[0]),
    }


def measure(checkpoint: Path, input_ids: torch.Tensor, formats: list[str],
            dtype: torch.dtype = torch.float32) -> dict[str, dict[str, float]]:
    """Each format's statistics against the same checkpoint loaded unquantized, both in ``dtype``."""
    from dsmoe import load

    model, _ = load(checkpoint, dtype=dtype)
    with torch.no_grad():
        reference = model(input_ids)
    del model
    results = {}
    for name in formats:
        spec = FORMATS[name]
        model, _ = load(checkpoint, dtype=dtype, bits=spec.bits, quant_type=spec.quant_type,
                        double_quant=spec.double_quant)
        with torch.no_grad():
            results[name] = compare_logits(reference, model(input_ids))
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Quantized vs unquantized logits of one checkpoint.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--ids", type=Path, help="safetensors file with an int64 'input_ids' [B, T] tensor")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    if args.ids is not None:
        from safetensors.torch import load_file

        input_ids = load_file(str(args.ids))["input_ids"]
    else:
        from dsmoe.model.checkpoint import open_checkpoint

        vocab = open_checkpoint(args.checkpoint).config.vocab_size
        input_ids = torch.randint(3, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    results = measure(args.checkpoint, input_ids, args.formats.split(","), dtype)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
