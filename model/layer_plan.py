"""A decoder layer's decode step for one bf16 token as two native calls (quant/native/kernels.c).

Around its kernels the module path runs ~60 PyTorch and Python operations per layer; skipping
them measured 3% of a 16B-geometry decode step (docs/PERFORMANCE.md). A plan gathers the layer's constant arguments (sizes, weight addresses) once and
runs the step as the attention half (norms, q/k/v, attention, o, residual, router) and the MLP
half (routed and shared experts or the dense MLP, residual); between the two, Python looks up the
chosen experts and tells the routing observer. The roundings are the modules', so the result is
theirs, bit for bit.
"""

from __future__ import annotations

import ctypes as ct
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsmoe.model.cache import KVCache
from dsmoe.quant import kernels
from dsmoe.quant.linear import NativeWeights, SwiGLUKernel, native_weights

if TYPE_CHECKING:
    from dsmoe.model.deepseek import DecoderLayer


def weight_of(module: nn.Module | None) -> torch.Tensor | None:
    """``module.weight`` by dict lookups: nn.Module's attribute lookup cost ~1 us, and the decode
    step checks ~50 weights per layer."""
    assert module is not None
    found = module._parameters.get("weight")
    return found if found is not None else module._buffers.get("weight")


class _AttentionHalf(ct.Structure):
    """The C struct ``attention_half``, field for field."""

    _fields_ = [
        ("lut", ct.c_void_p),
        ("input_norm", ct.c_void_p),
        ("post_norm", ct.c_void_p),
        ("proj", ct.c_void_p * 8),
        ("router", ct.c_void_p),
        ("blocksize", ct.c_int64),
        ("hidden", ct.c_int64),
        ("n_heads", ct.c_int64),
        ("n_kv", ct.c_int64),
        ("head_dim", ct.c_int64),
        ("n_experts", ct.c_int64),
        ("top_k", ct.c_int64),
        ("unit", ct.c_float),
        ("eps", ct.c_float),
        ("norm_topk", ct.c_int32),
    ]


