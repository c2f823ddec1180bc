"""Per-expert weight offloading: routed experts placed by heat on the device, in RAM or on disk."""

from dsmoe.offload.plan import Budgets, Plan, Resources, Tier, make_plan
from dsmoe.offload.policies import LayerCache, LFUPolicy, LRUPolicy, make_policy
from dsmoe.offload.runtime import OffloadOptions, attach, load_offloaded, plan_for, store_of
from dsmoe.offload.simulate import SimResult, simulate, sweep
from dsmoe.offload.stats import LayerStats, StoreStats
from dsmoe.offload.store import CostModel, ExpertStore
from dsmoe.offload.trace import Trace, TraceError, TraceHeader, TraceRecorder, read_trace

__all__ = [
    "Budgets", "CostModel", "ExpertStore", "LFUPolicy", "LRUPolicy", "LayerCache", "LayerStats",
    "OffloadOptions", "Plan", "Resources", "SimResult", "StoreStats", "Tier", "Trace", "TraceError",
    "TraceHeader", "TraceRecorder", "attach", "load_offloaded", "make_plan", "make_policy", "plan_for",
    "read_trace", "simulate", "store_of", "sweep",
]
