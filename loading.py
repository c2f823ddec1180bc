"""How a checkpoint becomes a running model: one ``LoadOptions``, checked once, and one ``load``.

Every command that loads a model takes the same flags (``cli.load_flags``) and lm-eval's
``model_args`` name the same settings (``LoadOptions.from_model_args``); both end here, so a bad
value reads the same whichever way it came, and the choice between a model held in memory and one
whose routed experts live in an expert store (``dsmoe.offload``) is made in ``load`` alone.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from dsmoe.demo import DEMO_MODEL_PATH
from dsmoe.errors import CheckpointError, EvalError, UsageError
from dsmoe.checkpoint.memory import keep_freed_memory_for_reuse
from dsmoe.checkpoint.reader import Checkpoint, open_checkpoint
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.loader import LoadProgress, load_model, parse_dtype
from dsmoe.model.tokenizer import Tokenizer, load_tokenizer
from dsmoe.offload import OffloadOptions, load_offloaded
from dsmoe.offload.plan import GB, Budgets, Resources, fits_in_ram
from dsmoe.quant.cache import CacheOutcome, discard, through_cache
from dsmoe.quant.spec import FOUR_BIT_TYPES, LM_HEAD_FORMATS, QuantSpec, bits_error, lm_head_format, quant_type_error

Spelling = Literal["flag", "model_arg"]

_FLAGS = {"bits": "--bits", "quant_type": "--quant-type", "gpu_mem": "--gpu-mem", "max_ram": "--max-ram",
          "expert_cache": "--expert-cache", "policy": "--policy", "dtype": "--dtype", "double_quant": "--double-quant",
          "quantize_lm_head": "--quantize-lm-head", "lm_head": "--lm-head", "no_cache": "--no-cache"}


@dataclass(frozen=True)
class LoadOptions:
    """Everything that decides how a checkpoint is loaded: precision, quantization, expert placement.

    ``gpu_mem`` and ``max_ram`` are GB. A budget (or ``offload``) puts the routed experts in an
    expert store; without one the whole model is held in memory. Values are checked when the
    options are made, with the names the user typed them under (``spelling``).
    """

    dtype: str | torch.dtype = "bf16"
    bits: int | None = None
    quant_type: str | None = None
    double_quant: bool = False
    quantize_lm_head: bool | None = None
    """lm_head quantized; None (the default): in every 4- or 8-bit run (``lm_head_format``)."""
    lm_head: str | None = None
    """lm_head's format, int8 or q6 (implies quantizing it); None: q6 beside 4-bit weights, int8 otherwise."""
    device: str | None = None
    expert_cache: int | None = None
    gpu_mem: float | None = None
    max_ram: float | None = None
    policy: str = "lru"
    prefetch: bool = True
    offload: bool = False
    """An expert store even with no budget (for its statistics)."""
    no_cache: bool = False
    """Quantize while loading every time: neither read nor write the quantized-checkpoint cache."""
    spelling: Spelling = field(default="flag", compare=False, repr=False)

    def __post_init__(self) -> None:
        name = self._name
        if self.bits is not None and self.bits not in (4, 8, 16):
            raise UsageError(bits_error(name("bits"), self.bits, allow_16=True))
        if self.quant_type is not None:
            kind = self.quant_type.lower()
            if not (kind == "int8" and self.bits == 8):  # 8-bit's one format, by the name QuantSpec gives it
                if kind not in FOUR_BIT_TYPES:
                    raise UsageError(quant_type_error(name("quant_type"), self.quant_type))
                if self.bits != 4:
                    raise UsageError(f"{name('quant_type')} needs {name('bits')} 4")
            object.__setattr__(self, "quant_type", kind)
        if self.double_quant and self.bits != 4:
            raise UsageError(f"{name('double_quant')} needs {name('bits')} 4")
        if self.quantize_lm_head and self.bits == 16:
            raise UsageError(f"{name('quantize_lm_head')} needs {name('bits')} 4 or 8 (or a quantized checkpoint)")
        if self.lm_head is not None:
            object.__setattr__(self, "lm_head", self.lm_head.lower())
            if self.lm_head not in LM_HEAD_FORMATS:
                raise UsageError(f"{name('lm_head')} must be one of {', '.join(LM_HEAD_FORMATS)}, got {self.lm_head!r}")
            if self.quantize_lm_head is False or self.bits == 16:
                raise UsageError(f"{name('lm_head')} quantizes lm_head: it goes with neither --no-quantize-lm-head "
                                 f"nor {name('bits')} 16")
        parse_dtype(self.dtype)
        for budget in ("gpu_mem", "max_ram"):
            value = getattr(self, budget)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{name(budget)} must be a positive number of GB, got {value}")
        if self.expert_cache is not None and self.expert_cache < 1:
            raise UsageError(f"{name('expert_cache')} must be at least 1 slot per layer, got {self.expert_cache}")
        object.__setattr__(self, "policy", self.policy.lower())
        self.store_options()  # the policy's check, whether or not a store is made

    def _name(self, setting: str) -> str:
        return _FLAGS.get(setting, setting) if self.spelling == "flag" else setting

    @property
    def load_bits(self) -> int | None:
        """The bits to quantize to while loading: None keeps the stored floats (16 means that too)."""
        return None if self.bits == 16 else self.bits

    def quant_spec(self) -> QuantSpec | None:
        """The format to quantize into (NF4 unless told otherwise at 4 bits), or None to keep floats."""
        if self.load_bits is None:
            return None
        head = self.lm_head_format()
        return QuantSpec(bits=self.load_bits, quant_type=self.quant_type or ("nf4" if self.load_bits == 4 else "int8"),
                         double_quant=self.double_quant, quantize_lm_head=head is not None, lm_head=head or "int8")

    def lm_head_format(self, stored_bits: int | None = None) -> str | None:
        """lm_head's format in this run (None: floats), for a float checkpoint or one stored with
        ``stored_bits`` (whose lm_head, when stored quantized, is read as it is)."""
        return lm_head_format(self.quantize_lm_head, self.lm_head, self.load_bits or stored_bits)

    @property
    def offloaded(self) -> bool:
        return self.offload or any(v is not None for v in (self.expert_cache, self.gpu_mem, self.max_ram))

    def offload_options(self) -> OffloadOptions | None:
        """The expert store's options when these ask for one, else None."""
        return self.store_options() if self.offloaded else None

    def store_options(self) -> OffloadOptions:
        """The expert store's options, whether or not these ask for a store (``dsmoe info --plan``)."""
        budgets = Budgets(gpu_mem=self.gpu_mem * GB if self.gpu_mem is not None else None,
                          max_ram=self.max_ram * GB if self.max_ram is not None else None,
                          expert_cache=self.expert_cache)
        return OffloadOptions(budgets, policy=self.policy, prefetch=self.prefetch, device=self.device,
                              disk_cache=not self.no_cache)

    def record(self) -> dict[str, Any]:
        """The settings as JSON values, for results files and cache keys."""
        # no_cache decides where the weights come from, not a byte of them.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("spelling", "no_cache")}
        return {**values, "dtype": str(self.dtype).removeprefix("torch.")}

    def replace(self, **changes: Any) -> LoadOptions:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_model_args(cls, args: dict[str, Any]) -> LoadOptions:
        """lm-eval's ``model_args`` (values may come as text: ``bits=4,max_ram=1.5,prefetch=false``).

        Unknown names and bad values raise EvalError, named as the user wrote them.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"spelling"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise EvalError(f"unknown dsmoe model argument(s): {', '.join(unknown)} "
                            f"(loading: {', '.join(sorted(known))})")
        converters: dict[str, Callable[[Any], Any]] = {"bits": int, "expert_cache": int, "gpu_mem": float, "max_ram": float,
                      "double_quant": _flag, "quantize_lm_head": _flag, "prefetch": _flag, "offload": _flag,
                      "no_cache": _flag}
        values: dict[str, Any] = {}
        for name, value in args.items():
            if value in (None, "", "none", "None"):
                continue
            convert = converters.get(name)
            if convert is None:
                values[name] = value
                continue
            try:
                values[name] = convert(value)
            except (TypeError, ValueError):
                raise EvalError(f"{name} must be {_KINDS[convert]}, got {value!r}") from None
        try:
            return cls(**values, spelling="model_arg")
        except UsageError as exc:
            raise EvalError(str(exc)) from None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(value)
    return text in _TRUE


_KINDS: dict[Any, str] = {int: "an integer", float: "a number", _flag: "true or false"}


def load(
    name_or_path: str | os.PathLike[str] | Checkpoint | None = None,
    options: LoadOptions | None = None,
    *,
    progress: LoadProgress | None = None,
    resources: Resources | None = None,
    **settings: Any,
) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    """Load a DeepSeekMoE checkpoint (local folder, Hugging Face repo id, or an opened checkpoint)
    and its tokenizer, as ``options`` (or the same settings as keywords: ``load(path, bits=4)``) say.

    ``bits`` 4 or 8 quantizes the linear layers while loading; a checkpoint that is already
    quantized is read as it is. With an expert budget the routed experts go to an expert store
    (``dsmoe.offload.store_of(model)``), read from disk when RAM cannot hold them. With no budget,
    a model larger than the available memory (MemAvailable, or the memory cgroup's room when that
    is less; ``resources`` stands in for the measurement) gets such a store too, its experts on
    disk, rather than the OOM killer: ``store_of(model).plan.fitted`` is the line saying so. With no name,
    the demo model bundled with dsmoe, so a first try needs no download.

    Quantizing a float checkpoint goes through the quantized-checkpoint cache (``dsmoe.quant.cache``)
    unless ``no_cache``: the first load writes the quantized copy, later ones read it. What was done
    is ``model.quant_cache`` (a ``CacheOutcome``: the entry's path, read / written / not written
    and why), None where nothing was quantized.
    """
    options = options.replace(**settings) if options is not None and settings else options or LoadOptions(**settings)
    if name_or_path is None:
        name_or_path = DEMO_MODEL_PATH
    checkpoint = open_checkpoint(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else name_or_path
    source, cache = checkpoint, None
    spec = options.quant_spec()
    # A folder on disk only: a synthetic checkpoint (dsmoe bench --synthetic) has no files to key on.
    if (spec is not None and not options.no_cache and isinstance(checkpoint, Checkpoint)
            and checkpoint.config.quantization_config is None):
        cache = through_cache(checkpoint, spec)
        if cache.usable:
            try:
                model, tokenizer = _load(open_checkpoint(cache.path), options.replace(**_STORED), progress, resources,
                                         tokenizer_from=source.path)
            except CheckpointError as exc:  # damaged past what the manifest shows: quantize from the source
                discard(cache.path)
                cache = CacheOutcome(cache.path, "not_written", f"the cached copy was unreadable ({exc}); removed")
            else:
                model.quant_cache = cache
                return _ready_to_run(model), tokenizer
    model, tokenizer = _load(checkpoint, options, progress, resources, tokenizer_from=source.path)
    model.quant_cache = cache
    return _ready_to_run(model), tokenizer


def _ready_to_run(model: DeepseekForCausalLM) -> DeepseekForCausalLM:
    """The process turns from loading a model to running it, where two of its defaults cost time
    (docs/PERFORMANCE.md, the 8-layer 16B geometry): Python's collector scanned the ~220k objects
    the imports and the load leave behind in the first pass's full collection, ~100 ms of a
    prefill, and would in every later one; ``gc.freeze`` takes them out of all scans (a load and
    its model leave ~20 objects in reference cycles, which then stay). And glibc handed each pass's
    freed activations back to the system, so every pass faulted fresh pages in
    (``keep_freed_memory_for_reuse``)."""
    gc.freeze()
    keep_freed_memory_for_reuse()
    return model


def _fits(checkpoint: Checkpoint, options: LoadOptions, resources: Resources | None) -> bool:
    """Whether loading the whole model into RAM leaves the workspace free (a GPU load is not RAM's).

    Only a checkpoint on disk with routed experts can do otherwise: a synthetic one has no
    files to read experts back from, a dense one nothing to offload.
    """
    config = checkpoint.config
    if (options.device not in (None, "cpu") or not isinstance(checkpoint, Checkpoint)
            or not config.n_routed_experts or not config.moe_layers):
        return True
    resources = resources or Resources.measure(torch.device("cpu"))
    return fits_in_ram(config, resources, parse_dtype(options.dtype), options.load_bits)


_STORED = {"bits": None, "quant_type": None, "double_quant": False, "quantize_lm_head": False, "lm_head": None}
"""The quantization settings of a load from a stored quantized checkpoint: none, it says its own."""


def _load(checkpoint: Checkpoint, options: LoadOptions, progress: LoadProgress | None, resources: Resources | None,
          tokenizer_from: Path) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    offload = options.offload_options()
    if offload is None and not _fits(checkpoint, options, resources):
        # Loading it whole would end with the OOM killer: plan from the free memory instead
        # (the plan's ``fitted`` line says so), on the device the in-memory load would use.
        offload = dataclasses.replace(options.store_options(), device=options.device or "cpu")
    if offload is not None:
        model, tokenizer, _ = load_offloaded(checkpoint, offload, progress=progress, resources=resources,
                                             dtype=options.dtype, bits=options.load_bits, quant_type=options.quant_type,
                                             double_quant=options.double_quant,
                                             quantize_lm_head=options.quantize_lm_head, lm_head=options.lm_head)
        return model, tokenizer
    tokenizer = load_tokenizer(tokenizer_from, checkpoint.config.vocab_size)  # its mistakes before the weights' time
    model = load_model(checkpoint, dtype=options.dtype, bits=options.load_bits, quant_type=options.quant_type,
                       double_quant=options.double_quant, quantize_lm_head=options.quantize_lm_head, lm_head=options.lm_head,
                       device=options.device or "cpu", progress=progress)
    return model, tokenizer
