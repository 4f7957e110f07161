"""Weights in and out: Hugging Face safetensors import and orbax save/restore.

`load_hf_checkpoint` streams a Llama-family HF checkpoint into the params
pytree (lctx.model.params) one leaf at a time, so peak host memory stays near
one copy of the weights. Every tensor's presence, shape and dtype kind is
checked before anything is copied; tensors the model has no place for are an
error, never silently dropped.

`save_params` / `restore_params` checkpoint the params with orbax, always in
the stacked (canonical) layer layout.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from lctx.config import ModelConfig, _np_dtype
from lctx.model.params import Params, abstract_params, layer_shapes, stack_layers, top_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exports carry that the model recomputes; safe to skip.
HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# ---- HF name and layout of every params leaf ---------------------------------------

def _hf_layer_spec(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable]]:
  """leaf -> (HF name suffix, HF shape, HF tensor -> lctx per-layer tensor)."""
  D, F, N, K, H = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  same = lambda t: t
  spec = {
      "attn_norm": ("input_layernorm.weight", (D,), same),
      "w_q": ("self_attn.q_proj.weight", (N * H, D), lambda t: t.T.reshape(D, N, H)),
      "w_k": ("self_attn.k_proj.weight", (K * H, D), lambda t: t.T.reshape(D, K, H)),
      "w_v": ("self_attn.v_proj.weight", (K * H, D), lambda t: t.T.reshape(D, K, H)),
      "w_o": ("self_attn.o_proj.weight", (D, N * H), lambda t: t.T.reshape(N, H, D)),
      "mlp_norm": ("post_attention_layernorm.weight", (D,), same),
      "w_gate": ("mlp.gate_proj.weight", (F, D), lambda t: t.T),
      "w_up": ("mlp.up_proj.weight", (F, D), lambda t: t.T),
      "w_down": ("mlp.down_proj.weight", (D, F), lambda t: t.T),
  }
  # Optional leaves, named as transformers' Llama/Qwen2/Qwen3 models name them.
  if config.qkv_bias:
    spec["b_q"] = ("self_attn.q_proj.bias", (N * H,), lambda t: t.reshape(N, H))
    spec["b_k"] = ("self_attn.k_proj.bias", (K * H,), lambda t: t.reshape(K, H))
    spec["b_v"] = ("self_attn.v_proj.bias", (K * H,), lambda t: t.reshape(K, H))
  if config.o_bias:
    spec["b_o"] = ("self_attn.o_proj.bias", (D,), same)
  if config.qk_norm:
    spec["q_norm"] = ("self_attn.q_norm.weight", (H,), same)
    spec["k_norm"] = ("self_attn.k_norm.weight", (H,), same)
  return spec


def _hf_top_spec(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable]]:
  V, D = config.vocab_size, config.hidden_size
  spec = {
      "embed": ("model.embed_tokens.weight", (V, D), lambda t: t),
      "final_norm": ("model.norm.weight", (D,), lambda t: t),
  }
  if not config.tie_word_embeddings:
    spec["lm_head"] = ("lm_head.weight", (V, D), lambda t: t.T)
  return spec


# ---- the files of a checkpoint ----------------------------------------------------------

class _Tensors:
  """Name -> tensor over a checkpoint's safetensors files, each opened once."""

  def __init__(self, path: Path, stack: contextlib.ExitStack):
    self.path = path
    index = path / INDEX_FILE
    if index.is_file():
      try:
        with open(index) as f:
          weight_map = json.load(f).get("weight_map")
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{index}: not a readable safetensors index (JSON object with a "
                         f"'weight_map'): {type(e).__name__}: {e}") from e
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map'")
      self.expected_file: dict[str, str] = dict(weight_map)
      files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
      self.expected_file = {}
      files = [SINGLE_FILE]
    else:
      found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; found: {found}")
    self.handles: dict[str, Any] = {}
    self.location: dict[str, str] = {}  # tensor name -> file it is in
    for name in files:
      if not (path / name).is_file():
        raise FileNotFoundError(f"shard {name} listed in {INDEX_FILE} is missing from {path}")
      handle = stack.enter_context(_open_safetensors(path / name))
      self.handles[name] = handle
      for key in handle.keys():
        if key in self.location:
          raise ValueError(f"tensor {key} is in both {self.location[key]} and {name}")
        self.location[key] = name

  def names(self) -> set[str]:
    return set(self.location) | set(self.expected_file)

  def _file(self, name: str) -> str:
    expected = self.expected_file.get(name)
    if expected is not None and self.location.get(name) != expected:
      raise ValueError(f"tensor {name} is missing: {INDEX_FILE} maps it to {expected}, "
                       f"which does not contain it")
    if name not in self.location:
      raise ValueError(f"tensor {name} is missing from the checkpoint"
                       + (f" (not in {INDEX_FILE})" if self.expected_file else ""))
    return self.location[name]

  def check(self, name: str, shape: tuple[int, ...]) -> None:
    """Presence, shape and float dtype, without reading the data."""
    file = self._file(name)
    with self._reading(file):
      tensor = self.handles[file].get_slice(name)
      found = tuple(tensor.get_shape())
    if found != tuple(shape):
      raise ValueError(f"tensor {name} (in {file}) has shape {found}, expected {tuple(shape)} "
                       f"from the config")
    if tensor.get_dtype() not in FLOAT_DTYPES:
      raise ValueError(f"tensor {name} (in {file}) has dtype {tensor.get_dtype()}; "
                       f"allowed: {FLOAT_DTYPES} (quantized checkpoints are not supported)")

  def get(self, name: str) -> np.ndarray:
    file = self._file(name)
    with self._reading(file):
      return self.handles[file].get_tensor(name)

  def _reading(self, file: str):
    return _safetensors_errors(self.path / file)


