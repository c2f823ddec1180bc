"""The info and generate commands as a user sees them."""

from __future__ import annotations

import torch

from cli_runner import run_cli
from dsmoe import load
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import DeepseekForCausalLM, parameter_counts


def test_help_lists_the_commands(capsys):
    result = run_cli(capsys, "--help")
    assert result.code == 0
    for command in ("info", "generate"):
        assert command in result.out


def test_info_reports_architecture_and_sizes(capsys, tiny_path):
    result = run_cli(capsys, "info", str(tiny_path))
    assert result.code == 0, result.err
    assert "16 routed (top-4) + 2 shared" in result.out
    assert "3 (2 MoE, 1 dense)" in result.out
    assert "active per token" in result.out and "4-bit" in result.out


def test_parameter_counts_match_the_model(tiny_path):
    config = DeepseekConfig.from_file(tiny_path / "config.json")
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    assert parameter_counts(config)["total"] == sum(p.numel() for p in model.parameters())


def test_sixteen_b_geometry_counts():
    config = DeepseekConfig.from_dict(dict(
        model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    ))
    counts = parameter_counts(config)
    assert 16.3e9 < counts["total"] < 16.5e9  # the report's 16.4B
    assert 2.7e9 < counts["active"] < 2.9e9  # and its 2.8B active


def test_generate_streams_the_greedy_continuation(capsys, tiny_path):
    model, tokenizer = load(tiny_path, dtype=torch.float32)
    prompt = "Permission is hereby granted"
    expected_ids = model.generate(torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=12)[0]
    expected = tokenizer.decode(expected_ids[len(tokenizer.encode(prompt)):].tolist())
    result = run_cli(capsys, "generate", "-m", str(tiny_path), "--dtype", "fp32", "-n", "12", prompt)
    assert result.code == 0, result.err
    assert result.out.rstrip("\n") == expected  # a character the limit cut stays U+FFFD, as the decoder gives it
    assert "prompt tokens" in result.err
