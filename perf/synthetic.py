"""Random checkpoints at DeepSeekMoE's real geometry, for speed and memory measurements.

A ``SyntheticCheckpoint`` answers the same questions as a checkpoint read from disk, so the
ordinary loader builds (and quantizes) the model from it tensor by tensor: 16B of random bf16
weights are never held at once. Each tensor's values depend only on its name and the seed, so
the model in memory and the one written with ``save_checkpoint`` hold identical weights, and
other tools can be run on exactly what dsmoe ran.

Random gates route almost evenly, the worst case for an expert cache. ``skew=S`` in the spec makes
the routing skewed, as a trained model's is: each MoE layer's gate row for the expert of rank r (a
seeded order per layer) is scaled by (r + 1) ** -S, and an expert whose scores spread wider reaches
the top-k more often (counted on a small model with 32 experts, top-4: the most chosen quarter of
the experts took about a third of the choices without skew, two thirds with ``skew=1``). A skewed
checkpoint is labelled so in its name and in its config (``dsmoe_synthetic_skew``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from dsmoe.errors import UsageError
from dsmoe.checkpoint.reader import INDEX_NAME
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.checkpoint.output_folder import rename_no_replace

# deepseek-ai/deepseek-moe-16b-base's config.json, less its token ids (ours has its own tokenizer).
GEOMETRIES: dict[str, dict[str, Any]] = {
    "16b": {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 4096,
        "model_type": "deepseek", "moe_intermediate_size": 1408, "moe_layer_freq": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax",
        "seq_aux": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 102400,
    },
}

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WEIGHT_STD = 0.02


SKEW_KEY = "dsmoe_synthetic_skew"
"""The config field a skewed synthetic checkpoint records its skew in (transformers ignores it)."""
GATE_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")


def parse_spec(spec: str) -> dict[str, Any]:
    """``16b``, ``16b:layers=8``, any integer config field overridden (``16b:layers=2,hidden_size=256``),
    and ``skew=S`` (a number >= 0) for a skewed router, recorded in the config as ``dsmoe_synthetic_skew``."""
    name, _, options = spec.partition(":")
    if name not in GEOMETRIES:
        raise UsageError(f"unknown synthetic geometry {name!r} (known: {', '.join(GEOMETRIES)})")
    raw = dict(GEOMETRIES[name])
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key == "skew":
            try:
                skew = float(value)
            except ValueError:
                skew = -1.0
            if not 0 <= skew < float("inf"):
                raise UsageError(f"bad synthetic option {option!r} (expected skew=S with S a number >= 0)")
            if skew:
                raw[SKEW_KEY] = skew
            continue
        key = "num_hidden_layers" if key == "layers" else key
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or not value.isdigit():
            raise UsageError(f"bad synthetic option {option!r} (expected layers=N, skew=S or an integer config field=N)")
        raw[key] = int(value)
    raw["bos_token_id"], raw["eos_token_id"] = 256, 257  # the ids of our byte-level tokenizer's specials
    return raw


class SyntheticCheckpoint:
    """The read interface of ``dsmoe.checkpoint.reader.Checkpoint``, with seeded random tensors."""

    def __init__(self, spec: str, seed: int = 0) -> None:
        self.raw_config = parse_spec(spec)
        self.config = DeepseekConfig.from_dict(self.raw_config, source=f"synthetic {spec}")
        self.path = Path(f"synthetic:{spec}")
        self.seed = seed
        self.skew: float = self.raw_config.get(SKEW_KEY, 0.0)
        with torch.device("meta"):
            model = DeepseekForCausalLM(self.config)
        self._shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return "BF16"

    def map(self, name: str) -> torch.Tensor:
        """As ``get``: made tensors have no file to map."""
        return self.get(name)

    def shard_of(self, name: str) -> Path:
        return self.path

    def nbytes(self, name: str) -> int:
        return 2 * torch.Size(self._shapes[name]).numel()

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._shapes)

    def get(self, name: str) -> torch.Tensor:
        """Norm weights are ones; everything else N(0, 0.02), seeded by name; gates scaled by ``skew``."""
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        weight = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=generator)
        if self.skew and GATE_NAME.fullmatch(name):
            # Which experts are favoured differs per layer: a permutation drawn after the weights.
            rank = torch.randperm(shape[0], generator=generator)
            scale = (rank + 1.0) ** -self.skew
            weight = (weight.float() * scale[:, None]).to(torch.bfloat16)
        return weight

    def tokenizer_files(self) -> list[Path]:
        return []

    def close(self) -> None:
        """Nothing is held open."""


# A few merges: tools that read the tokenizer (llama.cpp's converter) refuse a BPE with none.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("Ġ", "a")]


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE (256 bytes, bos 256, eos 257, a few merges) in the official files' layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet, key=lambda s: ord(s)))}
    vocab.update({BOS: 256, EOS: 257})
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 256)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 4096,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def save_checkpoint(
    checkpoint: SyntheticCheckpoint,
    dst: Path,
    shard_bytes: int = 2 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the weights in the official layout (bf16 shards, index, config, tokenizer).

    Written into a temporary folder beside ``dst`` and renamed at the end, so an interrupted
    run leaves nothing that looks like a checkpoint.
    """
    dst = Path(dst)
    if dst.exists():
        raise UsageError(f"{dst}: already exists")
    partial = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        names = checkpoint.tensor_names()
        groups: list[list[str]] = [[]]
        size = 0
        for name in names:
            if groups[-1] and size + checkpoint.nbytes(name) > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += checkpoint.nbytes(name)
        weight_map: dict[str, str] = {}
        total, done = checkpoint.total_bytes(), 0
        for i, group in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for name in group:
                tensors[name] = checkpoint.get(name)
                weight_map[name] = shard
                done += checkpoint.nbytes(name)
                if progress is not None:
                    progress(done, total)
            save_file(tensors, str(partial / shard), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (partial / "config.json").write_text(json.dumps(checkpoint.raw_config, indent=2))
        (partial / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": checkpoint.config.bos_token_id, "eos_token_id": checkpoint.config.eos_token_id}))
        write_byte_tokenizer(partial)
        try:
            rename_no_replace(partial, dst)
        except FileExistsError:
            raise UsageError(f"{dst}: appeared while writing; left as it is and the new weights discarded") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
