"""Model configuration: a frozen, hashable view of a Llama-family HF config.json.

`ModelConfig` is static (it is a jit static argument), so every field is an
immutable Python value. Shape letters used across lctx:
B batch, T query length, S key length / cache capacity, D d_model, F d_ff,
N query heads, K kv heads, G = N / K, H head dim, L layers, V vocab.

`from_hf_dict` accepts exactly the architectures lctx models (MODEL_TYPES) and
refuses, naming the key, every config key whose value would change the
computation in a way lctx does not model (mixture of experts, partial RoPE,
LayerNorm, logit or residual scaling, sliding windows, ...). A field that is
present must hold a valid value; only an absent one takes transformers'
default for that model type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")

# model_type values lctx models. A config without model_type is read as llama
# only if it has no key outside LLAMA_KEYS and GENERIC_KEYS.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "internlm")

# transformers' defaults for keys absent from a config.json, per model type
# (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, InternLM's remote
# InternLMConfig). head_dim None: hidden_size // num_attention_heads;
# num_key_value_heads None: num_attention_heads (multi-head attention).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, head_dim=None,
                  num_key_value_heads=None),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, head_dim=None,
                    num_key_value_heads=8),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, head_dim=None,
                  num_key_value_heads=32),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, head_dim=128,
                  num_key_value_heads=32),
    "internlm": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, head_dim=None,
                     num_key_value_heads=None),
}

# Why some well-known model types are refused (any other one: "not modelled").
_REFUSED_TYPES = {
    "mixtral": "mixture of experts", "qwen2_moe": "mixture of experts",
    "qwen3_moe": "mixture of experts", "deepseek": "mixture of experts",
    "deepseek_v2": "mixture of experts, latent attention",
    "deepseek_v3": "mixture of experts, latent attention",
    "cohere": "LayerNorm, parallel attention/MLP block, logit_scale",
    "cohere2": "LayerNorm, parallel block, logit_scale, sliding windows",
    "minicpm": "scale_emb, scale_depth, dim_model_base scaling",
    "yi": "the old remote-code Yi format (tensors ln1/ln2, its own defaults); 01-ai's current "
          "Yi configs are model_type 'llama', which lctx reads",
    "internlm2": "fused wqkv projection", "gemma": "GeLU MLP, (1 + w) norms, scaled embedding",
    "gemma2": "soft-capping, sliding windows", "gemma3": "soft-capping, sliding windows",
    "phi3": "fused projections, partial RoPE", "stablelm": "LayerNorm, partial RoPE",
    "gpt_neox": "LayerNorm, parallel residual, partial RoPE",
}

# Keys a Llama config.json may hold (LlamaConfig) and keys every config may hold
# (PretrainedConfig bookkeeping, old generation defaults); keys starting with
# "_" are bookkeeping too. Only consulted when model_type is absent.
LLAMA_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "pretraining_tp",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias"})
GENERIC_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "id2label", "label2id", "problem_type", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "pruned_heads", "use_bfloat16", "auto_map",
    "cross_attention_hidden_size", "tf_legacy_loss", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "attn_implementation"})
# Keys of lctx's own (no transformers model reads them; hf_config_dict writes
# them only when they differ from their default):
#   kv_share_every  cross-layer KV sharing (ModelConfig.kv_share_every), default 1.
LCTX_KEYS = frozenset({"kv_share_every"})
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel")


def _one(v) -> bool:
  return v is None or (_is_number(v) and v == 1)


def _off(v) -> bool:
  return v is None or v is False or (_is_number(v) and v == 0) or v == [] or v == {}


# Keys that change the computation in ways lctx does not model: key -> (the
# values that leave a Llama computation unchanged, what the key does).
UNMODELLED_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "partial_rotary_factor": (_one, "RoPE on part of head_dim"),
    "rotary_pct": (_one, "RoPE on part of head_dim"),
    "rotary_dim": (lambda v: v is None, "RoPE on part of head_dim"),
    "scale_emb": (_one, "scaled embeddings (MiniCPM)"),
    "scale_depth": (lambda v: v is None, "residual scaling scale_depth / sqrt(L) (MiniCPM)"),
    "dim_model_base": (lambda v: v is None, "logits scaled by dim_model_base / hidden_size "
                                            "(MiniCPM)"),
    "logit_scale": (_one, "scaled logits (Cohere)"),
    "logits_scaling": (_one, "scaled logits (Granite)"),
    "embedding_multiplier": (_one, "scaled embeddings (Granite)"),
    "residual_multiplier": (_one, "scaled residual branches (Granite)"),
    "attention_multiplier": (lambda v: v is None, "attention scale other than head_dim^-0.5"),
    "query_pre_attn_scalar": (lambda v: v is None, "attention scale other than head_dim^-0.5"),
    "final_logit_softcapping": (lambda v: v is None, "logit soft-capping"),
    "attn_logit_softcapping": (lambda v: v is None, "attention soft-capping"),
    "use_qk_norm": (_off, "q/k LayerNorm (Cohere)"),
    "qk_layernorm": (_off, "q/k LayerNorm"),
    "parallel_attn": (_off, "parallel attention and MLP block"),
    "use_parallel_residual": (_off, "parallel attention and MLP block"),
    "clip_qkv": (lambda v: v is None, "clipped q/k/v"),
    "mlp_bias": (_off, "biases in the MLP"),
    "hidden_activation": (lambda v: v in (None, "silu"), "MLP activation other than SiLU"),
    "use_mrope": (_off, "multimodal RoPE (Qwen2-VL)"),
    "no_rope_layers": (lambda v: v is None, "layers without RoPE"),
    "no_rope_layer_interval": (_off, "layers without RoPE"),
    "quantization_config": (lambda v: v is None, "quantized weights (lctx runs and costs "
                                                 "weights in param_dtype)"),
}
_MOE_KEY = re.compile(r"expert|^moe_|^router_")


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_pos_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _is_pos_num(v) -> bool:
  return _is_number(v) and math.isfinite(v) and v > 0


def _is_bool(v) -> bool:
  return isinstance(v, (bool, np.bool_))


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
  """Architecture of a Llama/Mistral/Qwen2/Qwen3-style decoder plus its dtypes."""

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H (N * H may differ from D: w_q is [D, N, H], w_o [N, H, D])
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  qkv_bias: bool = False  # biases on the Q, K and V projections (Qwen2; Llama attention_bias)
  o_bias: bool = False  # bias on the output projection (Llama attention_bias; InternLM)
  qk_norm: bool = False  # RMSNorm over head_dim of each q and k head, before RoPE (Qwen3)
  # Cross-layer KV sharing (Brandon et al. 2024, Cross-Layer Attention): layers in
  # consecutive groups of s; the group's first layer computes K/V into cache layer
  # l // s, the others attend to it with their own queries. 1: no sharing.
  kv_share_every: int = 1
  param_dtype: str = "float32"  # storage dtype of the weights
  dtype: str = "float32"  # compute dtype of activations and the KV cache
  name: str = "custom"

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, field)
      if not _is_pos_int(value):
        raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
    s = self.kv_share_every
    if not _is_pos_int(s) or self.num_layers % s:
      raise ValueError(f"ModelConfig.kv_share_every={s!r} must be a positive integer dividing "
                       f"num_layers ({self.num_layers}); allowed: {_divisors(self.num_layers)}")
    for field in ("rms_norm_eps", "rope_theta"):
      if not _is_pos_num(getattr(self, field)):
        raise ValueError(f"ModelConfig.{field} must be > 0, got {getattr(self, field)!r}")
    for field in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
      if not _is_bool(getattr(self, field)):
        raise ValueError(f"ModelConfig.{field} must be True or False, got "
                         f"{getattr(self, field)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
          f"({self.num_kv_heads}); allowed num_kv_heads: {_divisors(self.num_heads)}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_scaling.rope_type not in ROPE_TYPES:
      raise ValueError(f"ModelConfig.rope_scaling.rope_type {self.rope_scaling.rope_type!r} "
                       f"is not supported; allowed: {ROPE_TYPES}")
    if not _is_pos_num(self.rope_scaling.factor):
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
  def num_kv_layers(self) -> int:
    """Layers that compute and cache K/V: L / kv_share_every (the cache's layers)."""
    return self.num_layers // self.kv_share_every

  @property
  def kv_params_per_layer(self) -> int:
    """Parameters of one layer's K/V projections: w_k, w_v (2*D*K*H), their
    biases (2*K*H) and the k norm weights (H), where the config has them."""
    D, K, H = self.hidden_size, self.num_kv_heads, self.head_dim
    return 2 * D * K * H + 2 * K * H * self.qkv_bias + H * self.qk_norm

  @property
  def params_per_layer(self) -> int:
    """Two norms, Q/K/V/O and the SwiGLU matrices, plus the optional attention
    biases (N*H + 2*K*H for Q/K/V, D for O) and q/k norm weights (2*H), for a
    layer that computes its own K/V (with kv_share_every > 1, only L / s
    layers do: num_params)."""
    D, F, N, K, H = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    n = 2 * D + D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    n += (N * H + 2 * K * H) * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
    return n

  @property
  def num_params(self) -> int:
    """Exact parameter count: embeddings, L layers (K/V projections in L / s of
    them), final norm, untied head."""
    embed = self.vocab_size * self.hidden_size
    head = 0 if self.tie_word_embeddings else embed
    shared = (self.num_layers - self.num_kv_layers) * self.kv_params_per_layer
    return embed + head + self.num_layers * self.params_per_layer - shared + self.hidden_size

  def kv_bytes_per_token(self, dtype: str | None = None) -> int:
    """Bytes of K and V per token held in the cache: 2 * (L / s) * K * H * itemsize
    (s = kv_share_every; a decode step still reads each cache layer s times)."""
    itemsize = np.dtype(_np_dtype(dtype or self.dtype)).itemsize
    return 2 * self.num_kv_layers * self.num_kv_heads * self.head_dim * itemsize

  def param_bytes(self, dtype: str | None = None) -> int:
    return self.num_params * np.dtype(_np_dtype(dtype or self.param_dtype)).itemsize

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- constructors -------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], name: str = "custom", **overrides) -> "ModelConfig":
    """Builds a config from the fields of a Hugging Face config.json.

    Accepts model_type in MODEL_TYPES (absent: llama, if every key is a Llama
    key) and raises ValueError naming every key lctx does not model. Absent
    optional fields take transformers' default for the model type; present
    ones must be valid (num_key_value_heads: 0 is an error, not MHA).
    """
    if not isinstance(hf, Mapping):
      raise ValueError(f"config must be a JSON object (a mapping), got {type(hf).__name__}")
    model_type = _check_architecture(hf)
    defaults = _DEFAULTS[model_type]
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"config is missing required field(s) {missing}")
    ints = {k: _field(hf, k, None, _is_pos_int, "a positive integer",
                      _LCTX_NAMES.get(k)) for k in required}
    D, N = ints["hidden_size"], ints["num_attention_heads"]

    _field(hf, "hidden_act", "silu", lambda v: v == "silu", "'silu'")
    kv_default = defaults["num_key_value_heads"] or N  # transformers' default for the type
    kv_heads = _field(hf, "num_key_value_heads", kv_default, _is_pos_int,
                      f"a positive integer dividing num_attention_heads ({N}): "
                      f"{_divisors(N)}, or null (= {kv_default}, transformers' default for "
                      f"{model_type})", "num_kv_heads", null_is_absent=True)
    if "num_key_value_heads" not in hf and N % kv_heads:
      raise ValueError(f"config has no num_key_value_heads; transformers' default for "
                       f"{model_type} is {kv_heads}, which does not divide num_attention_heads "
                       f"({N}); give it explicitly, allowed: {_divisors(N)}")
    head_dim = _head_dim(hf, model_type, D, N, defaults["head_dim"])
    if model_type == "internlm" and kv_heads != N:
      raise ValueError(f"config field num_key_value_heads={kv_heads} is not read by model_type "
                       f"'internlm' (multi-head attention); allowed: {N} or absent")
    qkv_bias, o_bias, qk_norm = _attention_extras(hf, model_type)
    _check_sliding_window(hf, model_type)
    _field(hf, "pretraining_tp", 1, _is_pos_int, "a positive integer")  # same math for any
    if model_type == "internlm":
      rope_theta, rope_scaling = _parse_internlm_rotary(hf)
    else:
      rope_theta, rope_scaling = _parse_rope(hf)
    L = ints["num_hidden_layers"]
    share = _field(hf, "kv_share_every", 1, lambda v: _is_pos_int(v) and L % v == 0,
                   f"a positive integer dividing num_hidden_layers ({L}): {_divisors(L)}",
                   "kv_share_every")
    kwargs = dict(
        vocab_size=ints["vocab_size"],
        hidden_size=D,
        intermediate_size=ints["intermediate_size"],
        num_layers=ints["num_hidden_layers"],
        num_heads=N,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(hf, "rms_norm_eps", defaults["rms_norm_eps"], _is_pos_num,
                                  "a number > 0")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(_field(hf, "tie_word_embeddings", False, _is_bool,
                                        "true or false")),
        max_position_embeddings=_field(hf, "max_position_embeddings",
                                       defaults["max_position_embeddings"], _is_pos_int,
                                       "a positive integer"),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        kv_share_every=share,
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


# ---- reading a config.json ----------------------------------------------------------

_LCTX_NAMES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
_NO_DEFAULT = object()


def _field(hf: Mapping[str, Any], key: str, default, valid: Callable[[Any], bool], allowed: str,
           lctx_name: str | None = None, null_is_absent: bool = False):
  """hf[key] if valid (else ValueError naming the key and the allowed values);
  `default` only when the key is absent (or null, with null_is_absent)."""
  if key not in hf or (null_is_absent and hf[key] is None):
    return default
  value = hf[key]
  if not valid(value):
    also = f" (ModelConfig.{lctx_name})" if lctx_name else ""
    raise ValueError(f"config field {key}={value!r}{also} is invalid; allowed: {allowed}")
  return value


def _check_architecture(hf: Mapping[str, Any]) -> str:
  """The model type lctx will run; ValueError naming every key it does not model."""
  problems = []
  for key, value in hf.items():
    if _MOE_KEY.search(key) and not _off(value):
      problems.append(f"{key}={value!r} (mixture of experts)")
  for key, (neutral, what) in UNMODELLED_KEYS.items():
    if key in hf and not neutral(hf[key]):
      problems.append(f"{key}={hf[key]!r} ({what})")
  if "layer_norm_eps" in hf and "rms_norm_eps" not in hf:
    problems.append(f"layer_norm_eps={hf['layer_norm_eps']!r} without rms_norm_eps "
                    f"(LayerNorm; lctx models RMSNorm)")
  layer_types = hf.get("layer_types")
  if layer_types is not None and (not isinstance(layer_types, (list, tuple)) or any(
      t != "full_attention" for t in layer_types)):
    kinds = sorted(set(map(str, layer_types))) if isinstance(layer_types, (list, tuple)) \
        else layer_types
    problems.append(f"layer_types={kinds!r} (attention other than full causal; allowed: "
                    f"'full_attention' only)")
  for block in ("rope_parameters", "rope_scaling"):
    params = hf.get(block)
    if isinstance(params, Mapping):
      for key in ("partial_rotary_factor", "mrope_section"):
        if key in params and not _one(params[key]):
          problems.append(f"{block}.{key}={params[key]!r} (RoPE on part of head_dim)")
  reported = {p.split("=", 1)[0] for p in problems}

  model_type = hf.get("model_type", _NO_DEFAULT)
  if model_type is _NO_DEFAULT:
    unknown = sorted(k for k, v in hf.items() if k not in LLAMA_KEYS | GENERIC_KEYS | LCTX_KEYS
                     | reported
                     and not k.startswith("_") and k != "layer_norm_eps" and v is not None)
    if unknown:
      problems.append(f"{unknown} (keys of no Llama config; without model_type a config is "
                      f"read as llama only if it has none)")
    archs = hf.get("architectures")
    if archs is not None and (not isinstance(archs, (list, tuple))
                              or not set(archs) <= set(LLAMA_ARCHITECTURES)):
      problems.append(f"architectures={archs!r} without model_type (allowed: "
                      f"{list(LLAMA_ARCHITECTURES)}, or set model_type)")
    model_type = "llama"
  elif model_type not in MODEL_TYPES:
    why = _REFUSED_TYPES.get(str(model_type).lower(), "an architecture lctx does not model")
    problems.insert(0, f"model_type={model_type!r} ({why})")
  if problems:
    raise ValueError(
        "config has what lctx does not model: " + "; ".join(problems) + ". lctx models "
        f"model_type {list(MODEL_TYPES)}: dense decoders with RMSNorm, RoPE, SwiGLU and GQA, "
        f"optional attention biases and Qwen3's q/k norm")
  return model_type


def _head_dim(hf, model_type: str, D: int, N: int, default: int | None) -> int:
  allowed = "a positive even integer"
  if model_type == "internlm":  # InternLM's code does not read head_dim
    head_dim = _field(hf, "head_dim", None, _is_pos_int, allowed, null_is_absent=True)
    if head_dim is not None and head_dim * N != D:
      raise ValueError(f"config field head_dim={head_dim} is not read by model_type 'internlm' "
                       f"(head_dim = hidden_size / num_attention_heads = {D / N:g}); allowed: "
                       f"{D // N if D % N == 0 else 'absent'}")
    default = None
  else:
    # qwen3's default is 128 and it has no null form; the others treat null as absent.
    head_dim = _field(hf, "head_dim", None, _is_pos_int, allowed,
                      null_is_absent=default is None)
  if head_dim is not None:
    return head_dim
  if default is not None:
    return default
  if D % N:
    raise ValueError(f"hidden_size ({D}) is not divisible by num_attention_heads ({N}) and "
                     f"head_dim is not given")
  return D // N


def _attention_extras(hf, model_type: str) -> tuple[bool, bool, bool]:
  """(qkv_bias, o_bias, qk_norm) as transformers' model for model_type reads them."""
  attention_bias = _field(hf, "attention_bias", False, _is_bool, "true or false")
  bias = _field(hf, "bias", model_type == "internlm", _is_bool, "true or false")

  def not_read(key, value, reads):
    if value:
      raise ValueError(f"config field {key}=true is not read by model_type {model_type!r} "
                       f"({reads}); lctx refuses it rather than guess; allowed: false or absent")

  if model_type != "internlm":
    not_read("bias", bias, "only model_type 'internlm' reads it")
  if model_type in ("llama",):
    return attention_bias, attention_bias, False  # q, k, v and o biases
  if model_type == "mistral":
    not_read("attention_bias", attention_bias, "no attention biases")
    return False, False, False
  if model_type == "qwen2":
    not_read("attention_bias", attention_bias, "always q, k and v biases, no o bias")
    return True, False, False
  if model_type == "qwen3":
    return attention_bias, attention_bias, True
  assert model_type == "internlm"
  not_read("attention_bias", attention_bias, "q, k, v and o biases come from `bias`")
  return bias, bias, False


def _check_sliding_window(hf, model_type: str) -> None:
  window = _field(hf, "sliding_window", None, _is_pos_int, "a positive integer or null",
                  null_is_absent=True)
  if model_type == "mistral":
    if "sliding_window" not in hf:
      raise ValueError("config field sliding_window is absent: for model_type 'mistral' "
                       "transformers then uses a 4096-token sliding window, which lctx does "
                       "not model; allowed: sliding_window null (full causal attention)")
    if window is not None:
      raise ValueError(f"config field sliding_window={window} is not supported (model_type "
                       f"'mistral' always applies it); allowed: null (full causal attention)")
    return
  # qwen2/qwen3 apply the window only with use_sliding_window (default false); lctx
  # refuses a window on llama and internlm unless use_sliding_window is false.
  use = _field(hf, "use_sliding_window", model_type not in ("qwen2", "qwen3"), _is_bool,
               "true or false")
  if window is not None and use:
    raise ValueError(f"config field sliding_window={window} is not supported (with "
                     f"use_sliding_window true); allowed: null (full causal attention), or "
                     f"use_sliding_window false")


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
  """Reads RoPE settings from the classic layout (rope_theta + rope_scaling) or
  the `rope_parameters` layout written by recent transformers versions."""
  params = hf.get("rope_parameters")
  if params is not None:
    if not isinstance(params, Mapping):
      raise ValueError(f"config field rope_parameters={params!r} is invalid; allowed: an object")
    classic = hf.get("rope_scaling")
    if classic and any(params.get(k) != v for k, v in classic.items() if k != "type") or (
        classic and "type" in classic and
        classic["type"] != params.get("rope_type", params.get("type"))):
      raise ValueError(f"config fields rope_parameters={dict(params)} and rope_scaling="
                       f"{dict(classic)} disagree; allowed: one of them, or both equal")
    theta, theta_key = params.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta"
    scaling = params
  else:
    theta, theta_key = hf.get("rope_theta", 10000.0), "rope_theta"
    scaling = hf.get("rope_scaling")
    if scaling is None:
      scaling = {}
    elif not isinstance(scaling, Mapping):
      raise ValueError(f"config field rope_scaling={scaling!r} is invalid; allowed: an object "
                       f"or null")
  if not _is_pos_num(theta):
    raise ValueError(f"config field {theta_key}={theta!r} is invalid; allowed: a number > 0")
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; allowed: {ROPE_TYPES}")
  kwargs: dict[str, Any] = {"rope_type": rope_type}
  if rope_type != "default":
    if "factor" not in scaling:
      raise ValueError(f"rope scaling type {rope_type!r} needs a 'factor'")
    if not _is_pos_num(scaling["factor"]):
      raise ValueError(f"rope scaling factor={scaling['factor']!r} is invalid; allowed: a "
                       f"number > 0")
    kwargs["factor"] = float(scaling["factor"])
  if rope_type == "llama3":
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if key not in scaling:
        raise ValueError(f"rope scaling type 'llama3' needs {key!r}")
      check = _is_pos_int if key == "original_max_position_embeddings" else _is_pos_num
      if not check(scaling[key]):
        raise ValueError(f"rope scaling {key}={scaling[key]!r} is invalid; allowed: "
                         f"{'a positive integer' if check is _is_pos_int else 'a number > 0'}")
      kwargs[key] = type(getattr(RopeScaling(), key))(scaling[key])
  return float(theta), RopeScaling(**kwargs)


def _parse_internlm_rotary(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
  """InternLM's remote code reads RoPE from `rotary` only; its default type,
  'dynamic' (NTK scaling by the running sequence length), is not modelled."""
  for key in ("rope_theta", "rope_scaling", "rope_parameters"):
    if hf.get(key) is not None:
      raise ValueError(f"config field {key} is not read by model_type 'internlm' (its RoPE "
                       f"comes from `rotary`); allowed: absent")
  rotary = hf.get("rotary")
  if not isinstance(rotary, Mapping) or rotary.get("type") != "origin":
    raise ValueError(f"config field rotary={rotary!r}: model_type 'internlm' is modelled with "
                     f"plain RoPE only (its default, type 'dynamic', rescales RoPE with the "
                     f"sequence length); allowed: {{'type': 'origin', 'base': <theta>}}")
  theta = rotary.get("base", 10000.0)
  if not _is_pos_num(theta):
    raise ValueError(f"config field rotary.base={theta!r} is invalid; allowed: a number > 0")
  return float(theta), RopeScaling()


def _np_dtype(name: str):
  import ml_dtypes  # numpy has no bfloat16 of its own
  if name == "bfloat16":
    return ml_dtypes.bfloat16
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} not allowed; allowed: {DTYPES}")
  return np.dtype(name)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]
