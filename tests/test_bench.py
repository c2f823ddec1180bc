"""Synthetic checkpoints and the benchmark runner (correctness only: speed lives in benchmarks/)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_runner import run_cli
from dsmoe import load
from dsmoe.perf.runner import decode_bytes_per_token, run_benchmark
from dsmoe.perf.synthetic import SyntheticCheckpoint, parse_spec, save_checkpoint
from dsmoe.errors import UsageError
from dsmoe.model.deepseek import MoEGate
from dsmoe.model.loader import load_model
from dsmoe.native.library import native_kernels_in_use

SMALL = ("16b:layers=3,vocab_size=300,hidden_size=64,intermediate_size=96,moe_intermediate_size=16,"
         "n_routed_experts=8,num_experts_per_tok=2,num_attention_heads=4,num_key_value_heads=4")


def test_spec_keeps_the_real_geometry():
    raw = parse_spec("16b:layers=8")
    assert raw["num_hidden_layers"] == 8 and raw["n_routed_experts"] == 64 and raw["hidden_size"] == 2048
    with pytest.raises(UsageError, match="bad synthetic option"):
        parse_spec("16b:layers=x")
    with pytest.raises(UsageError, match="unknown synthetic geometry"):
        parse_spec("70b")


def test_saved_checkpoint_holds_the_same_weights_as_the_synthetic_model(tmp_path):
    synthetic = SyntheticCheckpoint(SMALL, seed=3)
    save_checkpoint(synthetic, tmp_path / "ckpt")
    from_disk, tokenizer = load(tmp_path / "ckpt", dtype=torch.float32)
    in_memory = load_model(SyntheticCheckpoint(SMALL, seed=3), dtype=torch.float32)
    for (name, a), (_, b) in zip(from_disk.named_parameters(), in_memory.named_parameters()):
        assert torch.equal(a, b), name
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
    assert not list(tmp_path.glob("*.partial-*"))


def test_interrupted_save_leaves_nothing(tmp_path):
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(SyntheticCheckpoint(SMALL), tmp_path / "ckpt", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_benchmark_reports_consistent_numbers():
    model = load_model(SyntheticCheckpoint(SMALL), dtype=torch.float32)
    result = run_benchmark(model, "small", 16, load_seconds=0.0, prompt_tokens=8, new_tokens=4, bandwidth=1e10)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.bytes_per_token == decode_bytes_per_token(model, 16)
    assert result.roofline_fraction == pytest.approx(result.bytes_per_token * result.decode_tokens_per_s / 1e10)


def test_bytes_per_token_counts_active_experts_only():
    model = load_model(SyntheticCheckpoint(SMALL), dtype=torch.float32)
    h, moe_i = 64, 16
    dense_16 = decode_bytes_per_token(model, 16)
    # Two more active experts per MoE layer would add 2 * 3 * h * moe_i weights in each of 2 layers.
    model.config.num_experts_per_tok = 4
    assert decode_bytes_per_token(model, 16) - dense_16 == 2 * (2 * 3 * h * moe_i) * 2
    assert decode_bytes_per_token(model, 4) < decode_bytes_per_token(model, 8) < decode_bytes_per_token(model, 16)


def test_bench_command_json(capsys):
    result = run_cli(capsys, "bench", "--synthetic", SMALL, "--prompt-tokens", "4", "--new-tokens", "3",
                     "--dtype", "fp32", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["prompt_tokens"] == 4 and data["decode_tokens_per_s"] > 0 and data["bytes_per_token"] > 0
    assert data["expert_cache_hit_rate"] is None  # every expert resident: no cache to hit
    assert data["native_kernels"] == native_kernels_in_use()


def test_bench_with_an_expert_cache_reports_its_hit_rate(capsys, tiny_path):
    result = run_cli(capsys, "bench", "--model", str(tiny_path), "--expert-cache", "1", "--prompt-tokens", "4",
                     "--new-tokens", "6", "--dtype", "fp32", "--json")
    assert result.code == 0, result.err
    rate = json.loads(result.out)["expert_cache_hit_rate"]
    # One slot per layer against top-k routing: most accesses miss, and the rate is a real fraction.
    assert rate is not None and 0.0 <= rate < 0.5
    assert "expert placement" in result.err


def test_bench_rejects_bad_combinations(capsys, tiny_path):
    result = run_cli(capsys, "bench", "--synthetic", SMALL, "--model", str(tiny_path))
    assert result.code != 0 and "not both" in result.err
    result = run_cli(capsys, "bench", "--bits", "3", "--synthetic", SMALL)
    assert result.code != 0 and "--bits" in result.err
    result = run_cli(capsys, "bench", "--synthetic", SMALL, "--max-ram", "1")
    assert result.code != 0 and "--save" in result.err


def _header_tensors(folder) -> dict[str, tuple[str, list[int]]]:
    """Every tensor's dtype and shape, read from the safetensors headers directly (8-byte length, JSON)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name == "reference.safetensors":
            continue
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        tensors.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return tensors


