"""The decode step for one bf16 token as one native call over the decoder layers (native/layer_step.c).

Around its kernels the module path runs ~60 PyTorch and Python operations per layer, and at 28
layers even a lean Python loop around two native calls a layer cost ~6 ms of a ~60 ms token
(docs/PERFORMANCE.md): that Python runs on caches just swept by the layer's weights. So each
layer's constant arguments (sizes, the addresses of its weights and of every routed expert's) are
gathered once into a C struct, a ``LayerPlan``, and ``StackPlan`` runs all layers in one call:
the router's choice picks the experts' weights in C. The roundings are the modules', so the result
is theirs, bit for bit.

Whether a plan (and a module's cached one-token kernel) may still run is one rule, ``Validity``:
it runs while (1) no weights changed anywhere since it was built: replacing a module, parameter or
buffer anywhere (torch's global registration hooks), moving a quantized layer (``QuantLinear``) or
an expert store taking or returning the experts (``ExpertChannel.hold``) all call
``weights_changed``; (2) no forward hook is registered on a module it stands in for, since it
skips their calls; and (3) the tensors it checks by address (the norms' and router's, a kernel's
own weights) still have those addresses, which ``param.data = ...`` changes. Changing a quantized
weight in place needs no new plan (the kernels read it where it is); a routed expert given new
storage with ``.data = ...`` is not seen by a layer's plan, which keeps the old storage alive so it
never reads freed memory.

``native_token`` is the one test of whether a tensor may go to the native kernels at all; each
kernel adds only its own shape limits.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from dsmoe.model.cache import KVCache
from dsmoe.native.library import (
    ATTENTION_POINTERS,
    MAX_TOP_K,
    MLP_POINTERS,
    AttentionHalf,
    LayerStep,
    native_library,
)
from dsmoe.quant.linear import NativeWeights, SwiGLUKernel, native_weights

if TYPE_CHECKING:  # the modules this plans for; deepseek.py imports this file to run them
    from dsmoe.model.deepseek import MoE, DecoderLayer
    from dsmoe.model.routing import NativeExpertHolder

_generation = 0
_live: weakref.WeakSet[LayerPlan] = weakref.WeakSet()


def weights_changed(*_: object) -> None:
    """Make every plan built so far stale (layers build new ones on their next token) and let go of
    the weights they hold, so replaced or offloaded experts are freed."""
    global _generation
    _generation += 1
    for plan in list(_live):
        plan.release()
    _live.clear()


_detached = threading.local()


@contextlib.contextmanager
def building_detached() -> Iterator[None]:
    """Modules built inside (on this thread) are reachable from no plan yet, so registering their
    tensors need not make every plan stale: an expert store builds its slots' modules this way
    while the decode plans keep running."""
    _detached.depth = getattr(_detached, "depth", 0) + 1
    try:
        yield
    finally:
        _detached.depth -= 1


def _registered(*_: object) -> None:
    if not getattr(_detached, "depth", 0):
        weights_changed()


for _register in (torch_module.register_module_module_registration_hook,
                  torch_module.register_module_parameter_registration_hook,
                  torch_module.register_module_buffer_registration_hook):
    _register(_registered)


def native_token(x: torch.Tensor) -> bool:
    """Whether ``x`` may go to the native decode kernels: bf16 on the CPU, with the library built."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and native_library() is not None


class Validity:
    """The rule above, for one plan or kernel: built from ``modules`` it skips, reading ``watched`` by address."""

    def __init__(self, modules: Sequence[nn.Module], watched: Sequence[torch.Tensor | None]) -> None:
        self.generation = _generation
        self.modules = tuple(modules)
        self.watched = tuple((t, t.data_ptr()) for t in watched if t is not None)
        self.hooks_checked = -1  # RemovableHandle.next_id when these modules were last found unhooked

    def holds(self) -> bool:
        """Checked before each use, on caches swept by the previous layer's weights: a counter, dict
        lookups and address checks. The modules' hooks are looked at only when a hook was registered
        anywhere since they were last found absent (every hook's handle takes an id from one counter)."""
        if self.generation != _generation:
            return False
        if RemovableHandle.next_id != self.hooks_checked or torch_module._global_forward_hooks \
                or torch_module._global_forward_pre_hooks:
            if not _no_hooks(self.modules):
                return False
            self.hooks_checked = RemovableHandle.next_id
        return all(tensor.data_ptr() == address for tensor, address in self.watched)

    def release(self) -> None:
        self.generation, self.watched = -1, ()


