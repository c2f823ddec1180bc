"""Convert a DeepSeekMoE checkpoint folder to a bitsandbytes-quantized one, tensor by tensor.

The output is what transformers saves for a bitsandbytes model (sharded safetensors, index,
config.json with ``quantization_config``), so it loads in dsmoe and in transformers. Memory stays
near one output shard: each source tensor is read from its memory map, quantized, and written out
with its shard. The folder appears only when complete: it is built beside DST and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch

from dsmoe.errors import CheckpointError, ConfigError, UsageError
from dsmoe.checkpoint.reader import INDEX_NAME, Checkpoint, one_thread_for_the_reader, open_checkpoint, read_ahead
from dsmoe.checkpoint.memory import ReleaseEvery
from dsmoe.checkpoint.output_folder import check_destination, clear_stale_partials, move_into_place
from dsmoe.checkpoint.writer import write_safetensors
from dsmoe.quant.linear import native_tensors, quantize_linear, quantized_tensors
from dsmoe.quant.spec import KERNEL_LAYOUT_KEY, QuantSpec, quantization_config, spec_for

DEFAULT_SHARD_BYTES = 2 * 1000**3

Progress = Callable[[int, int], None]
"""Called as ``progress(source_bytes_done, source_bytes_total)`` after each tensor."""


@dataclass(frozen=True)
class ConversionReport:
    dst: Path
    tensors: int
    quantized: int
    shards: int
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    """Largest resident set size sampled after each tensor and before each shard write."""
    removed_partials: tuple[Path, ...] = ()
    """``DST.partial-PID`` folders of earlier killed runs, removed before this one started."""


def expected_weight_names(checkpoint: Checkpoint) -> list[str]:
    """The weights a DeepSeekMoE checkpoint of this config must hold."""
    config = checkpoint.config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        names += [f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"]
        names += [f"{prefix}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if config.is_moe_layer(layer):
            mlps = [f"{prefix}.mlp.experts.{e}" for e in range(config.n_routed_experts or 0)]
            if config.n_shared_experts:
                mlps.append(f"{prefix}.mlp.shared_experts")
            names.append(f"{prefix}.mlp.gate.weight")
        else:
            mlps = [f"{prefix}.mlp"]
        names += [f"{m}.{p}.weight" for m in mlps for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def _open_source(src: Path) -> Checkpoint:
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint folder")
    try:
        checkpoint = open_checkpoint(src)
    except ConfigError as exc:
        raise CheckpointError(f"{src}: not a DeepSeekMoE checkpoint ({exc})") from None
    if checkpoint.config.quantization_config is not None:
        raise CheckpointError(f"{src}: already quantized; convert from the unquantized checkpoint")
    missing = [n for n in expected_weight_names(checkpoint) if n not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{src}: not a complete DeepSeekMoE checkpoint: {len(missing)} expected tensors are missing "
            f"(first: {missing[0]!r})"
        )
    return checkpoint


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise UsageError(f"{dst}: the output folder must not be inside the source checkpoint {src}")
    if dst_r in src_r.parents:
        raise UsageError(f"{dst}: the output folder must not contain the source checkpoint {src}")
    check_destination(dst, force)


class _ShardWriter:
    """Collects output tensors and writes a shard whenever the next tensor would overflow it."""

    def __init__(self, folder: Path, shard_bytes: int, sample_rss: Callable[[], None]) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.sample_rss = sample_rss
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        self.sample_rss()
        path = self.folder / f"shard-{len(self.files):05d}.tmp"
        write_safetensors(path, self.pending, {"format": "pt"})  # a full disk raises OSError
        for name in self.pending:
            self.weight_map[name] = len(self.files)
        self.files.append(path)
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Give shards their final names and write the index; returns the shard count."""
        self.flush()
        count = len(self.files)
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for path, name in zip(self.files, names):
            path.rename(self.folder / name)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {t: names[i] for t, i in sorted(self.weight_map.items())},
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return count