@contextlib.contextmanager
def _safetensors_errors(file: Path):
  """Re-raises a safetensors read error (a truncated or corrupt file) as a
  one-line ValueError naming the file."""
  try:
    yield
  except (SafetensorError, OSError) as e:
    size = file.stat().st_size if file.is_file() else None
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{file}: not a readable safetensors file ({detail}; {size} bytes): "
                     f"truncated or corrupt? re-download or re-export it") from e


@contextlib.contextmanager
def _open_safetensors(file: Path):
  """safe_open(file), its errors re-raised as a ValueError naming the file."""
  with _safetensors_errors(file):
    handle = safe_open(str(file), framework="numpy")
  with handle as opened:
    yield opened


# ---- import ------------------------------------------------------------------------------

def load_hf_checkpoint(path, param_dtype: str | None = None,
                       dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """Reads an HF checkpoint directory (a model_type ModelConfig accepts: Llama,
  Mistral, Qwen2, Qwen3, InternLM) into (config, params).

  The directory holds config.json and model.safetensors, or sharded
  *.safetensors with model.safetensors.index.json. Weights are cast to
  `param_dtype` (default: keep the config default, float32); `dtype` sets the
  compute dtype. Params come back in the stacked layer layout.
  """
  path = Path(path).expanduser()
  overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
  config = ModelConfig.from_hf_config(path, **overrides)
  _no_hf_kv_sharing(config, "import")  # before opening any tensor file
  with contextlib.ExitStack() as stack:
    return config, params_from_tensors(config, _Tensors(path, stack))


def params_from_tensors(config: ModelConfig, tensors) -> Params:
  """Params (stacked layout, config.param_dtype) from a tensor source under HF
  names and layouts: `tensors` has names() -> set, check(name, shape) (raises
  ValueError naming the tensor) and get(name) -> np.ndarray. Every tensor is
  checked before any is copied, then copied one leaf at a time (peak host
  memory: about one leaf in the target dtype beside the source)."""
  _no_hf_kv_sharing(config, "import")
  target = _np_dtype(config.param_dtype)
  top, per_layer = _hf_top_spec(config), _hf_layer_spec(config)
  layer_name = lambda l, suffix: f"model.layers.{l}.{suffix}"
  expected: set[str] = set()
  for hf_name, shape, _ in top.values():
    tensors.check(hf_name, shape)
    expected.add(hf_name)
  for suffix, shape, _ in per_layer.values():
    for l in range(config.num_layers):
      tensors.check(layer_name(l, suffix), shape)
      expected.add(layer_name(l, suffix))
  tied_head = config.tie_word_embeddings and "lm_head.weight" in tensors.names()
  if tied_head:  # some exports keep a copy of the tied head: accepted if identical
    tensors.check("lm_head.weight", top["embed"][1])
    expected.add("lm_head.weight")
  extra = sorted(n for n in tensors.names() - expected if not HARMLESS.search(n))
  if extra:
    raise ValueError(f"checkpoint has {len(extra)} tensor(s) the model has no place for: "
                     f"{extra[:20]}{' ...' if len(extra) > 20 else ''}")

  params: Params = {}
  for leaf, (hf_name, _, convert) in top.items():
    params[leaf] = _to_device(convert(tensors.get(hf_name)), target)
  if tied_head:
    head = tensors.get("lm_head.weight")
    if not np.array_equal(head.astype(target), np.asarray(params["embed"])):
      raise ValueError("tie_word_embeddings is true but lm_head.weight differs from "
                       "model.embed_tokens.weight")
    del head
  layers: Params = {}
  shapes = layer_shapes(config)
  for leaf, (suffix, _, convert) in per_layer.items():
    buf = np.empty((config.num_layers, *shapes[leaf]), target)
    for l in range(config.num_layers):
      buf[l] = convert(tensors.get(layer_name(l, suffix)))
    layers[leaf] = _to_device(buf, target)
    del buf
  params["layers"] = layers
  assert set(params) == set(top_shapes(config)) | {"layers"}
  return params


def _no_hf_kv_sharing(config: ModelConfig, what: str) -> None:
  """ValueError for a config with cross-layer KV sharing: HF and GGUF
  checkpoints hold K/V projections in every layer and no transformers model
  shares them, so an import would silently drop the sharing layers' K/V
  weights and an export would have nothing to put in their place."""
  if config.kv_share_every > 1:
    raise ValueError(f"cannot {what} HF/GGUF weights for config {config.name!r} with "
                     f"kv_share_every={config.kv_share_every}: those checkpoints have K/V "
                     f"projections in every layer (no transformers model shares them); "
                     f"allowed: kv_share_every=1 (train or init a shared-KV model, and save it "
                     f"with lctx.save_params)")


def _to_device(x: np.ndarray, target) -> jax.Array:
  return jnp.asarray(np.ascontiguousarray(x, dtype=target))


# ---- orbax save / restore -------------------------------------------------------------------

ORBAX_METADATA = "_METADATA"  # the tree metadata every orbax StandardCheckpointer save writes


def save_params(path, params: Params, overwrite: bool = False) -> Path:
  """Saves params (stacked or unrolled layout, on any device or mesh) in the
  stacked layout; returns the path. overwrite=True replaces an earlier orbax
  checkpoint (or an empty directory), never any other directory."""
  import orbax.checkpoint as ocp
  path = Path(path).expanduser().resolve()
  if path.exists() and not overwrite:
    raise FileExistsError(f"checkpoint path {path} already exists; pass overwrite=True to "
                          f"replace it")
  if path.exists() and not (path.is_dir() and (_is_orbax_dir(path) or not any(path.iterdir()))):
    raise FileExistsError(f"{path} exists and is not an orbax checkpoint; overwrite=True only "
                          f"replaces one written by save_params (remove it yourself)")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, stack_layers(params), force=overwrite)
    ckptr.wait_until_finished()
  return path