def weight_of(module: nn.Module | None) -> torch.Tensor | None:
    """``module.weight`` by dict lookups: nn.Module's attribute lookup costs ~1 us."""
    assert module is not None
    found = module._parameters.get("weight")
    return found if found is not None else module._buffers.get("weight")


def _no_hooks(modules: Sequence[nn.Module]) -> bool:
    """A plan skips the modules' calls, so it runs only where no hook, theirs or global, would notice."""
    return not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


class LayerPlan:
    """One layer's ``layer_step``, built by ``for_layer`` and kept while ``current`` holds."""

    def __init__(self, layer: DecoderLayer, moe: MoE | None, projections: NativeWeights,
                 mlp_kernel: SwiGLUKernel | None, experts: Sequence[SwiGLUKernel], held: bool = False) -> None:
        """``held``: an expert store holds the MoE layer's experts and names them per token (the step's
        resolver); they must be of the shared experts' format, ``expert_kind``."""
        attn = layer.self_attn
        self.held = held
        self.layer_idx = attn.layer_idx
        self.moe = moe
        self.parts = _parts(layer)
        norms = (weight_of(layer.input_layernorm), weight_of(layer.post_attention_layernorm))
        router = weight_of(self.moe.gate) if self.moe is not None else None
        # A new storage for a norm or the router (param.data = ...) makes a new plan.
        self.validity = Validity(self.parts, (*norms, router))
        # Holds every storage the struct points at, routed experts' too, so none is freed under it.
        tensors = [*projections.tensors, *norms, router, *(mlp_kernel.weights.tensors if mlp_kernel else ())]
        tensors += [t for kernel in experts for t in kernel.weights.tensors]
        self.storages = [t.untyped_storage() for t in tensors if t is not None]
        _live.add(self)
        self.top_k = self.moe.gate.top_k if self.moe is not None else 0
        # The MLP half's format: the experts' (a MoE layer), else the dense MLP's.
        head = experts[0] if experts else mlp_kernel
        assert head is not None
        inter = moe.expert_inter if held and moe is not None else head.inter
        self.expert_kind = (head.table, head.unit, head.blocksize, head.hidden, inter)
        self.expert_table = (ct.c_void_p * (MLP_POINTERS * len(experts)))(*(a for k in experts for a in k.addresses))
        self.step = LayerStep(
            attn=AttentionHalf(
                lut=projections.table, input_norm=norms[0].data_ptr(), post_norm=norms[1].data_ptr(),  # type: ignore[union-attr]  # checked not None in for_layer
                proj=(ct.c_void_p * ATTENTION_POINTERS)(*projections.addresses),
                router=router.data_ptr() if router is not None else None,
                blocksize=projections.blocksize, hidden=layer.input_layernorm.weight.shape[0], n_heads=attn.n_heads,
                n_kv=attn.n_kv_heads, head_dim=attn.head_dim,
                n_experts=self.moe.n_routed_experts if self.moe is not None else 0, top_k=self.top_k,
                unit=projections.unit, eps=layer.input_layernorm.eps,
                norm_topk=int(self.moe.gate.norm_topk_prob) if self.moe is not None else 0,
            ),
            mlp_lut=head.table, mlp_unit=head.unit, mlp_blocksize=head.blocksize, inter=inter,
            shared_inter=mlp_kernel.inter if mlp_kernel is not None else 0,
            experts=ct.addressof(self.expert_table) if experts else None,
            shared=(ct.c_void_p * MLP_POINTERS)(*(mlp_kernel.addresses if mlp_kernel is not None else ())),
        )

    @staticmethod
    def for_layer(layer: DecoderLayer, moe: MoE | None) -> LayerPlan | None:
        """The plan for this layer's weights (``moe``: its MLP when that is a MoE layer), or None where
        a part of it has no native path.

        The cheap checks come first: an unquantized or offloaded model leaves after a few.
        """
        attn, mlp = layer.self_attn, layer.mlp
        projections = native_weights(_projections(layer))
        if projections is None or attn.head_dim % 8 or not _no_hooks(_parts(layer)):
            return None
        norms = (weight_of(layer.input_layernorm), weight_of(layer.post_attention_layernorm))
        if any(n is None or n.dtype != torch.bfloat16 or n.shape[0] % 8 for n in norms):
            return None
        if moe is None:
            kernel = mlp.one_token_kernel()  # type: ignore[operator]  # a dense layer's mlp is an MLP
            return LayerPlan(layer, None, projections, kernel, ()) if kernel is not None else None
        gate = weight_of(moe.gate)
        if gate is None or gate.dtype != torch.float32 or moe.gate.top_k > MAX_TOP_K:
            return None
        shared = moe.shared_experts.one_token_kernel() if moe.shared_experts is not None else None
        if moe.shared_experts is not None and shared is None:
            return None
        holder = moe.channel.holder
        if holder is not None:
            # The store names each token's experts; the shared experts' kernel gives their format.
            serves = getattr(holder, "serves_native", None)  # a holder may offer only the module path
            if shared is None or serves is None or not serves(moe.layer_idx, moe.gate.top_k):
                return None
            return LayerPlan(layer, moe, projections, shared, (), held=True)
        experts = [e.one_token_kernel() for e in moe.experts]  # type: ignore[operator]  # ModuleList of MLPs, untyped
        if any(k is None for k in experts) or len({k.kind for k in experts}) != 1:
            return None
        kind = experts[0].kind
        if shared is not None and shared.kind[:3] != kind[:3]:  # one format for the whole MLP half
            return None
        return LayerPlan(layer, moe, projections, shared, experts)

    def current(self) -> bool:
        """``Validity.holds`` for this layer (``StackPlan`` checks the same for all layers at once)."""
        return self.validity.holds()

    def release(self) -> None:
        """Stale for good: drop the references to the weights."""
        self.validity.release()
        self.storages = []

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                 cache: KVCache) -> torch.Tensor:
        """The layer's output for one token x [1, 1, hidden] (bf16) at ``start_pos``."""
        return run_layers([self], x, cos, sin, start_pos, cache)


