"""Quantized logits on the tiny fixture stay within bounds that a broken quantizer exceeds.

Measured (fp32 compute, reference.safetensors' 48 tokens; docs/QUANTIZATION.md): int8 1.6%,
nf4 23%, fp4 30% relative logit error. The fixture's weights are random, so 4-bit errors are
large; the bounds sit above the measurements and far below what a wrong codebook, nibble order
or scale gives (checked here by breaking the nibble order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.quant_helpers import swap_nibbles
from dsmoe.quality.report import compare_logits

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-deepseek"
pytestmark = [pytest.mark.skipif(not FIXTURE.is_dir(), reason="tiny-deepseek fixture not present"),
              pytest.mark.threads(1)]

BOUNDS = {("int8", False): 0.03, ("nf4", False): 0.30}


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, torch.Tensor]:
    from dsmoe import load

    ids = load_file(str(FIXTURE / "reference.safetensors"))["input_ids"]
    model, _ = load(FIXTURE, dtype=torch.float32)
    with torch.no_grad():
        return ids, model(ids)


def _load(quant_type: str, double_quant: bool):  # type: ignore[no-untyped-def]
    from dsmoe import load

    bits = 8 if quant_type == "int8" else 4
    model, _ = load(FIXTURE, dtype=torch.float32, bits=bits, quant_type=quant_type, double_quant=double_quant)
    return model


@pytest.mark.parametrize(("quant_type", "double_quant"), list(BOUNDS))
def test_logit_error_within_bound(reference, quant_type: str, double_quant: bool) -> None:
    ids, ref_logits = reference
    with torch.no_grad():
        stats = compare_logits(ref_logits, _load(quant_type, double_quant)(ids))
    assert stats["rel_logit_error"] < BOUNDS[(quant_type, double_quant)]
    assert stats["kl_mean"] < (1e-3 if quant_type == "int8" else 0.08)


def test_broken_nibble_order_exceeds_the_bound(reference) -> None:
    ids, ref_logits = reference
    model = _load("nf4", False)
    assert swap_nibbles(model) > 0
    with torch.no_grad():
        stats = compare_logits(ref_logits, model(ids))
    assert stats["rel_logit_error"] > BOUNDS[("nf4", False)]


def test_decode_mode_scores_token_by_token_through_the_cache(reference) -> None:
    """``logits_of(decode=True)`` is the cached decode path: in fp32 it gives the forward pass's logits."""
    from dsmoe import load
    from dsmoe.quality.report import logits_of

    ids, want = reference
    model, _ = load(FIXTURE, dtype=torch.float32)
    torch.testing.assert_close(logits_of(model, ids, decode=True), want, rtol=1e-4, atol=1e-4)
    windows = [ids[:1, :10], ids[1:, :7]]
    got = logits_of(model, windows, decode=True)
    torch.testing.assert_close(got, torch.cat([want[0, :10], want[1, :7]]), rtol=1e-4, atol=1e-4)
