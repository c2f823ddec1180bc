"""The expert store: cache decisions by hand, bit-identical outputs under any budget, plans, traces."""

from __future__ import annotations

import json
import pytest
import torch

from dsmoe import load
from dsmoe.errors import UsageError
from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.offload import (
    Budgets,
    CostModel,
    ExpertStore,
    LayerCache,
    OffloadOptions,
    Resources,
    TraceError,
    TraceHeader,
    TraceRecorder,
    load_offloaded,
    make_plan,
    read_trace,
    simulate,
)
from dsmoe.offload.disk import DiskExperts
from dsmoe.offload.plan import WORKSPACE, expert_sizes, resident_bytes
from dsmoe.offload.store import HostCopy, ResidentSource
from dsmoe.offload.trace import Routing, Trace

# Plenty of RAM and an empty process, so a --max-ram budget alone decides the plan.
ROOMY = Resources(gpu_free=None, ram_available=10**12, process_rss=0)


def run_sequence(cache: LayerCache, experts: list[int]) -> tuple[int, int, list[list[int]]]:
    hits, evictions = 0, []
    for expert in experts:
        hit, evicted = cache.access(expert)
        hits += hit
        evictions.append(evicted)
    return hits, len(experts) - hits, evictions


def test_lru_counts_match_hand_computation():
    # 2 slots: 0 miss, 1 miss, 0 hit, 2 miss (evicts 1, least recent), 1 miss (evicts 0), 0 miss (evicts 2).
    cache = LayerCache(2, "lru")
    hits, misses, evictions = run_sequence(cache, [0, 1, 0, 2, 1, 0])
    assert (hits, misses) == (1, 5)
    assert evictions == [[], [], [], [1], [0], [2]]
    assert cache.resident == {0, 1}


def test_lfu_counts_match_hand_computation():
    # 2 slots: 0 miss, 1 miss, 0 hit (0 used twice), 2 miss (evicts 1: used once), 1 miss (evicts 2: once,
    # against 0's twice), 0 hit.
    cache = LayerCache(2, "lfu")
    hits, misses, evictions = run_sequence(cache, [0, 1, 0, 2, 1, 0])
    assert (hits, misses) == (2, 4)
    assert evictions == [[], [], [], [1], [2], []]


def test_lfu_keeps_heat_across_evictions_and_breaks_ties_by_recency():
    cache = LayerCache(2, "lfu")
    # 3 is used three times; the single-use experts that follow evict each other, never 3.
    hits, misses, evictions = run_sequence(cache, [3, 3, 3, 4, 5, 6, 3])
    assert evictions == [[], [], [], [], [4], [5], []]
    assert (hits, misses) == (3, 4)


def test_announced_experts_are_not_evicted_before_use():
    cache = LayerCache(2, "lru")
    run_sequence(cache, [5, 2])  # 5 is the least recent
    cache.begin({1, 5})
    assert cache.access(1) == (False, [2])  # plain LRU would evict 5, which is needed next
    assert cache.access(5) == (True, [])


def test_prefetch_never_evicts_an_announced_expert():
    cache = LayerCache(1, "lru")
    cache.access(7)
    cache.begin({7})
    assert cache.prefetch(3) is None
    assert cache.resident == {7}


def test_simulate_on_a_scripted_trace():
    header = TraceHeader(moe_layers=[1], n_experts=8, top_k=2, expert_bytes=100)
    # One token per pass; pass by pass the experts used are {0,1}, {0,2}, {1,2}, {0,1}.
    trace = Trace(header, [Routing(1, [[0, 1]]), Routing(1, [[0, 2]]), Routing(1, [[1, 2]]), Routing(1, [[0, 1]])])
    lru = simulate(trace, "lru", 2)
    # [0,1] -> miss miss; [0,2] -> 0 hit, 2 miss (1 was not announced: evicted); [1,2] -> 1 miss (evicts 0),
    # 2 hit; [0,1] -> 0 miss (evicts 2), 1 hit.
    assert (lru.hits, lru.misses) == (3, 5)
    assert lru.bytes_per_token == 5 * 100 / 4
    lfu = simulate(trace, "lfu", 2)
    # Same until [0,1] at the end: 0 (used twice) misses and evicts 2 (used twice, less recent than 1).
    assert (lfu.hits, lfu.misses) == (3, 5)
    assert simulate(trace, "lru", 3).misses == 3


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tiny_path, prompt):
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load(tiny_path, dtype=dtype)
        with torch.inference_mode():
            results[dtype] = (model(prompt), model.generate(prompt, max_new_tokens=8))
    return results