class StackPlan:
    """All decoder layers' plans, run as one native call per token."""

    def __init__(self, layers: Sequence[DecoderLayer], plans: Sequence[LayerPlan]) -> None:
        self.plans = tuple(plans)
        # The layers' plans were all current when this was made; the call skips the layers too.
        hookable = tuple(layers) + tuple(part for plan in plans for part in plan.parts)
        self.validity = Validity(hookable, [tensor for plan in plans for tensor, _ in plan.validity.watched])

    def current(self) -> bool:
        """``Validity.holds`` for every layer at once: looking at the ~140 modules' hooks on every
        token cost ~0.3 ms at 28 layers, so they are looked at only after a hook was registered."""
        return self.validity.holds()

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                 cache: KVCache) -> torch.Tensor:
        return run_layers(self.plans, x, cos, sin, start_pos, cache)


def run_layers(plans: Sequence[LayerPlan], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
               cache: KVCache) -> torch.Tensor:
    """Consecutive layers' output for one token x [1, 1, hidden] (bf16) at ``start_pos``, in one call;
    then each MoE layer's routing observer sees the layer's choice, as in the module path."""
    lib = native_library()
    assert lib is not None
    cache.reserve(start_pos + 1)
    first = plans[0].layer_idx
    keys, values = cache.keys[first: first + len(plans)], cache.values[first: first + len(plans)]
    if keys[0].dtype != torch.bfloat16 or keys[0].shape[0] != 1 or not keys[0].is_contiguous():
        raise ValueError("the native decode step needs a bf16 cache of one sequence")
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    out = x.contiguous().clone()
    stride = max(1, max(plan.top_k for plan in plans))
    ids = torch.empty(len(plans), stride, dtype=torch.long)
    mix = torch.empty(len(plans), stride, dtype=torch.float32)
    steps = (ct.c_void_p * len(plans))(*(ct.addressof(plan.step) for plan in plans))
    resolver = _Resolver(plans, ids) if any(plan.held for plan in plans) else None
    status = lib.dsmoe_decode_layers(steps, len(plans), start_pos, keys[0].shape[2], cos.data_ptr(), sin.data_ptr(),
                                     (ct.c_void_p * len(plans))(*(k.data_ptr() for k in keys)),
                                     (ct.c_void_p * len(plans))(*(v.data_ptr() for v in values)),
                                     out.data_ptr(), stride, ids.data_ptr(), mix.data_ptr(),
                                     resolver.pointer if resolver is not None else None, None)
    if resolver is not None and resolver.error is not None:
        raise resolver.error
    if status != 0:
        raise RuntimeError(f"native decode step failed with status {status}")
    for row, plan in enumerate(plans):
        if plan.moe is not None:
            plan.moe.channel.observe(plan.layer_idx, ids[row: row + 1, : plan.top_k], mix[row: row + 1, : plan.top_k])
    return out


