"""Ways to break a quantized model on purpose, so quality tests show their bounds can fail."""

from __future__ import annotations

from torch import nn

from dsmoe.quant import Linear4bit


def swap_nibbles(model: nn.Module) -> int:
    """Read every 4-bit weight with its two codes per byte swapped; returns how many layers."""
    swapped = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            assert module.layout == "standard"  # fp32 compute keeps bitsandbytes' own layout
            module.weight = (module.weight << 4) | (module.weight >> 4)
            swapped += 1
    return swapped