@pytest.mark.parametrize("bits", [16, 4])
def test_bytes_per_token_are_the_checkpoint_tensors_one_token_reads(tiny_path, bits):
    config = json.loads((tiny_path / "config.json").read_text())
    top_k = config["num_experts_per_tok"]
    per_weight = {16: 2.0, 4: 0.5 + 4 / 64}[bits]  # NF4: 4 bits and one fp32 absmax per 64 weights
    expected = 0.0
    for name, (dtype, shape) in _header_tensors(tiny_path).items():
        assert dtype == "BF16", name
        elements = math.prod(shape)
        if name == "model.embed_tokens.weight":
            expected += shape[1] * 2  # the one row a token looks up
        elif ".mlp.experts." in name and int(name.split(".mlp.experts.")[1].split(".")[0]) >= top_k:
            continue  # a token runs top_k of the routed experts (all the same size)
        elif name.endswith("_proj.weight"):
            expected += elements * per_weight  # attention, dense MLP, shared and routed experts
        else:
            expected += elements * 2  # norms, routers and lm_head stay 16-bit
    model, _ = load(tiny_path, dtype=torch.float32)
    assert decode_bytes_per_token(model, bits) == pytest.approx(expected, abs=1)


@pytest.fixture
def scripted_routing(monkeypatch):  # type: ignore[no-untyped-def]
    """Every MoE layer's router alternates between experts {0, 1, 2, 3} and {0, 1, 4, 5}, pass by pass.

    With four slots per layer, each pass after the first finds 0 and 1 resident and 2, 3 (or 4, 5)
    gone: two hits and two misses in every layer, whatever the eviction order. Hit rate 0.5.
    """
    sets = ([0, 1, 2, 3], [0, 1, 4, 5])
    passes: dict[int, int] = {}

    def route(gate, x):  # type: ignore[no-untyped-def]
        n = passes[id(gate)] = passes.get(id(gate), -1) + 1
        ids = torch.tensor([sets[n % 2]] * x.shape[0])
        return ids, torch.full(ids.shape, 0.25)

    monkeypatch.setattr(MoEGate, "forward", route)


def test_bench_hit_rate_of_a_scripted_routing(scripted_routing, tiny_path):
    from dsmoe.loading import LoadOptions
    from dsmoe.offload import load_offloaded

    options = LoadOptions(expert_cache=4, prefetch=False).offload_options()
    assert options is not None
    model, _, store = load_offloaded(tiny_path, options, dtype="fp32")
    assert store.plan.device_slots == 4
    result = run_benchmark(model, "tiny", 16, 0.0, prompt_tokens=5, new_tokens=6, bandwidth=1e10, store=store)
    assert result.expert_cache_hit_rate == 0.5
    moe_layers = len(model.moe_layers())
    # The measured pass only: one prefill and five decode steps, four experts each in every MoE layer.
    assert store.stats.hits() == store.stats.misses() == 6 * 2 * moe_layers


def test_bench_counts_the_bytes_each_decoded_token_moved(scripted_routing, tiny_path):
    """Each decode step misses two experts in each of the fixture's two MoE layers; an fp32 expert is
    3 x 64 x 32 weights x 4 bytes (its config), so 2 x 2 x 24576 bytes per token over the copy-in link.
    The plan's even-routing figure: 2 layers x top-4 x (1 - 4/16 slots) x 24576."""
    from dsmoe.loading import LoadOptions
    from dsmoe.offload import load_offloaded

    options = LoadOptions(expert_cache=4, prefetch=False).offload_options()
    assert options is not None
    model, _, store = load_offloaded(tiny_path, options, dtype="fp32")
    result = run_benchmark(model, "tiny", 16, 0.0, prompt_tokens=5, new_tokens=6, bandwidth=1e10, store=store)
    assert result.decode_link_bytes_per_token == {"ram->cpu": 2 * 2 * 24576}
    assert result.expected_link_bytes_per_token == {"ram->cpu": 2 * 4 * 0.75 * 24576}
    assert result.expert_host_runs == 0
    resident = run_benchmark(load(tiny_path, dtype=torch.float32)[0], "tiny", 16, 0.0, prompt_tokens=5,
                             new_tokens=3, bandwidth=1e10)
    assert resident.decode_link_bytes_per_token is None and resident.expert_host_runs is None


