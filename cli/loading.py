"""Loading a model from the CLI with progress on stderr (a bar on a terminal, lines otherwise)."""

from __future__ import annotations

from dsmoe.cli.common import default_model, progress_report
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.loader import load
from dsmoe.model.tokenizer import Tokenizer
from dsmoe.offload import OffloadOptions, load_offloaded


def load_with_progress(
    model: str | None, dtype: str, bits: int | None, quant_type: str | None, offload: OffloadOptions | None = None,
    double_quant: bool = False, quantize_lm_head: bool = False,
) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    """Load with progress; with ``offload`` the routed experts go to an expert store (``store_of``)."""
    path = model or default_model()
    action = f"loading {path}" + (f" and quantizing to {bits}-bit" if bits in (4, 8) else "")
    with progress_report(action, unit=" tensors") as report:
        if offload is not None:
            loaded, tokenizer, _ = load_offloaded(path, offload, dtype=dtype, bits=bits, quant_type=quant_type,
                                                  progress=report)
            return loaded, tokenizer
        return load(path, dtype=dtype, bits=bits, quant_type=quant_type, double_quant=double_quant,
                    quantize_lm_head=quantize_lm_head, progress=report)
