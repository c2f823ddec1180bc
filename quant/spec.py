"""What to quantize and how: the format choice, the per-tensor policy, and config.json's block.

The ``quantization_config`` block is the one transformers writes for bitsandbytes checkpoints, so
a folder converted here loads in transformers and a transformers-saved folder loads here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from dsmoe.errors import CheckpointError, UsageError

FOUR_BIT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Checkpoint weight names (``model.layers.3.mlp.experts.7.up_proj.weight``) of the linears that are
# quantized by default: attention projections and every MLP (dense, shared and routed experts).
_QUANTIZED = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.((experts\.\d+|shared_experts)\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
LM_HEAD = "lm_head.weight"


LM_HEAD_FORMATS = ("int8", "q6")
"""lm_head's quantized formats: LLM.int8 rows, or dsmoe's 6-bit blocks (quant/q6.py)."""


def lm_head_quantized(requested: bool | None, quantized_run: bool) -> bool:
    """Whether lm_head runs quantized: as ``--quantize-lm-head`` / ``--no-quantize-lm-head`` say,
    and by default in every 4- or 8-bit run (a stored checkpoint's float lm_head too). In floats it
    is the slowest matrix of a decode step (one row through 10944 x 2048 took 30 ms with PyTorch's
    bf16 GEMV against 7 ms for the int8 kernel on AVX2) (docs/QUANTIZATION.md)."""
    return quantized_run if requested is None else requested


def lm_head_format(requested: bool | None, fmt: str | None, body_bits: int | None) -> str | None:
    """The format lm_head runs in (None: floats) for a run whose other weights have ``body_bits``
    (4, 8, or None for a float run). ``fmt`` is ``--lm-head``, which implies quantizing it. The
    default is q6 beside a 4-bit body (22% fewer bytes than int8, 4-5% faster decode steps, for
    +3% of nf4's KLD: docs/QUANTIZATION.md, docs/PERFORMANCE.md) and int8 beside an 8-bit one
    (where q6 would add 17% to its KLD) or asked for alone."""
    if fmt is not None and fmt not in LM_HEAD_FORMATS:
        raise UsageError(f"the lm_head format must be one of {', '.join(LM_HEAD_FORMATS)}, got {fmt!r}")
    if not lm_head_quantized(requested, body_bits is not None or fmt is not None):
        return None
    return fmt or ("q6" if body_bits == 4 else "int8")


def bits_error(name: str, value: object, allow_16: bool) -> str:
    """The one wording for a bits value outside 4 and 8 (16, where allowed, means no quantization)."""
    return f"{name} must be 4 or 8{' (or 16: no quantization)' if allow_16 else ''}, got {value}"


def quant_type_error(name: str, value: object) -> str:
    """The one wording for a 4-bit format that is neither NF4 nor FP4."""
    return f"{name} must be nf4 or fp4, got {value!r}"


@dataclass(frozen=True)
class QuantSpec:
    """A weight format: 4-bit ``nf4``/``fp4`` (blockwise absmax) or 8-bit ``int8`` (LLM.int8 rows);
    6-bit ``q6`` (dsmoe's, quant/q6.py) is lm_head's alone.

    ``quantize_lm_head`` stores lm_head in ``lm_head`` (int8 or q6) whatever ``bits`` is: 4-bit
    output logits are visibly worse, 6- and 8-bit ones are not, and lm_head is one of the largest
    matrices.
    """

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    quantize_lm_head: bool = False
    lm_head: str = "int8"

    def __post_init__(self) -> None:
        if self.bits == 4:
            if self.quant_type not in FOUR_BIT_TYPES:
                raise UsageError(quant_type_error("4-bit quant_type", self.quant_type))
            if self.blocksize not in BLOCKSIZES:
                raise UsageError(f"4-bit blocksize must be one of {list(BLOCKSIZES)}, not {self.blocksize!r}")
        elif self.bits == 6:
            if self.quant_type != "q6" or self.double_quant:
                raise UsageError(f"6-bit is dsmoe's q6 alone, not {self.name!r}")
        elif self.bits == 8:
            if self.quant_type != "int8":
                raise UsageError(f"8-bit quant_type must be int8, not {self.quant_type!r}")
            if self.double_quant:
                raise UsageError("double quantization applies to 4-bit formats only")
        else:
            raise UsageError(bits_error("bits", self.bits, allow_16=False))
        if self.lm_head not in LM_HEAD_FORMATS:
            raise UsageError(f"lm_head format must be one of {', '.join(LM_HEAD_FORMATS)}, not {self.lm_head!r}")

    @property
    def name(self) -> str:
        return f"{self.quant_type}{'-dq' if self.double_quant else ''}"


INT8 = QuantSpec(bits=8, quant_type="int8")
Q6 = QuantSpec(bits=6, quant_type="q6")
LM_HEAD_SPECS = {"int8": INT8, "q6": Q6}


def should_quantize(name: str, spec: QuantSpec) -> bool:
    """Whether the checkpoint weight ``name`` is stored quantized under ``spec``.

    Embeddings, norms and the router gate (``mlp.gate.weight``, whose top-k choice flips on small
    errors) stay in floats; lm_head only with ``spec.quantize_lm_head``.
    """
    if name == LM_HEAD:
        return spec.quantize_lm_head
    return _QUANTIZED.match(name) is not None


def spec_for(name: str, spec: QuantSpec) -> QuantSpec | None:
    """The format ``name`` is stored in under ``spec``, or None to keep it in floats."""
    if not should_quantize(name, spec):
        return None
    return LM_HEAD_SPECS[spec.lm_head] if name == LM_HEAD else spec


def quantization_config(spec: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json's ``quantization_config`` for ``spec``, with the keys transformers writes.

    ``llm_int8_skip_modules`` lists only ``lm_head``: older transformers releases skip every module
    whose dotted name merely *contains* an entry, so ``"gate"`` would also skip each ``gate_proj``.
    The router gate needs no entry: it is not an ``nn.Linear`` in DeepSeekMoE's modeling code.
    """
    dtype_name = next((k for k, v in COMPUTE_DTYPES.items() if v == compute_dtype), None)
    if dtype_name is None:
        raise UsageError(f"compute dtype must be bf16, fp16 or fp32, not {compute_dtype}")
    four = spec.bits == 4
    config: dict[str, Any] = {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "bnb_4bit_quant_type": spec.quant_type if four else "fp4",
        "bnb_4bit_use_double_quant": spec.double_quant,
        "bnb_4bit_compute_dtype": dtype_name,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_skip_modules": [] if spec.quantize_lm_head else ["lm_head"],
    }
    if spec.quantize_lm_head and spec.lm_head == "q6":
        # dsmoe's own format, which transformers cannot read (nor an int8 head beside 4-bit weights).
        config["dsmoe_lm_head"] = "q6"
    elif four and spec.quantize_lm_head:
        # Not expressible in transformers' config (one format per model): our own key.
        config["dsmoe_lm_head_int8"] = True
    return config


KERNEL_LAYOUT_KEY = "dsmoe_kernel_layout"
"""In ``quantization_config``: 4-bit weights may be stored in dsmoe's kernel layout, each beside its
``X.weight.native_scales`` (docs/QUANTIZATION.md); transformers cannot read such a checkpoint."""


def spec_from_config(config: dict[str, Any]) -> QuantSpec:
    """The spec a stored ``quantization_config`` describes; CheckpointError if dsmoe cannot run it."""
    method = config.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(f"unsupported quantization method {method!r} (dsmoe reads bitsandbytes 4/8-bit)")
    four = bool(config.get("load_in_4bit", config.get("_load_in_4bit", False)))
    eight = bool(config.get("load_in_8bit", config.get("_load_in_8bit", False)))
    if four == eight:
        raise CheckpointError("quantization_config must set exactly one of load_in_4bit and load_in_8bit")
    if config.get("llm_int8_has_fp16_weight"):
        raise CheckpointError("quantization_config: llm_int8_has_fp16_weight checkpoints are not supported")
    storage = config.get("bnb_4bit_quant_storage", "uint8")
    if four and storage != "uint8":
        raise CheckpointError(f"quantization_config: bnb_4bit_quant_storage {storage!r} is not supported (uint8)")
    skip = config.get("llm_int8_skip_modules")
    # None means transformers' default, which keeps lm_head in floats.
    head_quantized = skip is not None and "lm_head" not in skip
    head = config.get("dsmoe_lm_head", "int8")
    if head not in LM_HEAD_FORMATS:
        raise CheckpointError(f"quantization_config: dsmoe_lm_head {head!r} is not one of {', '.join(LM_HEAD_FORMATS)}")
    head_quantized = head_quantized or "dsmoe_lm_head" in config
    try:
        if four:
            return QuantSpec(
                bits=4,
                quant_type=str(config.get("bnb_4bit_quant_type", "nf4")),
                double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
                quantize_lm_head=head_quantized or bool(config.get("dsmoe_lm_head_int8", False)),
                lm_head=head,
            )
        return replace(INT8, quantize_lm_head=head_quantized, lm_head=head)
    except UsageError as exc:
        raise CheckpointError(f"unsupported quantization_config: {exc}") from None
