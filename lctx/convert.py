"""Checkpoint conversions that change a model's architecture (and its cache).

`mha_to_gqa` gives a model fewer KV heads by mean-pooling the K and V head
projections of each group of heads: the conversion of Ainslie et al. 2023,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints" (arXiv 2305.13245), sec. 2.2. Its KV cache is K / K' times
smaller; `gqa_config` is the config-only half, for costing a converted model
without its weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from lctx.config import ModelConfig
from lctx.engine import check_params
from lctx.model.params import Params

# The leaves with a KV-head axis, [..., K, H] (stacked [L, D, K, H] or per layer
# [D, K, H]; biases [L, K, H] or [K, H]), in whichever per-layer entry of the
# params holds them (params["layers"], or params["kv_layers"] under cross-layer
# KV sharing). k_norm [H] is shared by every head.
POOLED = ("w_k", "w_v", "b_k", "b_v")


def allowed_kv_heads(config: ModelConfig) -> list[int]:
  """The KV head counts `config` converts to: the divisors of its K."""
  K = config.num_kv_heads
  return [d for d in range(1, K + 1) if K % d == 0]


def gqa_config(config: ModelConfig, num_kv_heads: int) -> ModelConfig:
  """`config` with `num_kv_heads` KV heads (named "<name>-kv<K'>"), `config`
  itself when K' = K. ValueError naming num_kv_heads and the allowed values
  unless K' is a positive divisor of the config's K (then N % K' == 0 too)."""
  if not isinstance(config, ModelConfig):
    raise ValueError(f"config must be an lctx.ModelConfig, got {type(config).__name__}")
  allowed = allowed_kv_heads(config)
  if (not isinstance(num_kv_heads, (int, np.integer)) or isinstance(num_kv_heads, bool)
      or num_kv_heads < 1):
    raise ValueError(f"num_kv_heads must be a positive integer dividing the {config.name!r} "
                     f"KV heads ({config.num_kv_heads}), got {num_kv_heads!r}; allowed: "
                     f"{allowed}")
  if num_kv_heads not in allowed:
    raise ValueError(f"num_kv_heads={num_kv_heads} does not divide the {config.name!r} KV "
                     f"heads ({config.num_kv_heads}): heads are pooled in whole groups, never "
                     f"split; allowed: {allowed}")
  if num_kv_heads == config.num_kv_heads:
    return config
  return config.replace(num_kv_heads=int(num_kv_heads), name=f"{config.name}-kv{num_kv_heads}")


def _pool(x, groups: int):
  """[..., K, H] -> [..., groups, H]: the mean of each run of K / groups
  contiguous heads, in float32, cast back to x's dtype."""
  *lead, K, H = x.shape
  x32 = jnp.asarray(x).astype(jnp.float32).reshape(*lead, groups, K // groups, H)
  return jnp.mean(x32, axis=-2).astype(x.dtype)


def mha_to_gqa(config: ModelConfig, params: Params,
               num_kv_heads: int) -> tuple[ModelConfig, Params]:
  """Converts a checkpoint to `num_kv_heads` (K') KV heads by mean-pooling.

  The recipe of Ainslie et al. 2023 (GQA, arXiv 2305.13245, sec. 2.2): the
  K and V projections of each group of heads are replaced by their mean. New
  KV head j pools the source heads [j * K / K', (j + 1) * K / K'), contiguous,
  so query head n, which read source head n // (N / K), reads new head
  n // (N / K') (lctx's and HF Llama's contiguous GQA grouping, repeat_kv).
  The source may be MHA (K = N) or already GQA (K < N: pooled further).

  config: the source ModelConfig (N query heads, K KV heads, head_dim H).
  params: its params, stacked (layers w_k/w_v [L, D, K, H], b_k/b_v
    [L, K, H] when config.qkv_bias) or unrolled (a tuple of L per-layer dicts,
    lctx.unstack_layers), and params["kv_layers"] alike under cross-layer KV
    sharing; the result keeps the layout. w_k/w_v (and b_k/b_v)
    become [.., K', H]; everything else (w_q, w_o, the k_norm [H] shared by
    the heads, ...) is the same array. Pooling runs in float32 and casts back
    to each array's dtype.
  num_kv_heads: K', a positive divisor of K. K' = K returns `config` and
    `params` themselves (bitwise the same).

  Returns (config with num_kv_heads=K' named "<name>-kv<K'>", params).
  Raises ValueError, before computing anything: num_kv_heads not a positive
  integer or not a divisor of K (the message lists the allowed divisors);
  config not a ModelConfig; params not matching config (engine.check_params).

  The converted model is not uptrained (the paper's 5% of pre-training
  steps); its accuracy cost is to be measured.
  """
  new_config = gqa_config(config, num_kv_heads)
  check_params(config, params)
  if new_config is config:
    return config, params
  groups = new_config.num_kv_heads

  def layer(weights):
    return {k: _pool(v, groups) if k in POOLED else v for k, v in weights.items()}

  def convert(value):  # per-layer weights, stacked (a dict) or unrolled (dicts)
    if isinstance(value, Mapping):
      return layer(value)
    if isinstance(value, (tuple, list)):
      return type(value)(layer(w) for w in value)
    return value  # embed, final_norm, lm_head

  return new_config, {k: convert(v) for k, v in params.items()}