def quantize_checkpoint(
    src: Path,
    dst: Path,
    spec: QuantSpec,
    force: bool = False,
    progress: Progress | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compute_dtype: torch.dtype = torch.bfloat16,
    kernel_layout: bool = False,
) -> ConversionReport:
    """Write SRC quantized as ``spec`` to DST; on any failure or interrupt nothing is left at DST.

    ``compute_dtype`` only goes into config.json (``bnb_4bit_compute_dtype``), for transformers.
    ``kernel_layout`` stores 4-bit weights in dsmoe's kernel layout where this machine runs it
    (``native_tensors``), so that a load maps them instead of repacking: the quantized-checkpoint
    cache's form, which transformers cannot read (``dsmoe_kernel_layout`` in the config says so).
    """
    src, dst = Path(src), Path(dst)
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise UsageError(f"shard size must be positive, not {shard_bytes}")
    _check_paths(src, dst, force)
    checkpoint = _open_source(src)
    config = dict(checkpoint.raw_config)
    config["quantization_config"] = quantization_config(spec, compute_dtype)
    if kernel_layout:
        config["quantization_config"][KERNEL_LAYOUT_KEY] = True

    started = time.perf_counter()
    process = psutil.Process()
    peak = [process.memory_info().rss]

    def sample_rss() -> None:
        peak[0] = max(peak[0], process.memory_info().rss)

    names = checkpoint.tensor_names()
    total = checkpoint.total_bytes()
    done = quantized = 0
    stale = clear_stale_partials(dst)
    work = dst.parent / f"{dst.name}.partial-{os.getpid()}"
    try:
        work.mkdir(parents=True)
        writer = _ShardWriter(work, shard_bytes, sample_rss)
        release = ReleaseEvery()
        in_shard_order = sorted(names, key=lambda n: (checkpoint.shard_of(n).name, n))  # each shard front to back
        reads = read_ahead(checkpoint, [[name] for name in in_shard_order])
        with one_thread_for_the_reader():
            for name, tensors in zip(in_shard_order, reads):
                tensor = tensors[name]
                layer_spec = spec_for(name, spec)
                if layer_spec is not None:
                    if tensor.dim() != 2 or not tensor.is_floating_point():
                        raise CheckpointError(
                            f"{checkpoint.shard_of(name)}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                            "expected a 2-D float weight"
                        )
                    # fp32 compute keeps the standard layout: no CPU repack just to unpack it again;
                    # bf16 compute packs into the kernels' layout where this machine runs it.
                    prefix = name[: -len(".weight")]
                    if kernel_layout:
                        writer.add(native_tensors(quantize_linear(tensor, layer_spec, torch.bfloat16), prefix))
                    else:
                        writer.add(quantized_tensors(quantize_linear(tensor, layer_spec, torch.float32), prefix))
                    quantized += 1
                else:
                    writer.add({name: tensor})  # read for this alone: no copy needed
                done += checkpoint.nbytes(name)
                release.processed(checkpoint.nbytes(name))
                sample_rss()
                if progress is not None:
                    progress(done, total)
        shards = writer.finish()
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for path in checkpoint.tokenizer_files():
            shutil.copy2(path, work / path.name)
        checkpoint.close()
        move_into_place(work, dst, replace=force)
    except OSError as exc:  # a full disk, a read-only or vanished destination
        checkpoint.close()
        shutil.rmtree(work, ignore_errors=True)
        raise UsageError(f"{dst}: cannot write the output ({exc.strerror or exc}); nothing was left there") from None
    except BaseException:
        checkpoint.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ConversionReport(
        dst=dst, tensors=len(names), quantized=quantized, shards=shards, bytes_in=total,
        bytes_out=writer.total_bytes, seconds=time.perf_counter() - started, peak_rss_bytes=peak[0],
        removed_partials=tuple(stale.removed),
    )
