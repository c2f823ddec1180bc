"""Quantization: bitsandbytes NF4/FP4 and LLM.int8 weights, dsmoe's 6-bit lm_head, their checkpoint layout, and conversion."""

import logging

# bitsandbytes warns on import that it cannot fetch an optional CPU kernel from the Hugging Face hub;
# dsmoe never uses that kernel (quant.kernels picks its own), so the warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from dsmoe.quant.linear import (
    Bf16Linear,
    Linear4bit,
    Linear6bit,
    Linear8bit,
    QuantLinear,
    float_linear,
    linear_from_tensors,
    native_bf16_linears,
    quantize_linear,
    quantize_model,
    quantized_tensors,
)
from dsmoe.quant.spec import QuantSpec, quantization_config, should_quantize, spec_for, spec_from_config

__all__ = [
    "Bf16Linear",
    "Linear4bit",
    "Linear6bit",
    "Linear8bit",
    "QuantLinear",
    "QuantSpec",
    "float_linear",
    "linear_from_tensors",
    "native_bf16_linears",
    "quantization_config",
    "quantize_linear",
    "quantize_model",
    "quantized_tensors",
    "should_quantize",
    "spec_for",
    "spec_from_config",
]
