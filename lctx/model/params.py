"""Parameter declaration (Flax NNX) and the plain-pytree form the model runs on.

NNX declares and initialises the weights; `nnx.split` turns them into a nested
dict of arrays once, and every jitted function takes that dict. Layer weights
are stacked along a leading L axis so the layer loop can be a `lax.scan`
(compiles a 60-layer model in seconds); `unstack_layers` gives the per-layer
layout that runs faster on CPU (see lctx.model.transformer).

Layout (shape letters as in lctx.config):
  embed [V, D]; final_norm [D]; lm_head [D, V] (absent when tied)
  layers: attn_norm [L, D], w_q [L, D, N, H], w_k/w_v [L, D, K, H], w_o [L, N, H, D],
          mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D]
          and, only when the config has them: b_q [L, N, H], b_k/b_v [L, K, H]
          (config.qkv_bias), b_o [L, D] (config.o_bias), q_norm/k_norm [L, H]
          (config.qk_norm). N * H need not equal D.
  kv_layers (only with config.kv_share_every = s > 1, cross-layer KV sharing):
          the K/V leaves (KV_LEAVES: w_k, w_v, and b_k, b_v, k_norm where the
          config has them) of the L / s layers that compute K/V, stacked
          [L / s, ...]; `layers` then lacks them. s = 1: no kv_layers key.
The unrolled layout (unstack_layers) holds a tuple of per-layer dicts in
place of each stacked dict.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lctx.config import ModelConfig

Params = dict[str, Any]

# Logical axis names of every parameter; lctx.sharding maps them to mesh axes.
LAYER_AXES = {
    "attn_norm": ("layers", "embed"),
    "w_q": ("layers", "embed", "heads", "head_dim"),
    "w_k": ("layers", "embed", "kv_heads", "head_dim"),
    "w_v": ("layers", "embed", "kv_heads", "head_dim"),
    "w_o": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    # Optional leaves: biases follow their projection's output axes (b_o is added
    # after the heads are summed, so it is replicated); q/k norm weights are
    # shared by all heads and replicated.
    "b_q": ("layers", "heads", "head_dim"),
    "b_k": ("layers", "kv_heads", "head_dim"),
    "b_v": ("layers", "kv_heads", "head_dim"),
    "b_o": ("layers", "embed"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
}
TOP_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
# The leaves only a group's first layer holds under cross-layer KV sharing.
KV_LEAVES = ("w_k", "w_v", "b_k", "b_v", "k_norm")
STACKED = ("layers", "kv_layers")  # the keys of params holding per-layer weights


def layer_shapes(config: ModelConfig, kv: bool | None = None) -> dict[str, tuple[int, ...]]:
  """Per-layer shapes (without the leading L axis) of params["layers"]: every
  leaf, less KV_LEAVES when config.kv_share_every > 1. kv=True: the KV_LEAVES
  only (one layer of params["kv_layers"]); kv=False: all but them."""
  D, F, N, K, H = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  shapes = {"attn_norm": (D,), "w_q": (D, N, H), "w_k": (D, K, H), "w_v": (D, K, H),
            "w_o": (N, H, D), "mlp_norm": (D,), "w_gate": (D, F), "w_up": (D, F),
            "w_down": (F, D)}
  if config.qkv_bias:
    shapes.update(b_q=(N, H), b_k=(K, H), b_v=(K, H))
  if config.o_bias:
    shapes["b_o"] = (D,)
  if config.qk_norm:
    shapes.update(q_norm=(H,), k_norm=(H,))
  if kv is None:
    if config.kv_share_every == 1:
      return shapes
    kv = False
  return {k: x for k, x in shapes.items() if (k in KV_LEAVES) == kv}


def stacked_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  """{"layers": per-layer shapes, L of them; "kv_layers" (kv_share_every > 1
  only): per-layer shapes, L / s of them}, each without its leading axis."""
  out = {"layers": layer_shapes(config)}
  if config.kv_share_every > 1:
    out["kv_layers"] = layer_shapes(config, kv=True)
  return out


def num_stacked(config: ModelConfig, key: str) -> int:
  """Length of the leading axis of params[key] (key in STACKED)."""
  return config.num_layers if key == "layers" else config.num_kv_layers


def top_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  V, D = config.vocab_size, config.hidden_size
  shapes = {"embed": (V, D), "final_norm": (D,)}
  if not config.tie_word_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def param_logical_axes(config: ModelConfig) -> Params:
  """Same tree structure as the params, with a tuple of logical axis names per leaf."""
  axes: Params = {k: TOP_AXES[k] for k in top_shapes(config)}
  for key, shapes in stacked_shapes(config).items():
    axes[key] = {k: LAYER_AXES[k] for k in shapes}
  return axes


class _Layers(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, std: float, key: str = "layers"):
    dtype = jnp.dtype(config.param_dtype)
    L = num_stacked(config, key)
    for name, shape in stacked_shapes(config)[key].items():
      if name.endswith("norm"):
        value = jnp.ones((L, *shape), dtype)
      else:
        value = std * jax.random.normal(rngs.params(), (L, *shape), dtype)
      setattr(self, name, nnx.Param(value))


class Decoder(nnx.Module):
  """The decoder's weights. Computation lives in lctx.model.transformer."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, std: float = 0.02):
    dtype = jnp.dtype(config.param_dtype)
    V, D = config.vocab_size, config.hidden_size
    self.embed = nnx.Param(std * jax.random.normal(rngs.params(), (V, D), dtype))
    self.layers = _Layers(config, rngs, std)
    if config.kv_share_every > 1:
      self.kv_layers = _Layers(config, rngs, std, "kv_layers")
    self.final_norm = nnx.Param(jnp.ones((D,), dtype))
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Param(std * jax.random.normal(rngs.params(), (D, V), dtype))


def init_params(config: ModelConfig, seed: int = 0, std: float = 0.02) -> Params:
  """Random weights (normal(0, std), biases included; norms at 1) as a nested
  dict of arrays."""
  _, state = nnx.split(Decoder(config, nnx.Rngs(seed), std))
  return nnx.to_pure_dict(state)


def abstract_params(config: ModelConfig) -> Params:
  """ShapeDtypeStructs of the params: nothing is allocated (for AOT compiles)."""
  _, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0))))
  return nnx.to_pure_dict(state)


def unstack_layers(params: Params) -> Params:
  """Stacked layers [L, ...] -> a tuple of L per-layer dicts (the unrolled
  layout); params["kv_layers"] (cross-layer KV sharing) likewise."""
  if isinstance(params["layers"], (tuple, list)):
    return params
  out = dict(params)
  for key in STACKED:
    if key in params:
      layers = params[key]
      L = next(iter(layers.values())).shape[0]
      out[key] = tuple({k: v[i] for k, v in layers.items()} for i in range(L))
  return out


def stack_layers(params: Params) -> Params:
  """Inverse of unstack_layers (the canonical, checkpointed layout)."""
  if not isinstance(params["layers"], (tuple, list)):
    return params
  out = dict(params)
  for key in STACKED:
    if key in params:
      out[key] = jax.tree.map(lambda *xs: jnp.stack(xs), *params[key])
  return out
