"""The DeepSeekMoE configuration, read from the official ``config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from dsmoe.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek",)


@dataclass
class DeepseekConfig:
    """The fields of ``config.json`` the runtime uses; unknown keys are kept in ``extra``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    model_type: str = "deepseek"
    quantization_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Mirror of the reference rule: MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq``."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, list):
            return list(self.eos_token_id)
        return [self.eos_token_id]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "DeepseekConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r} (dsmoe runs DeepSeekMoE: 'deepseek')"
            )
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = raw.get("num_attention_heads")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in raw:
                raise ConfigError(f"{source}: missing required key {key!r}")
        config = cls(**values, extra=extra)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> "DeepseekConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a checkpoint folder?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        """Every value's type and range, so a bad config is one ConfigError here, not a crash later."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "moe_intermediate_size", "moe_layer_freq")
        for key in positive:
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
        if not _is_int(self.first_k_dense_replace) or self.first_k_dense_replace < 0:
            raise ConfigError(f"{source}: first_k_dense_replace must be a non-negative integer, "
                              f"got {self.first_k_dense_replace!r}")
        for key in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 0):
                raise ConfigError(f"{source}: {key} must be an integer or null, got {value!r}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
        for key in ("attention_bias", "norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{source}: {key} must be true or false, got {getattr(self, key)!r}")
        for key in ("hidden_act", "scoring_func"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{source}: {key} must be a string, got {getattr(self, key)!r}")
        if self.bos_token_id is not None and (not _is_int(self.bos_token_id) or self.bos_token_id < 0):
            raise ConfigError(f"{source}: bos_token_id must be a token id or null, got {self.bos_token_id!r}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(_is_int(e) and e >= 0 for e in eos):
            raise ConfigError(f"{source}: eos_token_id must be a token id, a list of them, or null, "
                              f"got {self.eos_token_id!r}")
        for key in ("rope_scaling", "quantization_config"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be an object or null, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.n_routed_experts is not None:
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(f"{source}: num_experts_per_tok must be between 1 and n_routed_experts")
            if self.scoring_func != "softmax":
                raise ConfigError(f"{source}: scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "dynamic"):
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (linear or dynamic)")
            factor = self.rope_scaling.get("factor")
            if not _is_number(factor) or not math.isfinite(factor) or factor < 1:
                raise ConfigError(f"{source}: rope_scaling factor must be a number >= 1, got {factor!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        if data["quantization_config"] is None:
            data.pop("quantization_config")
        return {**extra, **data}


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