def _is_orbax_dir(path: Path) -> bool:
  return (path / ORBAX_METADATA).is_file()


def _check_orbax_dir(path: Path) -> None:
  """A one-line error, before orbax runs, when `path` is not a checkpoint of save_params."""
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not path.is_dir():
    raise ValueError(f"{path} is a file, not an orbax lctx checkpoint directory (written by "
                     f"lctx.save_params)")
  if _is_orbax_dir(path):
    return
  found = sorted(p.name for p in path.iterdir())
  if (path / "config.json").is_file() or any(path.glob("*.safetensors")):
    raise ValueError(f"{path} is a Hugging Face checkpoint directory, not an orbax lctx "
                     f"checkpoint (written by lctx.save_params); read it with "
                     f"lctx.load_hf_checkpoint({str(path)!r})")
  raise ValueError(f"{path} is not an orbax lctx checkpoint (written by lctx.save_params): "
                   f"no {ORBAX_METADATA} file; found {found[:10]}"
                   f"{' ...' if len(found) > 10 else ''}")


def _default_device() -> jax.Device:
  device = jax.config.jax_default_device
  if isinstance(device, jax.Device):
    return device
  return jax.local_devices(backend=device if isinstance(device, str) else None)[0]


def restore_params(path, config: ModelConfig | None = None, abstract: Params | None = None, *,
                   plan=None) -> Params:
  """Restores params saved by save_params (stacked layout), whatever mesh saved them.

  With `config` (or an explicit `abstract` tree of ShapeDtypeStructs), the
  stored tree, shapes and dtypes must match it exactly (no silent casts);
  without either, the stored tree comes back as it is.
  Placement: `plan` (an lctx.sharding.Plan; its config by default): the plan's
  param shardings (`plan.param_shardings`), as lctx.engine.shard_params lays
  them out; otherwise the shardings of `abstract`'s leaves where they carry
  one, else the default device (one device, whatever the saver's topology).
  """
  import orbax.checkpoint as ocp
  if config is not None and abstract is not None:
    raise ValueError("pass either config or abstract, not both")
  if plan is not None:
    if config is None and abstract is None:
      config = plan.config
    elif config is not None and plan.config != config:
      raise ValueError(f"the sharding plan was made for model {plan.config.name!r}, not "
                       f"{config.name!r}")
  path = Path(path).expanduser().resolve()
  _check_orbax_dir(path)
  if config is not None:
    abstract = abstract_params(config)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      stored = ckptr.metadata(path).item_metadata
    except Exception as e:  # orbax raises many kinds; name the checkpoint and the cause
      raise ValueError(f"{path}: unreadable orbax checkpoint metadata ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    stored = getattr(stored, "tree", stored)
    if not stored:
      raise ValueError(f"{path} is not an orbax lctx checkpoint (written by "
                       f"lctx.save_params): orbax finds no saved tree in it")
    if abstract is None:
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
    else:
      _check_stored(stored, abstract, path)
    if plan is not None:
      shardings = plan.param_shardings(abstract)
    else:
      device = jax.sharding.SingleDeviceSharding(_default_device())
      shardings = jax.tree.map(lambda a: getattr(a, "sharding", None) or device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    return ckptr.restore(path, target)


def _check_stored(stored, abstract: Params, path: Path) -> None:
  """Raises ValueError naming every leaf whose presence, shape or dtype differs."""
  flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  flat_want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"{k}: missing from checkpoint"
              for k in sorted(flat_want.keys() - flat_stored.keys())]
  problems += [f"{k}: not expected" for k in sorted(flat_stored.keys() - flat_want.keys())]
  for k in sorted(flat_want.keys() & flat_stored.keys()):
    got, want = flat_stored[k], flat_want[k]
    if tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype):
      problems.append(f"{k}: stored {jnp.dtype(got.dtype).name}{tuple(got.shape)}, "
                      f"expected {jnp.dtype(want.dtype).name}{tuple(want.shape)}")
  if problems:
    raise ValueError(f"checkpoint {path} does not match the expected params:\n  "
                     + "\n  ".join(problems))