_RESOLVER = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_int64, ct.c_void_p, ct.c_void_p, ct.c_int64, ct.c_void_p)


class _Resolver:
    """The decode step's ``dsmoe_expert_resolver`` for layers whose experts a store holds: C calls
    it between a layer's halves with the router's input and choice; the store brings the experts
    in (counting hits, reading misses, prefetching the next layer) and it writes their addresses.
    The kernels are kept until the step ends; an exception stops the step and is raised after it."""

    def __init__(self, plans: Sequence[LayerPlan], ids: torch.Tensor) -> None:
        self.plans, self.ids = plans, ids
        self.kept: list[object] = []
        self.error: BaseException | None = None
        self.function = _RESOLVER(self._resolve)
        self.pointer = ct.cast(self.function, ct.c_void_p)

    def _resolve(self, _context: int | None, row: int, normed: int, _ids: int, count: int, weights: int) -> int:
        try:
            plan = self.plans[row]
            assert plan.moe is not None and plan.moe.channel.holder is not None
            hidden = plan.step.attn.hidden
            x = torch.frombuffer((ct.c_uint16 * hidden).from_address(normed), dtype=torch.bfloat16).clone()
            chosen = self.ids[row: row + 1, :count]
            holder: NativeExpertHolder = plan.moe.channel.holder  # type: ignore[assignment]  # for_layer checked serves_native
            experts = holder.native_experts(plan.layer_idx, x.view(1, hidden), chosen)
            table = (ct.c_void_p * (MLP_POINTERS * count)).from_address(weights)
            for e, expert in enumerate(experts):
                if expert.kind != plan.expert_kind:
                    raise RuntimeError(f"layer {plan.layer_idx}: an expert's format {expert.kind} is not the "
                                       f"shared experts' {plan.expert_kind}")
                table[MLP_POINTERS * e: MLP_POINTERS * (e + 1)] = list(expert.addresses)
            self.kept.append(experts)
            return 0
        except BaseException as exc:  # noqa: BLE001  # C cannot unwind Python: carried out and raised after
            self.error = exc
            return 1


def _projections(layer: DecoderLayer) -> list[nn.Module]:
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]


def _parts(layer: DecoderLayer) -> list[nn.Module]:
    return [layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
