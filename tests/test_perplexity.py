"""``dsmoe perplexity``: perplexity against a direct computation, KL divergence against a saved base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_runner import run_cli
from dsmoe import load
from dsmoe.demo import DEMO_MODEL_PATH

CTX = 64


@pytest.fixture(scope="module", autouse=True)
def _text(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The start of the demo's held-out text: a few chunks of the fixture's tokens, so each run is quick."""
    global TEXT
    TEXT = tmp_path_factory.mktemp("text") / "heldout-start.txt"
    TEXT.write_text((DEMO_MODEL_PATH / "heldout.txt").read_text(encoding="utf-8")[:900], encoding="utf-8")


TEXT = Path()


def _json(capsys, *args: str) -> dict:  # type: ignore[type-arg]
    result = run_cli(capsys, "perplexity", "-f", str(TEXT), "-c", str(CTX), "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.fixture(scope="module")
def fixture_logits(tiny_path: Path):  # type: ignore[no-untyped-def]
    """Per chunk: the fp32 and the int8 model's logits and the chunk's tokens, by plain forward passes."""
    reference, tokenizer = load(tiny_path, dtype=torch.float32)
    quantized, _ = load(tiny_path, dtype=torch.float32, bits=8)
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_bos=False)
    chunks = [torch.tensor([ids[i:i + CTX]]) for i in range(0, len(ids) - CTX + 1, CTX)]
    with torch.no_grad():
        return [(reference(c)[0].float(), quantized(c)[0].float(), c[0]) for c in chunks]


def test_perplexity_equals_a_direct_computation(capsys, tiny_path, fixture_logits):
    # llama-perplexity's scoring: each chunk from an empty context, its second half scored.
    nll = torch.cat([F.cross_entropy(logits[CTX // 2:CTX - 1], ids[CTX // 2 + 1:], reduction="none")
                     for logits, _, ids in fixture_logits]).double()
    expected = math.exp(nll.mean().item())
    expected_err = expected * nll.std().item() / math.sqrt(nll.numel())
    got = _json(capsys, "-m", str(tiny_path), "--dtype", "fp32")
    assert got["chunks"] == len(fixture_logits) and got["tokens"] == nll.numel()
    assert got["ppl"] == pytest.approx(expected, rel=1e-5)
    assert got["ppl_err"] == pytest.approx(expected_err, rel=1e-4)


def test_kld_of_a_model_against_itself_is_zero(capsys, tiny_path, tmp_path):
    base = tmp_path / "base.safetensors"
    saved = _json(capsys, "-m", str(tiny_path), "--dtype", "fp32", "--save-logits", str(base))
    again = _json(capsys, "-m", str(tiny_path), "--dtype", "fp32", "--kld", str(base))
    assert again["ppl"] == saved["ppl"]
    assert again["kld_mean"] == 0 and again["kld_p99"] == 0 and again["kld_max"] == 0
    assert again["same_top"] == 1
    # compact: 32 log-probabilities and ids per scored token, not the whole vocabulary
    assert base.stat().st_size < saved["tokens"] * 32 * 8 + 4096


def test_kld_against_a_quantized_model_matches_the_full_distribution(capsys, tiny_path, tmp_path, fixture_logits):
    rows = slice(CTX // 2, CTX - 1)
    full_kl = torch.cat([F.kl_div(q[rows].log_softmax(-1).double(), r[rows].log_softmax(-1).double(),
                                  log_target=True, reduction="none").sum(-1) for r, q, _ in fixture_logits])
    same_top = torch.cat([(r[rows].argmax(-1) == q[rows].argmax(-1)).double() for r, q, _ in fixture_logits])
    whole = tmp_path / "whole.safetensors"
    _json(capsys, "-m", str(tiny_path), "--dtype", "fp32", "--save-logits", str(whole), "--top-k", "512")
    got = _json(capsys, "-m", str(tiny_path), "--dtype", "fp32", "--bits", "8", "--kld", str(whole))
    assert got["kld_mean"] == pytest.approx(full_kl.mean().item(), rel=1e-3)
    assert got["kld_p99"] == pytest.approx(torch.quantile(full_kl, 0.99).item(), rel=1e-3)
    assert got["same_top"] == pytest.approx(same_top.mean().item(), abs=0.02)  # near-ties may flip
    # with only the top 32 kept and the rest of the vocabulary lumped, a lower bound (the random fixture's
    # flat distributions put most of their mass outside its top 32; a trained model's does not)
    top32 = tmp_path / "top32.safetensors"
    _json(capsys, "-m", str(tiny_path), "--dtype", "fp32", "--save-logits", str(top32))
    lumped = _json(capsys, "-m", str(tiny_path), "--dtype", "fp32", "--bits", "8", "--kld", str(top32))
    assert 0 < lumped["kld_mean"] <= got["kld_mean"] * (1 + 1e-6)


def test_a_base_from_another_text_or_tokenizer_is_refused(capsys, tiny_path, tmp_path):
    base = tmp_path / "base.safetensors"
    _json(capsys, "-m", str(tiny_path), "--save-logits", str(base))
    other = tmp_path / "other.txt"
    other.write_text(TEXT.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    text = run_cli(capsys, "perplexity", "-f", str(other), "-c", str(CTX), "-m", str(tiny_path), "--kld", str(base))
    assert text.code == 1 and "different text" in text.err
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_path, copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["model"]["vocab"] = {k: v for k, v in sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: -kv[1])}
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1), encoding="utf-8")
    tok = run_cli(capsys, "perplexity", "-f", str(TEXT), "-c", str(CTX), "-m", str(copy), "--kld", str(base))
    assert tok.code == 1 and "different tokenizer" in tok.err
    ctx = run_cli(capsys, "perplexity", "-f", str(TEXT), "-c", "32", "-m", str(tiny_path), "--kld", str(base))
    assert ctx.code == 1 and "--ctx-size 64" in ctx.err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    bad = run_cli(capsys, "perplexity", "-f", str(TEXT), "-m", str(tiny_path), "--kld", str(junk))
    assert bad.code == 1 and "Traceback" not in bad.err


def test_plot_of_kld_per_chunk(capsys, tiny_path, tmp_path):
    base = tmp_path / "base.safetensors"
    _json(capsys, "-m", str(tiny_path), "--save-logits", str(base))
    png = tmp_path / "kld.png"
    result = run_cli(capsys, "perplexity", "-f", str(TEXT), "-c", str(CTX), "-m", str(tiny_path), "--bits", "4",
                     "--kld", str(base), "--plot", str(png))
    assert result.code == 0, result.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "KL divergence, mean" in result.out and "same top token" in result.out
    lonely = run_cli(capsys, "perplexity", "-f", str(TEXT), "-m", str(tiny_path), "--plot", str(png))
    assert lonely.code == 1 and "--kld" in lonely.err


def test_too_short_a_text_is_an_error(capsys, tiny_path, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words", encoding="utf-8")
    result = run_cli(capsys, "perplexity", "-f", str(short), "-m", str(tiny_path))
    assert result.code == 1 and "at least one chunk of 512" in result.err