def _no_hooks(modules: list[nn.Module]) -> bool:
    """A plan skips the submodules' calls, so it runs only where no hook would notice."""
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class LayerPlan:
    """The two calls for one layer, built by ``for_layer`` and kept while ``current`` holds."""

    def __init__(self, layer: DecoderLayer, projections: NativeWeights, mlp_kernel: SwiGLUKernel | None,
                 expert_kind: tuple[object, ...] | None) -> None:
        from dsmoe.model.deepseek import MoE

        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx = attn.layer_idx
        self.moe = mlp if isinstance(mlp, MoE) else None
        self.dense = mlp if self.moe is None else None
        self.mlp_kernel, self.expert_kind = mlp_kernel, expert_kind
        norms = (weight_of(layer.input_layernorm), weight_of(layer.post_attention_layernorm))
        router = weight_of(self.moe.gate) if self.moe is not None else None
        # What ``current`` checks, by dict lookups only: each module still in its parent, each
        # weight still its module's and at its address (``param.data = ...`` keeps the object but
        # frees the storage the struct points at), no hooks on the parts the plan runs in place of.
        self.parts = _parts(layer)
        named = [(layer, name) for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")]
        named += [(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        named += [(mlp, "gate")] if self.moe is not None else []
        self.children = tuple((parent._modules, name, parent._modules[name]) for parent, name in named)
        weighted = [*_projections(layer), layer.input_layernorm, layer.post_attention_layernorm]
        weighted += [self.moe.gate] if self.moe is not None else []
        self.weights = tuple((m, w, w.data_ptr()) for m in weighted if (w := weight_of(m)) is not None)
        self.projections = projections  # keeps the addresses in the struct valid
        self.top_k = self.moe.gate.top_k if self.moe is not None else 0
        self.attention = _AttentionHalf(
            lut=projections.table, input_norm=norms[0].data_ptr(), post_norm=norms[1].data_ptr(),  # type: ignore[union-attr]
            proj=(ct.c_void_p * 8)(*projections.addresses), router=router.data_ptr() if router is not None else None,
            blocksize=projections.blocksize, hidden=layer.input_layernorm.weight.shape[0], n_heads=attn.n_heads,
            n_kv=attn.n_kv_heads, head_dim=attn.head_dim,
            n_experts=self.moe.n_routed_experts if self.moe is not None else 0, top_k=self.top_k,
            unit=projections.unit, eps=layer.input_layernorm.eps,
            norm_topk=int(self.moe.gate.norm_topk_prob) if self.moe is not None else 0,
        )
        # The MLP half's format: the experts' (a MoE layer), else the dense MLP's.
        head = expert_kind if expert_kind is not None else mlp_kernel.kind  # type: ignore[union-attr]
        self.table, self.unit, self.blocksize, self.hidden, self.inter = head  # type: ignore[misc]
        self.mlp_inter = mlp_kernel.inter if mlp_kernel is not None else 0
        self.mlp_pointers = (ct.c_void_p * 6)(*mlp_kernel.addresses) if mlp_kernel is not None else None

    @staticmethod
    def for_layer(layer: DecoderLayer) -> LayerPlan | None:
        """The plan for this layer's weights, or None where a part of it has no native path.

        The cheap checks come first: an unquantized or offloaded model leaves after a few.
        """
        from dsmoe.model.deepseek import MoE

        attn, mlp = layer.self_attn, layer.mlp
        projections = native_weights(_projections(layer))
        if projections is None or attn.head_dim % 8 or not _no_hooks(_parts(layer)):
            return None
        norms = (weight_of(layer.input_layernorm), weight_of(layer.post_attention_layernorm))
        if any(n is None or n.dtype != torch.bfloat16 or n.shape[0] % 8 for n in norms):
            return None
        if not isinstance(mlp, MoE):
            kernel = mlp.one_token_kernel()  # type: ignore[operator]
            return LayerPlan(layer, projections, kernel, None) if kernel is not None else None
        gate = weight_of(mlp.gate)
        if mlp.expert_runner is not None or gate is None or gate.dtype != torch.float32 or mlp.gate.top_k > 64:
            return None
        shared = mlp.shared_experts.one_token_kernel() if mlp.shared_experts is not None else None
        if mlp.shared_experts is not None and shared is None:
            return None
        experts = [e.one_token_kernel() for e in mlp.experts]  # type: ignore[operator]
        if any(k is None for k in experts):
            return None
        kinds = {k.kind for k in experts}
        if len(kinds) != 1:
            return None
        (kind,) = kinds
        if shared is not None and shared.kind[:3] != kind[:3]:  # one format for the whole MLP half
            return None
        return LayerPlan(layer, projections, shared, kind)

    def current(self) -> bool:
        """Whether the layer still holds the weights this plan was built from, with no hooks or store.

        Runs before every layer of every decode step, right after the caches were swept by the
        previous layer's weights, where nn.Module attribute lookups cost ~50 us per layer: only
        dict lookups and identity checks here.
        """
        if any(modules.get(name) is not child for modules, name, child in self.children):
            return False
        if any(weight_of(module) is not weight or weight.data_ptr() != address
               for module, weight, address in self.weights) or not _no_hooks(self.parts):
            return False
        if self.moe is None:
            return self.dense.one_token_kernel() is self.mlp_kernel  # type: ignore[operator]
        shared = self.moe.shared_experts
        return self.moe.expert_runner is None and (
            shared.one_token_kernel() is self.mlp_kernel if shared is not None else self.mlp_kernel is None)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                 cache: KVCache) -> torch.Tensor:
        """The layer's output for one token x [1, 1, hidden] (bf16, contiguous) at ``start_pos``."""
        lib = kernels.native_library()
        assert lib is not None
        keys, values = cache.layer_tensors(self.layer_idx, start_pos + 1)
        if keys.dtype != torch.bfloat16 or keys.shape[0] != 1 or not (keys.is_contiguous() and values.is_contiguous()):
            raise ValueError("the native decode step needs a bf16 cache of one sequence")
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        middle, normed, out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        ids = torch.empty(1, self.top_k, dtype=torch.long)
        mix = torch.empty(1, self.top_k, dtype=torch.float32)
        status = lib.dsmoe_attention_half(ct.byref(self.attention), start_pos, keys.shape[2], cos.data_ptr(),
                                          sin.data_ptr(), keys.data_ptr(), values.data_ptr(), x.data_ptr(),
                                          middle.data_ptr(), normed.data_ptr(), ids.data_ptr(), mix.data_ptr())
        if status != 0:
            raise RuntimeError(f"native attention half failed with status {status}")
        count, pointers = 0, None
        if self.moe is not None:
            if self.moe.routing_observer is not None:
                self.moe.routing_observer(self.layer_idx, ids, mix)
            experts = self.moe.experts._modules
            chosen = [experts[str(i)].one_token_kernel() for i in ids[0].tolist()]  # type: ignore[union-attr,operator]
            if not all(k is not None and k.kind == self.expert_kind for k in chosen):
                # An expert changed since the plan was made: its module path, for this token.
                return middle + self.moe.combine(normed.view(1, -1), ids, mix).view(x.shape)
            count = len(chosen)
            pointers = (ct.c_void_p * (6 * count))(*(a for k in chosen for a in k.addresses))
        status = lib.dsmoe_mlp_half(self.table, self.unit, self.blocksize, self.hidden, count, self.inter, pointers,
                                    mix.data_ptr(), self.mlp_inter, self.mlp_pointers, normed.data_ptr(),
                                    middle.data_ptr(), out.data_ptr())
        if status != 0:
            raise RuntimeError(f"native MLP half failed with status {status}")
        return out


def _projections(layer: DecoderLayer) -> list[nn.Module]:
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]


def _parts(layer: DecoderLayer) -> list[nn.Module]:
    return [layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