# ---- export (lctx -> Hugging Face) --------------------------------------------------------

def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
  """The config.json fields of an equivalent transformers model: Qwen3ForCausalLM
  with q/k norm, Qwen2ForCausalLM with q/k/v biases only, else LlamaForCausalLM
  (attention_bias: q/k/v/o biases). ValueError for a combination no
  transformers model of these computes (q/k norm or o bias without the
  matching q/k/v biases). With cross-layer KV sharing (kv_share_every > 1)
  the dict also holds lctx's own key kv_share_every, which ModelConfig reads
  back and transformers does not (no transformers model computes it:
  to_hf_state_dict refuses such params)."""
  rs = config.rope_scaling
  rope_scaling = None
  if rs.rope_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": rs.factor}
  elif rs.rope_type == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": rs.factor,
                    "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings}
  if config.qk_norm:
    if config.qkv_bias != config.o_bias:
      raise ValueError(f"no transformers model has q/k norm with qkv_bias={config.qkv_bias} "
                       f"and o_bias={config.o_bias}; allowed: both true or both false (qwen3)")
    arch = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "attention_bias": config.qkv_bias, "use_sliding_window": False,
            "sliding_window": None}
  elif config.qkv_bias and not config.o_bias:
    arch = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "use_sliding_window": False, "sliding_window": None}
  elif config.qkv_bias == config.o_bias:
    arch = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": config.qkv_bias}
  else:
    raise ValueError("no transformers model has an o_proj bias without q/k/v biases; allowed: "
                     "o_bias only with qkv_bias")
  return {
      **arch, "hidden_act": "silu",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
      "tie_word_embeddings": config.tie_word_embeddings,
      "max_position_embeddings": config.max_position_embeddings,
      "mlp_bias": False,
      **({"kv_share_every": config.kv_share_every} if config.kv_share_every > 1 else {}),
  }


def to_hf_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array, the inverse of load_hf_checkpoint's mapping.

  Every lctx leaf is either stored as is (embeddings, norms, the o bias), is an
  HF bias with its axis split into heads, or is the HF matrix transposed with
  its output axis split into heads, so the inverse is a reshape to the
  transposed HF shape followed by a transpose. The params must hold exactly
  the leaves the config has (ValueError otherwise: nothing is dropped).
  """
  _no_hf_kv_sharing(config, "export")
  params = stack_layers(params)
  want = set(_hf_layer_spec(config))
  if set(params["layers"]) != want:
    raise ValueError(f"params layers hold {sorted(params['layers'])}, but the config has "
                     f"{sorted(want)}")

  def to_hf(x, hf_shape):
    x = np.asarray(x)
    return x if x.shape == hf_shape else np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)

  out = {hf_name: to_hf(params[leaf], shape)
         for leaf, (hf_name, shape, _) in _hf_top_spec(config).items()}
  for leaf, (suffix, shape, _) in _hf_layer_spec(config).items():
    stacked = np.asarray(params["layers"][leaf])
    for l in range(config.num_layers):
      out[f"model.layers.{l}.{suffix}"] = to_hf(stacked[l], shape)
  return out
