"""The dense KV cache: fixed capacity, per-row fill lengths, updated in place.

Per layer, keys are [B, K, H, S] and values [B, K, S, H] (S = capacity): both
decode-attention products are then batched matmuls over (b, k) with the
contiguous operand the CPU backend wants (see lctx.model.attention). The layers
are either stacked into one [L, ...] array per K and V (for the scanned layer
loop) or kept as a tuple of L arrays (for the unrolled loop, where each layer's
buffer is read and written in place with no slicing copies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lctx.config import ModelConfig

# Logical axes of one layer's cache arrays (the stacked form has "layers" in front).
K_CACHE_AXES = ("cache_batch", "cache_kv_heads", "head_dim", "cache_seq")
V_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_seq", "head_dim")


@struct.dataclass
class KVCache:
  k: jax.Array | tuple[jax.Array, ...]  # [L, B, K, H, S] or L x [B, K, H, S]
  v: jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, H] or L x [B, K, S, H]
  lengths: jax.Array  # [B] int32: valid tokens per row; the next token goes there

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def capacity(self) -> int:
    return (self.v if self.stacked else self.v[0]).shape[-2]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def nbytes(self) -> int:
    """Physical bytes: K and V payload plus the lengths."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))


def _layer_shapes(config: ModelConfig, batch: int, capacity: int):
  if capacity <= 0 or batch <= 0:
    raise ValueError(f"cache batch ({batch}) and capacity ({capacity}) must be positive")
  K, H = config.num_kv_heads, config.head_dim
  return (batch, K, H, capacity), (batch, K, capacity, H)


def init_cache(config: ModelConfig, batch: int, capacity: int, stacked: bool = True) -> KVCache:
  """An empty cache (zeros; never uninitialised memory) in the compute dtype."""
  k_shape, v_shape = _layer_shapes(config, batch, capacity)
  dtype, L = jnp.dtype(config.dtype), config.num_layers
  if stacked:
    k, v = jnp.zeros((L, *k_shape), dtype), jnp.zeros((L, *v_shape), dtype)
  else:
    k = tuple(jnp.zeros(k_shape, dtype) for _ in range(L))
    v = tuple(jnp.zeros(v_shape, dtype) for _ in range(L))
  return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


def abstract_cache(config: ModelConfig, batch: int, capacity: int,
                   stacked: bool = True) -> KVCache:
  """ShapeDtypeStructs of a cache: for compiling at 1M tokens without allocating."""
  return jax.eval_shape(lambda: init_cache(config, batch, capacity, stacked))
