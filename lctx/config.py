"""Model configuration: a frozen, hashable view of a Llama-family HF config.json.

`ModelConfig` is static (it is a jit static argument), so every field is an
immutable Python value. Shape letters used across lctx:
B batch, T query length, S key length / cache capacity, D d_model, F d_ff,
N query heads, K kv heads, G = N / K, H head dim, L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling; `rope_type` is one of ROPE_TYPES."""

  rope_type: str = "default"
  factor: float = 1.0
  # llama3 only.
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama/Yi/Mistral-style decoder plus its dtypes."""

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"  # storage dtype of the weights
  dtype: str = "float32"  # compute dtype of activations and the KV cache
  name: str = "custom"

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
    for field in ("rms_norm_eps", "rope_theta"):
      if not getattr(self, field) > 0:
        raise ValueError(f"ModelConfig.{field} must be > 0, got {getattr(self, field)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
          f"({self.num_kv_heads}); allowed num_kv_heads: {_divisors(self.num_heads)}")
    if self.head_dim * self.num_heads != self.hidden_size:
      raise ValueError(
          f"ModelConfig.head_dim ({self.head_dim}) x num_heads ({self.num_heads}) = "
          f"{self.head_dim * self.num_heads} does not match hidden_size ({self.hidden_size})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_scaling.rope_type not in ROPE_TYPES:
      raise ValueError(f"ModelConfig.rope_scaling.rope_type {self.rope_scaling.rope_type!r} "
                       f"is not supported; allowed: {ROPE_TYPES}")
    if not self.rope_scaling.factor > 0:
      raise ValueError(f"ModelConfig.rope_scaling.factor must be > 0, got {self.rope_scaling.factor}")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"ModelConfig.{field} {getattr(self, field)!r} not allowed; allowed: {DTYPES}")

  # ---- derived quantities -------------------------------------------------

  @property
  def group_size(self) -> int:
    """G: query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  @property
  def params_per_layer(self) -> int:
    D, F, N, K, H = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    return 2 * D + D * N * H + 2 * D * K * H + N * H * D + 3 * D * F

  @property
  def num_params(self) -> int:
    """Exact parameter count: embeddings, L layers, final norm, untied head."""
    embed = self.vocab_size * self.hidden_size
    head = 0 if self.tie_word_embeddings else embed
    return embed + head + self.num_layers * self.params_per_layer + self.hidden_size

  def kv_bytes_per_token(self, dtype: str | None = None) -> int:
    """Bytes of K and V per token over all layers: 2 * L * K * H * itemsize."""
    itemsize = np.dtype(_np_dtype(dtype or self.dtype)).itemsize
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

  def param_bytes(self, dtype: str | None = None) -> int:
    return self.num_params * np.dtype(_np_dtype(dtype or self.param_dtype)).itemsize

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- constructors -------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], name: str = "custom", **overrides) -> "ModelConfig":
    """Builds a config from the fields of a Hugging Face Llama-family config.json."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"config is missing required field(s) {missing}")
    for field in ("attention_bias", "mlp_bias"):
      if hf.get(field):
        raise ValueError(f"config field {field}=true is not supported (Llama family without "
                         f"biases); allowed: false")
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
      raise ValueError(f"config field sliding_window={hf['sliding_window']} is not supported; "
                       f"allowed: null (full causal attention)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config field hidden_act={act!r} is not supported; allowed: 'silu'")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is None:
      if hf["hidden_size"] % num_heads:
        raise ValueError(f"hidden_size ({hf['hidden_size']}) is not divisible by "
                         f"num_attention_heads ({num_heads}) and head_dim is not given")
      head_dim = hf["hidden_size"] // num_heads
    rope_theta, rope_scaling = _parse_rope(hf)
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        name=name,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_hf_config(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    """Reads a config.json (or a checkpoint directory holding one)."""
    path = Path(path)
    if path.is_dir():
      path = path / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
      hf = json.load(f)
    name = overrides.pop("name", path.parent.name if path.name == "config.json" else path.stem)
    return cls.from_hf_dict(hf, name=name, **overrides)

  @classmethod
  def from_preset(cls, name: str, **overrides) -> "ModelConfig":
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
      raise ValueError(f"unknown model preset {name!r}; allowed: {list_presets()}")
    return cls.from_hf_config(path, name=name, **overrides)

  @classmethod
  def resolve(cls, name_or_path: str, **overrides) -> "ModelConfig":
    """A preset name, a config.json path, or a checkpoint directory."""
    if name_or_path in list_presets():
      return cls.from_preset(name_or_path, **overrides)
    if os.path.exists(name_or_path):
      return cls.from_hf_config(name_or_path, **overrides)
    raise ValueError(f"model {name_or_path!r} is neither a preset nor a path; "
                     f"presets: {list_presets()}")


def list_presets() -> list[str]:
  return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
  """Reads RoPE settings from the classic layout (rope_theta + rope_scaling) or
  the `rope_parameters` layout written by recent transformers versions."""
  params = hf.get("rope_parameters")
  if params is not None:
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; allowed: {ROPE_TYPES}")
  kwargs: dict[str, Any] = {"rope_type": rope_type}
  if rope_type != "default":
    if "factor" not in scaling:
      raise ValueError(f"rope scaling type {rope_type!r} needs a 'factor'")
    kwargs["factor"] = float(scaling["factor"])
  if rope_type == "llama3":
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if key not in scaling:
        raise ValueError(f"rope scaling type 'llama3' needs {key!r}")
      kwargs[key] = type(getattr(RopeScaling(), key))(scaling[key])
  return float(theta), RopeScaling(**kwargs)


def _np_dtype(name: str):
  import ml_dtypes  # numpy has no bfloat16 of its own
  if name == "bfloat16":
    return ml_dtypes.bfloat16
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} not allowed; allowed: {DTYPES}")
  return np.dtype(name)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]
