"""How far a quantized model's logits are from the unquantized model's.

The statistics follow llama.cpp's KL-divergence report: mean KL(P_ref || P_quant) per token,
its 99th percentile and maximum, how often the top-1 token agrees, and the perplexity ratio on
the reference model's own next tokens; plus the relative L2 error of the raw logits. Given a text
(``--text``), also the perplexity of each model on that text's real next tokens and its ratio to
the reference's, the text cut into windows no longer than the model's context.

    python -m dsmoe.quality.report CHECKPOINT [--formats bf16,nf4,fp4,nf4-dq,fp4-dq,int8]
                                             [--text FILE | --ids FILE] [--decode] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.loading import load
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.tokenizer import load_tokenizer
from dsmoe.quant import QuantLinear
from dsmoe.quant.spec import QuantSpec

# None: the checkpoint unquantized in bf16 compute (against an fp32 reference, the cost of bf16 alone).
FORMATS: dict[str, QuantSpec | None] = {
    "bf16": None,
    "int8": QuantSpec(bits=8, quant_type="int8"),
    "nf4": QuantSpec(bits=4, quant_type="nf4"),
    "nf4-dq": QuantSpec(bits=4, quant_type="nf4", double_quant=True),
    "fp4": QuantSpec(bits=4, quant_type="fp4"),
    "fp4-dq": QuantSpec(bits=4, quant_type="fp4", double_quant=True),
}


def compare_logits(reference: torch.Tensor, quantized: torch.Tensor,
                   targets: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of ``quantized`` logits [..., vocab] against ``reference`` logits of the same shape.

    With ``targets`` (the real next tokens, shaped like the logits without the vocab axis), also
    each model's perplexity on them: ``ppl`` (quantized), ``ref_ppl`` and ``ppl_ratio_text``.
    """
    ref = reference.reshape(-1, reference.shape[-1]).double()
    test = quantized.reshape(-1, quantized.shape[-1]).double()
    ref_logp, test_logp = ref.log_softmax(-1), test.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1)
    ref_top = ref.argmax(-1)
    # Perplexity of each model on the reference's greedy tokens: the ratio shows a systematic shift.
    ref_nll = -ref_logp.gather(-1, ref_top[:, None]).mean()
    test_nll = -test_logp.gather(-1, ref_top[:, None]).mean()
    stats = {
        "rel_logit_error": ((test - ref).norm() / ref.norm()).item(),
        "top1_agreement": (test.argmax(-1) == ref_top).double().mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "kl_max": kl.max().item(),
        "ppl_ratio": torch.exp(test_nll - ref_nll).item(),
        "tokens": float(ref.shape[0]),
    }
    if targets is not None:
        next_ids = targets.reshape(-1, 1).to(device=ref.device, dtype=torch.long)
        if next_ids.shape[0] != ref.shape[0]:
            raise ValueError(f"{next_ids.shape[0]} targets for {ref.shape[0]} positions")
        ref_text_nll = -ref_logp.gather(-1, next_ids).mean()
        test_text_nll = -test_logp.gather(-1, next_ids).mean()
        stats["ppl"] = torch.exp(test_text_nll).item()
        stats["ref_ppl"] = torch.exp(ref_text_nll).item()
        stats["ppl_ratio_text"] = torch.exp(test_text_nll - ref_text_nll).item()
    return stats


def text_windows(ids: torch.Tensor | Sequence[int], window: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A token sequence cut into consecutive inputs [1, <= window] and the next tokens they predict.

    Every token but the first is predicted exactly once; each window starts without context (no
    overlap), as in tests/test_demo_model.py, so the scores include each window's cold start.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if window < 1 or ids.numel() < 2:
        raise ValueError(f"need a window >= 1 and at least 2 tokens, got {window} and {ids.numel()}")
    inputs, targets = [], []
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        inputs.append(chunk[None, :-1])
        targets.append(chunk[1:])
    return inputs, torch.cat(targets)


def logits_of(model: DeepseekForCausalLM, input_ids: torch.Tensor | Sequence[torch.Tensor],
              decode: bool = False) -> torch.Tensor:
    """The model's logits on a [B, T] batch, or on each [1, T_i] window concatenated to [sum T_i, vocab].

    With ``decode`` each sequence is fed one token at a time through the KV cache, the path (and,
    in bf16, the kernels) that generation runs; otherwise each goes in as one forward pass.
    """
    windows = list(input_ids) if isinstance(input_ids, torch.Tensor) else input_ids
    with torch.no_grad():
        if not decode:
            if isinstance(input_ids, torch.Tensor):
                return model(input_ids)
            return torch.cat([model(w).flatten(0, -2) for w in windows])
        steps = []
        for window in windows:
            ids = window.reshape(1, -1)
            cache = model.new_cache(1, ids.shape[1])
            steps.append(torch.cat([model(ids[:, t:t + 1], cache=cache)[0] for t in range(ids.shape[1])]))
        return torch.stack(steps) if isinstance(input_ids, torch.Tensor) else torch.cat(steps)


def quantized_params(model: torch.nn.Module) -> int:
    """How many weights the model holds in a quantized format."""
    return sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantLinear))