def test_bench_command_reports_the_scripted_hit_rate(scripted_routing, capsys, tiny_path):
    result = run_cli(capsys, "bench", "--model", str(tiny_path), "--expert-cache", "4", "--no-prefetch",
                     "--prompt-tokens", "4", "--new-tokens", "6", "--dtype", "fp32", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["expert_cache_hit_rate"] == 0.5


def test_bench_counts_the_lm_head_as_it_was_loaded(capsys, tiny_path):
    """An int8 lm_head (the default with --bits) reads one byte a weight per token, a kept bf16 one two:
    the runs differ by exactly vocab x hidden bytes (2048 x 192 on the fixture, from its config)."""
    config = json.loads((tiny_path / "config.json").read_text())
    per_token = {}
    for head in ("--quantize-lm-head", "--no-quantize-lm-head"):
        result = run_cli(capsys, "bench", "--model", str(tiny_path), "--bits", "8", head, "--prompt-tokens", "4",
                         "--new-tokens", "3", "--json")
        assert result.code == 0, result.err
        per_token[head] = json.loads(result.out)["bytes_per_token"]
    difference = per_token["--no-quantize-lm-head"] - per_token["--quantize-lm-head"]
    assert difference == config["vocab_size"] * config["hidden_size"]


FIXTURE_SIZED = ("16b:layers=3,vocab_size=512,hidden_size=64,intermediate_size=192,moe_intermediate_size=32,"
                 "n_routed_experts=32,num_experts_per_tok=4,num_attention_heads=4,num_key_value_heads=4")


def _top_quarter_share(spec: str) -> list[float]:
    """Per MoE layer, the share of all top-k choices that went to its most chosen quarter of experts,
    counted over a forward pass of 1024 random tokens (32 experts, top-4: near the real 64 and top-6)."""
    model = load_model(SyntheticCheckpoint(spec), dtype=torch.float32)
    counts: list[torch.Tensor] = []

    def count(gate: MoEGate, inputs: object, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        counts.append(torch.bincount(output[0].reshape(-1), minlength=gate.weight.shape[0]))

    for moe in model.moe_layers():
        moe.gate.register_forward_hook(count)
    tokens = torch.randint(0, 512, (4, 256), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(tokens)
    quarter = model.config.n_routed_experts // 4
    return [float(c.sort(descending=True).values[:quarter].sum() / c.sum()) for c in counts]


def test_skewed_synthetic_router_concentrates_the_routing():
    even, skewed = _top_quarter_share(FIXTURE_SIZED), _top_quarter_share(FIXTURE_SIZED + ",skew=1")
    assert len(even) == len(skewed) == 2  # two MoE layers (the first layer is dense)
    # Even routing: a quarter, plus what sampling noise and a random model's own leaning add (0.32-0.37 seen).
    assert all(0.25 <= share < 0.4 for share in even), even
    assert all(share > 0.6 for share in skewed), skewed  # 0.65 seen


def test_skew_is_recorded_and_checked():
    assert parse_spec("16b:layers=2,skew=1.5")["dsmoe_synthetic_skew"] == 1.5
    assert "dsmoe_synthetic_skew" not in parse_spec("16b:layers=2,skew=0")
    for bad in ("skew=-1", "skew=x", "skew=inf", "skew=nan"):
        with pytest.raises(UsageError, match="bad synthetic option"):
            parse_spec(f"16b:{bad}")
    # Only the gates change: the other weights are those of the unskewed checkpoint.
    plain, skewed = SyntheticCheckpoint(FIXTURE_SIZED), SyntheticCheckpoint(FIXTURE_SIZED + ",skew=1")
    for name in plain.tensor_names():
        assert torch.equal(plain.get(name), skewed.get(name)) != name.endswith("mlp.gate.weight"), name
