"""The bundled demo model: it loads offline, has learned its data, and chats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsmoe
from dsmoe.demo import DEMO_MODEL_PATH
from dsmoe.model.generate import SamplingSettings, stream_text

@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model, tokenizer = dsmoe.load(DEMO_MODEL_PATH, dtype=torch.float32)
    assert tokenizer is not None
    return model, tokenizer


def test_demo_files_follow_the_official_layout(tiny_path: Path) -> None:
    names = {p.name for p in DEMO_MODEL_PATH.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md", "heldout.txt"):
        assert name in names
    config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["architectures"] == ["DeepseekForCausalLM"]
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] >= 1
    assert config["n_routed_experts"] > config["num_experts_per_tok"] > 1
    assert set(config) == set(json.loads((tiny_path / "config.json").read_text()))
    total = sum(p.stat().st_size for p in DEMO_MODEL_PATH.iterdir() if p.is_file())
    assert total < 12 * 2**20


def test_heldout_loss_is_the_measured_one(demo) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = demo
    text = (DEMO_MODEL_PATH / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text, add_bos=False))
    assert len(ids) > 500
    window = model.config.max_position_embeddings
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            logits = model(chunk[None, :-1])[0]
            total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    # Measured 2.0502 nats per token (fp32, 1,430 tokens; chance is ln 2048 = 7.62). Without its
    # routed experts the model scores 2.43, so a 0.02 margin (far above fp32 rounding, ~1e-5)
    # catches a broken MoE path that a bound near chance let through.
    assert math.log(model.config.vocab_size) == pytest.approx(7.6246, abs=1e-4)
    assert total / count == pytest.approx(2.0502, abs=0.02)


def test_greedy_chat_answers_with_text(demo) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = demo
    prompt = tokenizer.encode_chat([{"role": "user", "content": 'What does "water" mean?'}])
    settings = SamplingSettings(max_new_tokens=40, stop_ids=model.config.eos_token_ids)
    answer = "".join(stream_text(model, tokenizer, prompt, settings)).strip()
    assert answer and answer.isprintable()
    assert any(ch.isalpha() for ch in answer)
    assert "water" in answer
