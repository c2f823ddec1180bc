"""The decode step's native kernels that are not quantization: attention for one new token,
RMSNorm of one row, the router for one token. Each replaces a handful of small PyTorch ops with one
call and gives the module's bf16 roundings (native/ops.c); callers check ``native_library()`` first."""

from __future__ import annotations

import torch

from dsmoe.native.library import check_status, native_library


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, pos: int, n_heads: int) -> torch.Tensor:
    """One new token's attention in one native call: rotary, cache write at ``pos``, attention.

    q [n_heads * head_dim], k and v [n_kv * head_dim] bf16 straight from the projections; cos and
    sin [head_dim] for ``pos``; the caches [1, n_kv, capacity, head_dim]. Returns [n_heads * head_dim].
    The decode step's ~25 small PyTorch ops per layer become one call.
    """
    lib = native_library()
    assert lib is not None
    _, n_kv, capacity, head_dim = key_cache.shape
    tensors = (q, k, v, cos, sin, key_cache, value_cache)
    if key_cache.shape[0] != 1 or value_cache.shape != key_cache.shape or not all(
            t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors):
        raise ValueError("attention_decode needs contiguous bf16 tensors and a cache of batch 1")
    out = torch.empty(n_heads * head_dim, dtype=torch.bfloat16)
    check_status(lib.dsmoe_attention_decode(n_heads, n_kv, head_dim, pos, capacity, q.data_ptr(), k.data_ptr(),
                                            v.data_ptr(), cos.data_ptr(), sin.data_ptr(), key_cache.data_ptr(),
                                            value_cache.data_ptr(), out.data_ptr()), "attention")
    return out


def rms_norm_row(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of one contiguous bf16 row with a bf16 weight, in one call (the decode step runs two
    per layer, each ~8 PyTorch ops). May differ from the PyTorch module by one bf16 step, rarely."""
    lib = native_library()
    assert lib is not None
    out = torch.empty_like(x)
    check_status(lib.dsmoe_rmsnorm(x.shape[-1], eps, x.data_ptr(), weight.data_ptr(), out.data_ptr()), "RMSNorm")
    return out


def route_one(x: torch.Tensor, weight: torch.Tensor, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router for one contiguous bf16 token: (ids [1, k] ascending, weights [1, k] fp32), as
    ``MoEGate`` gives them; ``weight`` is the fp32 gate [experts, hidden]. One call instead of ~10 ops.
    ``top_k`` is at most ``MAX_TOP_K``."""
    lib = native_library()
    assert lib is not None
    ids = torch.empty(1, top_k, dtype=torch.long)
    weights = torch.empty(1, top_k, dtype=torch.float32)
    check_status(lib.dsmoe_router(weight.shape[0], weight.shape[1], top_k, int(norm_topk), x.data_ptr(),
                                  weight.data_ptr(), ids.data_ptr(), weights.data_ptr()), "router")
    return ids, weights
