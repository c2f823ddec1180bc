"""The model's logits-at-positions API: the same numbers as the full run, and only the rows asked for."""

from __future__ import annotations

import pytest
import torch
from head_rows import HeadRows

from dsmoe import load
from dsmoe.model.generate import SamplingSettings, generate_ids


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load(tiny_path, dtype=torch.float32)


def test_positions_give_the_full_runs_rows_and_project_only_them(loaded):
    model, tokenizer = loaded
    rows = [tokenizer.encode("The quick brown fox jumps over the lazy dog")[:10],
            tokenizer.encode("Pack my box with five dozen liquor jugs")[:10]]
    ids = torch.tensor(rows)
    full = model(ids)
    positions = torch.tensor([[0, 5, 9], [3, 3, 1]])
    with HeadRows(model) as head:
        picked = model(ids, positions=positions)
    assert head.calls == [6]
    assert picked.shape == (2, 3, model.config.vocab_size)
    for b in range(2):
        for k in range(3):
            torch.testing.assert_close(picked[b, k], full[b, positions[b, k]], rtol=1e-5, atol=1e-5)


def test_default_generation_projects_one_row_per_step(loaded):
    """Prefill of a 9-token prompt and every decode step: one row through the 102400-wide head each."""
    model, tokenizer = loaded
    prompt = tokenizer.encode("Permission is hereby granted, free of charge")
    assert len(prompt) > 5
    with HeadRows(model) as head:
        tokens = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=6)))
    assert head.calls == [1] * len(tokens)
    # Greedy tokens as the full forward's argmax at the last position, step by step.
    ids = list(prompt)
    for token in tokens:
        assert token == int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
    with HeadRows(model) as head:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=3)
    assert head.calls == [1, 1, 1] and out[0, len(prompt):].tolist() == tokens[:3]
