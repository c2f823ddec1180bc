"""``dsmoe eval --engine vllm``: the same tasks, local data, shots and report table through lm-eval's
``vllm`` model, for suites that do not fit one machine (tensor and data parallel, GPUs or Ray).

vLLM is an optional extra (``pip install 'dsmoe[vllm]'``) imported only here, only for that flag.
It runs DeepSeekMoE's checkpoint with its own kernels and weights: dsmoe's quantization, expert
store and context sharing do not apply, so those flags are refused rather than silently ignored.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from dsmoe.errors import EvalError

if TYPE_CHECKING:
    from lm_eval.api.model import LM

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def vllm_model_args(
    model: str,
    dtype: str = "bf16",
    tensor_parallel: int = 1,
    data_parallel: int = 1,
    max_length: int | None = None,
    gpu_memory_utilization: float | None = None,
) -> dict[str, Any]:
    """lm-eval's ``vllm`` model arguments for this checkpoint (batch size "auto": vLLM schedules)."""
    if dtype not in VLLM_DTYPES:
        raise EvalError(f"--dtype {dtype}: vLLM takes {', '.join(VLLM_DTYPES)}")
    for name, value in (("--tensor-parallel", tensor_parallel), ("--data-parallel", data_parallel)):
        if value < 1:
            raise EvalError(f"{name} must be at least 1, got {value}")
    args: dict[str, Any] = {
        "pretrained": model,
        "dtype": VLLM_DTYPES[dtype],
        "tensor_parallel_size": tensor_parallel,
        "data_parallel_size": data_parallel,
        "batch_size": "auto",
        "trust_remote_code": False,  # vLLM has DeepseekForCausalLM itself: no remote code, ever
    }
    if max_length is not None:
        args["max_model_len"] = max_length
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    return args


def require_vllm() -> None:
    """One clear line when vLLM is not installed, before any task data is read."""
    if find_spec("vllm") is None:
        raise EvalError("--engine vllm needs vLLM, which is not installed: pip install vllm "
                        "on a machine with GPUs (see the README's 'Evaluating beyond one machine')")


def vllm_lm(args: dict[str, Any]) -> LM:
    """lm-eval's vLLM model, built from ``vllm_model_args``."""
    require_vllm()
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(**args)
