"""DeepSeekMoE in plain PyTorch: one module per block, names equal to the checkpoint's.

Module paths match the official tensor names (``model.layers.N.mlp.experts.E.gate_proj``), so a
checkpoint loads with no renaming and a quantized layer replaces an ``nn.Linear`` in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.model.cache import KVCache
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.generate import SamplingSettings, generate_ids
from dsmoe.model.layer_plan import LayerPlan, StackPlan, Validity, native_token, weight_of
from dsmoe.model.routing import ExpertChannel, GuessObserver, RoutingObserver
from dsmoe.native.library import MAX_TOP_K
from dsmoe.native.ops import attention_decode, rms_norm_row, route_one
from dsmoe.quant.cache import CacheOutcome
from dsmoe.quant.linear import NATIVE_ROWS_KERNELS, SwiGLUKernel, accumulate_experts, route_experts, swiglu_kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() == x.shape[-1] and x.shape[-1] % 8 == 0 and native_token(x) and x.is_contiguous()
                and self.weight.dtype == torch.bfloat16):
            return rms_norm_row(x, self.weight, self.eps)
        # Normalise in fp32, as the reference does, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with optional linear or dynamic-NTK scaling."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_positions = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.kind = scaling.get("type", scaling.get("rope_type"))
        self.factor = float(scaling.get("factor", 1.0))
        self._inv_freq_for: tuple[float, torch.device, torch.Tensor] | None = None

    def _inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Kept between calls while the base stays (always, but for dynamic scaling past the
        trained length): a decode step's Python runs on cold caches, ~10 us per PyTorch op."""
        base = self.base
        if self.kind == "dynamic" and seq_len > self.max_positions:
            ratio = self.factor * seq_len / self.max_positions - (self.factor - 1)
            base = base * ratio ** (self.dim / (self.dim - 2))
        kept = self._inv_freq_for
        if kept is None or kept[0] != base or kept[1] != device:
            exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
            kept = self._inv_freq_for = (base, device, 1.0 / (base**exponent))
        return kept[2]

    def forward(self, positions: torch.Tensor, total_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [T, head_dim] for the given absolute positions."""
        inv_freq = self._inv_freq(total_len, positions.device)
        t = positions.float()
        if self.kind == "linear":
            t = t / self.factor
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        if cache is not None and bsz == seq_len == 1 and native_attention(x, self.head_dim):
            keys, values = cache.layer_tensors(self.layer_idx, start_pos + 1)
            out = attention_decode(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos[0], sin[0], keys, values,
                                   start_pos, self.n_heads)
            return self.o_proj(out.view(1, 1, -1))
        q = self.q_proj(x).view(bsz, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)
        if seq_len == 1:
            out = _one_query_attention(q, k, v)
        elif k.shape[2] == seq_len:
            # A prompt from position 0: the mask below is the causal one, and saying so lets the fused
            # kernel skip the blocks above the diagonal (1.4x at 1024 tokens; the same bits, which
            # tests/test_decode_path.py checks).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            # Query i sits at absolute position start_pos + i and sees keys 0..start_pos + i.
            q_pos = torch.arange(start_pos, start_pos + seq_len, device=x.device)
            k_pos = torch.arange(k.shape[2], device=x.device)
            mask = k_pos[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
            )
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.n_heads * self.head_dim)
        return self.o_proj(out)


def native_attention(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the decode step's attention runs as one native call (``native_token``, and the kernel's width rule)."""
    return head_dim % 8 == 0 and native_token(x)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over the whole cache: q [B, H, 1, D], k and v [B, KV, L, D].

    The decode step. On the CPU, SDPA's flash kernel costs ~10x this for a single query (2.6 ms vs
    0.3 ms at 1,000 cached tokens); scores and softmax stay in fp32 as in SDPA. Query heads that
    share a KV head are stacked as rows, which is what ``enable_gqa`` means.
    """
    bsz, n_heads, _, head_dim = q.shape
    n_kv = k.shape[1]
    grouped = q.reshape(bsz, n_kv, n_heads // n_kv, head_dim).float()
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)) * (head_dim**-0.5)
    out = torch.matmul(scores.softmax(dim=-1), v.float())
    return out.reshape(bsz, n_heads, 1, head_dim).to(q.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, each routed expert, and the shared experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._one_token: tuple[Validity, SwiGLUKernel | None] | None = None

    def one_token_kernel(self) -> SwiGLUKernel | None:
        """The native one-call path for a single bf16 token, if these layers have one.

        Looked up once and kept while ``Validity`` holds (model/layer_plan.py: the rule for every
        native plan), as the decode plans are.
        """
        cached = self._one_token
        if cached is None or not cached[0].holds():
            linears = (self.gate_proj, self.up_proj, self.down_proj)
            validity = Validity(linears, [weight_of(linear) for linear in linears])
            cached = self._one_token = (validity, swiglu_kernel(*linears))
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
            kernel = self.one_token_kernel()
            if kernel is not None:
                return kernel(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax router: top-k experts per token, optionally renormalised."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None and config.num_experts_per_tok is not None
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (expert ids [N, k], weights [N, k]) with ids ascending per token."""
        if (x.shape[0] == 1 and x.shape[1] % 8 == 0 and self.top_k <= MAX_TOP_K and native_token(x) and x.is_contiguous()
                and self.weight.dtype == torch.float32):
            return route_one(x, self.weight, self.top_k, self.norm_topk_prob)
        # Scores in fp32 whatever the compute dtype (the loader keeps this weight in fp32).
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        ids, order = ids.sort(dim=-1)
        return ids, weights.gather(-1, order)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts.

    ``channel`` is the model's one link to whoever else has a stake in the routed experts: it hears
    each routing decision and, when an expert store holds the experts, runs them (model/routing.py).
    """

    def __init__(self, config: DeepseekConfig, layer_idx: int, channel: ExpertChannel) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        self.layer_idx = layer_idx
        self.n_routed_experts = config.n_routed_experts
        self.expert_inter = config.moe_intermediate_size
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.channel = channel

    def run_expert(self, expert_idx: int, x: torch.Tensor) -> torch.Tensor:
        """One routed expert on its tokens: the expert store's copy when one holds the experts."""
        holder = self.channel.holder
        if holder is not None:
            return holder.run(self.layer_idx, expert_idx, x)
        return self.experts[expert_idx](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        self.channel.routed(self.layer_idx, flat, ids, weights)
        out = self.route(flat, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)

    def route(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Group tokens by expert and run each chosen expert once, in ascending expert order."""
        if x.shape[0] == 1:
            return self._route_one(x, ids, weights)
        top_k = ids.shape[-1]
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.n_routed_experts).tolist()
        flat_weights = weights.reshape(-1, 1)
        out = torch.zeros_like(x)
        fused = self._prefill_kernels(x, counts)
        if fused is not None:
            used = [count for count in counts if count]
            route_experts(fused, used, token_of, flat_weights[order].reshape(-1).to(x.dtype).float(), x, out)
            return out
        start = 0
        for expert_idx, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            tokens = token_of[start:end]
            expert_out = self.run_expert(expert_idx, x[tokens])
            expert_out = expert_out * flat_weights[order[start:end]].to(expert_out.dtype)
            out.index_add_(0, tokens, expert_out)
            start = end
        return out

    def _prefill_kernels(self, x: torch.Tensor, counts: list[int]) -> list[SwiGLUKernel] | None:
        """The chosen experts' kernels when ``route_experts`` gives ``route``'s loop its bits: bf16,
        all of one native kind, each layer on the native kernel at its row count (an 8-bit layer with
        many rows takes ``torch._int_mm`` instead), and the experts resident or all in an expert
        store's slots for this pass (``served_experts``), whose modules ``run`` would call."""
        if x.dtype != torch.bfloat16:
            return None
        chosen = [expert_idx for expert_idx, count in enumerate(counts) if count]
        holder = self.channel.holder
        if holder is None:
            experts = self.experts._modules  # its own dict: indexing the list costs ~1.5 us
            modules: Sequence[nn.Module] | None = [experts[str(i)] for i in chosen]
        else:
            served = getattr(holder, "served_experts", None)
            modules = served(self.layer_idx, chosen) if served is not None else None
        if modules is None:
            return None
        kernels: list[SwiGLUKernel] = []
        for mlp, count in zip(modules, (counts[i] for i in chosen)):
            if not isinstance(mlp, MLP):
                return None
            kernel = mlp.one_token_kernel()
            if kernel is None or (kernels and kernel.kind != kernels[0].kind):
                return None
            if count > 1 and any(layer.kernel(count) not in NATIVE_ROWS_KERNELS  # type: ignore[operator]  # one_token_kernel took them: quantized linears
                                 for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                return None
            kernels.append(kernel)
        return kernels

    def _route_one(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``route`` for a single token (decode): the same sums in the same order, no grouping work.

        Weights are rounded to the compute dtype first, as ``route`` does, so both give the same bits.
        """
        out = torch.zeros_like(x)
        chosen, mix = ids[0].tolist(), weights[0].to(x.dtype).tolist()
        if self.channel.holder is None and x.dtype == torch.bfloat16:
            # Resident quantized experts: the whole loop in one native call, with the loop's bits.
            experts: dict[str, MLP] = self.experts._modules  # type: ignore[assignment]  # its own dict: indexing the list costs ~1.5 us
            kernels = [experts[str(i)].one_token_kernel() for i in chosen]
            fused = [k for k in kernels if k is not None]
            if len(fused) == len(kernels) and all(k.kind == fused[0].kind for k in fused):
                accumulate_experts(fused, mix, x, out)
                return out
        for expert_idx, weight in zip(chosen, mix):
            out += self.run_expert(expert_idx, x) * weight
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, channel: ExpertChannel) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp: nn.Module = (
            MoE(config, layer_idx, channel)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._plan: LayerPlan | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int, cache: KVCache | None,
                plan: LayerPlan | None = None) -> torch.Tensor:
        """With ``plan`` (``DeepseekModel.decode_step`` chooses it), the layer's native decode step; else its modules."""
        if plan is not None and cache is not None:
            return plan(x.contiguous(), cos, sin, start_pos, cache)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_plan(self, x: torch.Tensor) -> LayerPlan | None:
        """The native two-call step for one token like x, rebuilt when the layer's weights change."""
        if not native_token(x):
            return None
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = LayerPlan.for_layer(self, self.mlp if isinstance(self.mlp, MoE) else None)
        return plan


class RowsSource(Protocol):
    """Rows of a table kept outside memory (``checkpoint.reader.TensorRows``)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def get(self, ids: list[int]) -> torch.Tensor: ...

    def close(self) -> None: ...


class RowEmbedding(nn.Module):
    """``nn.Embedding`` whose table stays in the checkpoint file: a token needs one row of it, and
    at the 16B geometry the bf16 table is 420 MB a model run under a memory budget need not hold.
    The rows are the stored values cast to the compute dtype, as the loader casts the table."""

    def __init__(self, rows: RowsSource, dtype: torch.dtype) -> None:
        super().__init__()
        self.rows, self.dtype = rows, dtype
        self.num_embeddings, self.embedding_dim = rows.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(input_ids.cpu(), return_inverse=True)
        table = self.rows.get(unique.tolist()).to(self.dtype)
        return table[inverse].to(input_ids.device)


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekConfig, channel: ExpertChannel | None = None) -> None:
        super().__init__()
        channel = channel if channel is not None else ExpertChannel()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, channel) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self._stack: StackPlan | None = None

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        start_pos = cache.length if cache is not None else 0
        seq_len = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        positions = torch.arange(start_pos, start_pos + seq_len, device=input_ids.device)
        cos, sin = self.rotary(positions, start_pos + seq_len, x.dtype)
        step = self.decode_step(x, cache)
        if isinstance(step, StackPlan):
            assert cache is not None  # decode_step chooses a stack only with a cache
            x = step(x, cos, sin, start_pos, cache)
        else:
            for layer, plan in zip(self.layers, step):
                x = layer(x, cos, sin, start_pos, cache, plan)
        if cache is not None:
            cache.advance(seq_len)
        return self.norm(x)

    def decode_step(self, x: torch.Tensor, cache: KVCache | None) -> StackPlan | list[LayerPlan | None]:
        """How this forward pass runs the layers, chosen here once: all of them as one native call
        when every layer has a plan (one bf16 token on the CPU, with a cache); else each layer by
        its plan, or by its modules where it has none (``None``: a hook on a part, an unquantized
        layer, experts held by a store)."""
        layers: list[DecoderLayer] = list(self.layers)  # type: ignore[arg-type]  # ModuleList is untyped
        if cache is None or x.shape[0] != 1 or x.shape[1] != 1 or not native_token(x):
            return [None] * len(layers)
        stack = self._stack
        if stack is not None and stack.current():
            return stack
        plans = [layer.decode_plan(x) for layer in layers]
        ready = [plan for plan in plans if plan is not None]
        self._stack = None
        if layers and len(ready) == len(layers):
            stack = StackPlan(layers, ready)
            if stack.current():  # else a hook on a layer: each layer runs by its plan, hooks firing
                self._stack = stack
                return stack
        return plans


class DeepseekForCausalLM(nn.Module):
    """The whole model: ``model(ids)`` gives logits; ``model.generate`` decodes with a KV cache."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.config = config
        self.experts_channel = ExpertChannel()
        """Who runs the routed experts (an expert store may hold them) and who hears the routing."""
        self.quant_cache: CacheOutcome | None = None
        """What ``dsmoe.load`` did with the quantized-checkpoint cache (None: nothing was quantized)."""
        self.model = DeepseekModel(config, self.experts_channel)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the compute dtype, wherever the embedding table lives

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def set_routing_observer(self, observer: RoutingObserver | None, guesses: GuessObserver | None = None) -> None:
        """Report every MoE layer's routing decisions to ``observer`` (None to stop), and an expert
        store's guesses of them (its prefetch) to ``guesses``."""
        self.experts_channel.observer = observer
        self.experts_channel.guess_observer = guesses

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        return KVCache(self.config, batch_size, capacity, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with ``last_only``).

        ``positions`` [B, K] (indices into T) picks the rows the lm_head projects: logits
        [B, K, vocab], each equal to that position's row of the full result. The lm_head is
        102400 wide, so a caller that scores a few positions of a long prompt skips most of it.
        With a cache, the tokens continue the cached sequence and their keys and values are stored.
        Logits come back in fp32 whatever the compute dtype, since sampling and scoring want them.
        """
        hidden = self.model(input_ids, cache)
        if last_only:
            hidden = hidden[:, -1:]
        elif positions is not None:
            hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(hidden).float()

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int = 20, **settings: object) -> torch.Tensor:
        """Decode after ``prompt_ids`` [1, T] and return prompt + new tokens as [1, T + new]."""
        settings.setdefault("stop_ids", self.config.eos_token_ids)
        sampling = SamplingSettings(max_new_tokens=max_new_tokens, **settings)  # type: ignore[arg-type]  # its own fields, which it checks
        new = list(generate_ids(self, prompt_ids[0].tolist(), sampling))
        tail = torch.tensor([new], dtype=prompt_ids.dtype, device=prompt_ids.device)
        return torch.cat([prompt_ids, tail], dim=1)


def parameter_counts(config: DeepseekConfig) -> dict[str, int]:
    """Parameter counts from the config alone: total, active per token, and by role.

    ``quantizable`` are the linear layers that 4/8-bit formats compress (attention, dense MLP,
    shared and routed experts); ``kept`` stays in bf16 (embeddings, lm_head, norms, router).
    """
    h, v = config.hidden_size, config.vocab_size
    attn = h * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    norms = 2 * h
    dense_mlp = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    shared = expert * (config.n_shared_experts or 0)
    n_routed, top_k = config.n_routed_experts or 0, config.num_experts_per_tok or 0
    lm_head = 0 if config.tie_word_embeddings else v * h
    # Like the report (16.4B total, 2.8B activated), active counts the whole embedding table.
    counts = {"total": v * h + lm_head + h, "active": v * h + lm_head + h, "routed_experts": 0,
              "quantizable": 0, "kept": v * h + lm_head + h}
    for layer in range(config.num_hidden_layers):
        if config.is_moe_layer(layer):
            mlp_total, mlp_active, router = n_routed * expert + shared, top_k * expert + shared, n_routed * h
            counts["routed_experts"] += n_routed * expert
        else:
            mlp_total, mlp_active, router = dense_mlp, dense_mlp, 0
        counts["total"] += attn + norms + mlp_total + router
        counts["active"] += attn + norms + mlp_active + router
        counts["quantizable"] += attn + mlp_total
        counts["kept"] += norms + router
    return counts


# Bytes per quantized weight, scales included: NF4/FP4 with one fp32 absmax per 64 weights,
# LLM.int8 with one fp32 scale per row (negligible at these widths).
BYTES_PER_WEIGHT = {16: 2.0, 8: 1.0, 6: 0.75 + 2 / 64, 4: 0.5 + 4 / 64}  # 6: dsmoe's q6 (lm_head only)


def weight_bytes(config: DeepseekConfig, bits: int) -> int:
    """Bytes of all weights when the quantizable layers are stored at ``bits``."""
    counts = parameter_counts(config)
    return math.ceil(counts["quantizable"] * BYTES_PER_WEIGHT[bits] + counts["kept"] * 2)