def disk_budget(tiny_path, dtype: torch.dtype, slots: int) -> float:
    """A --max-ram that leaves exactly ``slots`` experts per layer in RAM (the rest stays on disk)."""
    config = open_checkpoint(tiny_path).config
    expert, _ = expert_sizes(config, dtype, None)
    rest = resident_bytes(config, dtype, None, None, embedding_in_file=True)
    return rest + 2 * expert + WORKSPACE + slots * expert * len(config.moe_layers) + 1


CASES = [
    ("cpu-slots-1-lru", Budgets(expert_cache=1), "lru", False),
    ("cpu-slots-3-lfu-prefetch", Budgets(expert_cache=3), "lfu", True),
    ("disk-1-lru", 1, "lru", False),
    ("disk-2-lfu-prefetch", 2, "lfu", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_any_budget_gives_identical_outputs(tiny_path, prompt, reference, case, dtype):
    _, budgets, policy, prefetch = case
    if isinstance(budgets, int):
        budgets = Budgets(max_ram=disk_budget(tiny_path, dtype, budgets))
    model, _, store = load_offloaded(tiny_path, OffloadOptions(budgets, policy, prefetch), dtype=dtype, resources=ROOMY)
    want_logits, want_ids = reference[dtype]
    with torch.inference_mode():
        assert torch.equal(model(prompt), want_logits)
        assert torch.equal(model.generate(prompt, max_new_tokens=8), want_ids)
    assert store.stats.misses() > 0
    assert all(len(store.resident(layer)) <= store.plan.device_slots for layer in store.plan.moe_layers)
    if isinstance(case[1], int):
        assert store.plan.on_disk and set(store.stats.link_bytes) == {"disk->ram"}
        assert all(not moe.experts for moe in model.moe_layers())  # nothing but the store holds them
    store.detach()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("where", ["cpu-slots", "disk"])
def test_store_counts_equal_the_simulation_of_its_trace(tiny_path, tmp_path, prompt, policy, where):
    slots = 2
    budgets = Budgets(expert_cache=slots) if where == "cpu-slots" else Budgets(max_ram=disk_budget(tiny_path, torch.float32, slots))
    model, _, store = load_offloaded(tiny_path, OffloadOptions(budgets, policy, prefetch=False),
                                     dtype=torch.float32, resources=ROOMY)
    path = tmp_path / "routing.jsonl"
    with TraceRecorder(path, TraceHeader.for_model(model, store.plan.expert_bytes)) as recorder:
        model.set_routing_observer(recorder)
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=10)
    trace = read_trace(path)
    assert not trace.has_guesses
    simulated = simulate(trace, policy, slots, prefetch=False)
    assert (simulated.hits, simulated.misses) == (store.stats.hits(), store.stats.misses())
    assert trace.tokens == store.stats.tokens == prompt.shape[1] + 9
    # Each miss moves one expert: copied at the compute dtype, or read from disk as stored (bf16).
    moved = sum(store.stats.link_bytes.values())
    assert moved == store.stats.misses() * store.source.nbytes(1, 0)
    assert store.source.nbytes(1, 0) == (store.plan.expert_bytes if where == "cpu-slots" else store.plan.expert_bytes // 2)
    store.detach()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_the_simulation_replays_the_prefetch_a_trace_recorded(tiny_path, tmp_path, prompt, policy, slots):
    """A disk-tier run with prefetch on (guesses of the next layer, reads ahead within the prompt):
    its trace carries the guesses, and replaying it counts the run's hits, misses, guesses and reads."""
    budgets = Budgets(max_ram=disk_budget(tiny_path, torch.float32, slots))
    model, _, store = load_offloaded(tiny_path, OffloadOptions(budgets, policy, prefetch=True),
                                     dtype=torch.float32, resources=ROOMY)
    path = tmp_path / "routing.jsonl"
    with TraceRecorder(path, TraceHeader.for_model(model, store.source.nbytes(1, 0))) as recorder:
        model.set_routing_observer(recorder, recorder.guessed)
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=10)
    trace = read_trace(path)
    moes = store.plan.moe_layers
    # Every pass of every MoE layer after the first was guessed, and only those.
    assert all((event.guess is not None) == (event.layer != moes[0]) for event in trace.events)
    assert all(len(event.guess) == len(event.ids) for event in trace.events if event.guess is not None)
    stats = store.stats
    prefetched = sum(layer.prefetched for layer in stats.layers.values())
    assert prefetched > 0
    simulated = simulate(trace, policy, slots)
    assert (simulated.hits, simulated.misses, simulated.prefetched) == (stats.hits(), stats.misses(), prefetched)
    assert simulated.bytes_moved == stats.link_bytes["disk->ram"]
    # The guesses matter: replaying without them counts fewer hits than the run had.
    assert simulate(trace, policy, slots, prefetch=False).hits < stats.hits()
    store.detach()


def test_a_trace_without_guesses_replays_the_read_ahead_only(tmp_path):
    """A version-1 trace (no guesses) still reads; a prompt pass bigger than the slots is read ahead
    of use, each of its experts counted once as a miss, as the store counts them."""
    path = tmp_path / "v1.jsonl"
    head = {"format": "dsmoe-routing-trace", "version": 1, "moe_layers": [1, 2], "n_experts": 8, "top_k": 2,
            "expert_bytes": 10}
    lines = [head, {"layer": 1, "ids": [[0, 1], [2, 3], [4, 5]]}, {"layer": 2, "ids": [[0, 1], [2, 3], [4, 5]]},
             {"layer": 1, "ids": [[4, 5]]}, {"layer": 2, "ids": [[0, 1]]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    trace = read_trace(path)
    assert not trace.has_guesses and trace.tokens == 4
    # 4 slots: the prompt's 6 experts miss in each layer; then 4 and 5 are the most recent in both
    # layers, so layer 1's [4, 5] hits and layer 2's [0, 1] misses twice.
    result = simulate(trace, "lru", 4)
    assert (result.hits, result.misses, result.prefetched) == (2, 14, 0)
    assert result.bytes_moved == 14 * 10
    assert result.decode_hit_rate == 0.5  # the decode step alone: 2 hits, 2 misses
    assert (result.decode_tokens, result.decode_bytes_per_token) == (1, 20.0)  # its 2 misses' reads


def test_a_decode_step_reads_its_wrong_guesses_too(tmp_path):
    """What a decode step reads from disk is its misses plus its prefetches, right or wrong: the
    figure a speed prediction needs (the misses alone undercount it)."""
    path = tmp_path / "v2.jsonl"
    head = {"format": "dsmoe-routing-trace", "version": 2, "moe_layers": [1, 2], "n_experts": 8, "top_k": 2,
            "expert_bytes": 10}
    lines = [head, {"layer": 1, "ids": [[0, 1], [2, 3], [4, 5]]}, {"layer": 2, "ids": [[0, 1], [2, 3], [4, 5]]},
             {"layer": 1, "ids": [[4, 5]]}, {"layer": 2, "ids": [[0, 1]], "guess": [[6, 7]]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # 4 slots, LRU: after the prompt layer 2 holds 2, 3, 4, 5; the guess reads 6 and 7 in place of
    # 2 and 3, both wrong; then 0 and 1 miss. The decode step read 4 experts: 40 bytes.
    result = simulate(read_trace(path), "lru", 4)
    assert (result.prefetched, result.decode_hits, result.decode_misses) == (2, 2, 2)
    assert (result.decode_tokens, result.decode_bytes_per_token) == (1, 40.0)
    assert result.bytes_moved == (12 + 4) * 10


@pytest.fixture
def fake_device_store(tiny_path):
    """A store whose 'device' is a copy within RAM, built by hand so its parts can be swapped."""
    def build(slots: int, cost: CostModel | None = None) -> tuple[object, ExpertStore]:
        model, _ = load(tiny_path, dtype=torch.float32)
        config = model.config
        plan = make_plan(config, torch.device("cpu"), Budgets(expert_cache=slots), ROOMY, torch.float32)
        modules = {}
        for moe in model.moe_layers():
            modules.update({(moe.layer_idx, e): m for e, m in enumerate(moe.experts)})
            moe.experts = torch.nn.ModuleList()
        store = ExpertStore(model, plan, ResidentSource(modules), HostCopy(), "lru", prefetch=False, cost=cost)
        return model, store

    return build


def test_prefetch_counts_predictions_and_copies(fake_device_store):
    _, store = fake_device_store(4)
    store.prefetch(2, torch.tensor([[1, 3], [3, 9]]))
    assert store.resident(2) == [1, 3, 9]
    assert store.stats.layer(2).prefetched == 3
    assert store.stats.link_bytes == {"ram->cpu": 3 * store.plan.expert_bytes}
    store.routed(2, torch.zeros(1, store.model.config.hidden_size), torch.tensor([[1, 5]]))
    layer = store.stats.layer(2)
    assert (layer.predicted, layer.predicted_used) == (3, 1)
    assert store.stats.prefetch_accuracy() == pytest.approx(1 / 3)


def test_prefetch_takes_the_most_named_experts_up_to_the_slots(fake_device_store):
    _, store = fake_device_store(2)
    store.prefetch(1, torch.tensor([[0, 6], [6, 7], [7, 6]]))
    assert store.resident(1) == [6, 7]


def test_cheap_misses_run_where_the_expert_lives(fake_device_store, prompt, reference):
    always_host = CostModel(link_bytes_per_s=1.0)
    model, store = fake_device_store(2, always_host)
    with torch.inference_mode():
        assert torch.equal(model(prompt), reference[torch.float32][0])
    assert sum(s.host_runs for s in store.stats.layers.values()) == store.stats.misses() > 0
    assert store.stats.hits() == 0 and store.stats.link_bytes == {}
    assert all(store.resident(layer) == [] for layer in store.plan.moe_layers)


def test_cost_model_prefers_the_cpu_for_few_tokens_and_the_copy_for_many():
    cost = CostModel(link_bytes_per_s=20e9, host_bytes_per_s=30e9, host_flops=1e12)
    expert_params = 3 * 2048 * 1408
    assert cost.run_on_host(1, 2 * expert_params, expert_params)
    assert not cost.run_on_host(512, 2 * expert_params, expert_params)


def test_disk_experts_equal_the_loaded_ones(tiny_path):
    model, _ = load(tiny_path, dtype=torch.float32)
    checkpoint = open_checkpoint(tiny_path)
    disk = DiskExperts(checkpoint, torch.float32)
    moe = model.moe_layers()[-1]
    built = disk.build(moe.layer_idx, 13)
    for name, tensor in moe.experts[13].state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor)
    assert disk.nbytes(moe.layer_idx, 13) == sum(checkpoint.nbytes(f"model.layers.{moe.layer_idx}.mlp.experts.13.{p}.weight")
                                                 for p in ("gate_proj", "up_proj", "down_proj"))
    disk.close()


def deepseek_moe_16b() -> DeepseekConfig:
    return DeepseekConfig(vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                          n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1)


def test_plan_for_a_small_gpu_and_little_ram():
    # By hand, bf16. One routed expert: 3 x 2048 x 1408 weights = 17,301,504 bytes. The rest: embedding
    # and lm_head 2 x 102400 x 2048, final norm 2048, per layer attention 4 x 2048^2 and norms 2 x 2048
    # (28 layers), the dense MLP 3 x 2048 x 10944 (layer 0), per MoE layer two shared experts and the
    # router 64 x 2048 (27 layers): 1,427,228,672 weights = 2,854,457,344 bytes.
    config = deepseek_moe_16b()
    expert, rest = expert_sizes(config, torch.bfloat16, None)
    assert (expert, rest) == (17_301_504, 2_854_457_344)
    resources = Resources(gpu_free=None, ram_available=64 * 10**9, process_rss=10**9)
    gb = 1e9
    plan = make_plan(config, torch.device("cuda", 0), Budgets(gpu_mem=8 * gb, max_ram=12 * gb), resources)
    # A slot holds one expert in each of the 27 MoE layers (467,140,608 bytes), after two experts and
    # 128 MiB of working room. GPU: (8e9 - rest - 34,603,008 - 134,217,728) / 467,140,608 = 10.65.
    # RAM: 12 GB less the 1 GB already in use, (11e9 - 34,603,008 - 134,217,728) / 467,140,608 = 23.19.
    assert plan.device_slots == 10
    assert [t.name for t in plan.tiers] == ["cuda:0", "ram", "disk"]
    assert plan.host_slots == 23
    # Uniform routing misses 54 of 64 GPU slots: 27 layers x 6 experts x 54/64 x 17,301,504 bytes.
    assert plan.expected_link_bytes()["ram->cuda:0"] == pytest.approx(2_364_899_328)


def test_plan_refuses_impossible_budgets():
    config = deepseek_moe_16b()
    with pytest.raises(UsageError, match="--gpu-mem needs a CUDA GPU"):
        make_plan(config, torch.device("cpu"), Budgets(gpu_mem=8e9), ROOMY)
    with pytest.raises(UsageError, match="is too small"):
        make_plan(config, torch.device("cpu"), Budgets(max_ram=2e9), ROOMY)
    with pytest.raises(UsageError, match="at least 1 slot"):
        make_plan(config, torch.device("cpu"), Budgets(expert_cache=0), ROOMY)


def test_plan_keeps_everything_in_ram_when_it_fits():
    plan = make_plan(deepseek_moe_16b(), torch.device("cpu"), Budgets(max_ram=64e9), ROOMY)
    assert [t.name for t in plan.tiers] == ["ram"] and plan.device_slots == 64
    assert plan.expected_link_bytes() == {}


def test_trace_is_atomic_and_validated(tmp_path):
    header = TraceHeader(moe_layers=[1], n_experts=4, top_k=1, expert_bytes=10)
    path = tmp_path / "t.jsonl"
    with pytest.raises(RuntimeError):
        with TraceRecorder(path, header) as recorder:
            recorder(1, torch.tensor([[2]]), torch.ones(1, 1))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with TraceRecorder(path, header) as recorder:
        recorder(1, torch.tensor([[2], [3]]), torch.ones(2, 1))
    assert read_trace(path).events == [Routing(1, [[2], [3]])]
    path.write_text(path.read_text().replace("[[2],[3]]", "[[2],[7]]"))
    with pytest.raises(TraceError, match="out of range"):
        read_trace(path)
    (tmp_path / "bad.jsonl").write_text("hello\n")
    with pytest.raises(TraceError, match="corrupted trace|not a dsmoe"):
        read_trace(tmp_path / "bad.jsonl")


def test_resident_bytes_count_lm_head_as_run_and_leave_the_table_in_the_file():
    # 16B: a 102,400 x 2048 table. lm_head at bf16 is 419,430,400 bytes; in int8 (the 4-bit run's
    # default) 209,715,200 plus 10 bytes a row (SCB and scale fp32, unit bf16) = 210,739,200. With
    # experts on disk on the CPU the bf16 embedding table (419,430,400 bytes) is not held.
    config = deepseek_moe_16b()
    bf16_head = resident_bytes(config, torch.bfloat16, 4, False, embedding_in_file=False)
    int8_head = resident_bytes(config, torch.bfloat16, 4, None, embedding_in_file=False)
    assert bf16_head - int8_head == 419_430_400 - 210_739_200
    assert int8_head - resident_bytes(config, torch.bfloat16, 4, None, embedding_in_file=True) == 419_430_400
    assert resident_bytes(config, torch.bfloat16, None, None, embedding_in_file=False) == expert_sizes(
        config, torch.bfloat16, None)[1]  # bf16 runs keep a bf16 lm_head