def measure(checkpoint: Path, input_ids: torch.Tensor | Sequence[torch.Tensor], formats: list[str],
            dtype: torch.dtype = torch.float32,
            targets: torch.Tensor | None = None, decode: bool = False) -> dict[str, dict[str, float]]:
    """Each format's statistics against the same checkpoint loaded unquantized, both in ``dtype``.

    ``input_ids`` is a [B, T] batch or a list of [1, T_i] windows (see ``text_windows``);
    ``targets``, the real next tokens, adds the perplexities on them. Format ``bf16`` is the
    checkpoint unquantized in bf16 compute. ``quantized_params`` counts the weights stored quantized.
    ``decode`` runs the formats as generation does: bf16 compute, one token at a time through the
    KV cache (so with the decode kernels), against the reference's ordinary forward pass.
    """
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown} (choose from {list(FORMATS)})")
    model, _ = load(checkpoint, dtype=dtype)
    reference = logits_of(model, input_ids)
    del model
    results = {}
    for name in formats:
        spec = FORMATS[name]
        compute = torch.bfloat16 if spec is None or decode else dtype
        if spec is None:
            model, _ = load(checkpoint, dtype=compute)
        else:
            model, _ = load(checkpoint, dtype=compute, bits=spec.bits, quant_type=spec.quant_type,
                            double_quant=spec.double_quant)
        results[name] = compare_logits(reference, logits_of(model, input_ids, decode), targets)
        results[name]["quantized_params"] = float(quantized_params(model))
        del model
    return results


def markdown_table(results: dict[str, dict[str, float]], reference: str = "fp32") -> str:
    """The results as the table in docs/QUANTIZATION.md (text perplexity columns when measured)."""
    text = all("ppl" in stats for stats in results.values())
    head = ["format"]
    if text:
        head += ["ppl", f"ppl / {reference}"]
    head += ["top-1 agreement", "KL mean", "KL p99", "KL max", "rel. logit error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if text:
        first = next(iter(results.values()))
        lines.append(f"| {reference} (reference) | {first['ref_ppl']:.3f} | 1 | 100% | 0 | 0 | 0 | 0 |")
    for name, s in results.items():
        row = [name]
        if text:
            row += [f"{s['ppl']:.3f}", f"{s['ppl_ratio_text']:.4f}"]
        row += [f"{100 * s['top1_agreement']:.1f}%", f"{s['kl_mean']:.3g}", f"{s['kl_p99']:.3g}",
                f"{s['kl_max']:.3g}", f"{s['rel_logit_error']:.3g}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Quantized vs unquantized logits of one checkpoint.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--formats", default=",".join(FORMATS))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ids", type=Path, help="safetensors file with an int64 'input_ids' [B, T] tensor")
    source.add_argument("--text", type=Path,
                        help="a UTF-8 text, tokenized with the checkpoint's tokenizer (no bos added) and "
                             "scored on its real next tokens too")
    parser.add_argument("--window", type=int,
                        help="with --text: tokens per window (default: the config's max_position_embeddings)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--decode", action="store_true",
                        help="run the formats as generation does: bf16, one token at a time through the KV cache")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON")
    args = parser.parse_args()
    targets = None
    if args.ids is not None:
        from safetensors.torch import load_file

        input_ids: torch.Tensor | list[torch.Tensor] = load_file(str(args.ids))["input_ids"]
    else:
        checkpoint = open_checkpoint(args.checkpoint)
        config, folder = checkpoint.config, checkpoint.path
        checkpoint.close()
        if args.text is not None:
            tokenizer = load_tokenizer(folder)
            if tokenizer is None:
                parser.error(f"--text needs a tokenizer.json in {args.checkpoint}")
            window = args.window or config.max_position_embeddings
            if window > config.max_position_embeddings:
                parser.error(f"--window {window} exceeds the model's context ({config.max_position_embeddings})")
            ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_bos=False)
            input_ids, targets = text_windows(ids, window)
        else:
            input_ids = torch.randint(3, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    results = measure(args.checkpoint, input_ids, args.formats.split(","), dtype, targets, args.decode)
    if args.markdown:
        print(markdown_table(results, reference=args.dtype))
    else:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
