"""The dense KV cache: fixed capacity, per-row fill lengths, updated in place.

Per layer, K and V are [B, K, S, H] (S = capacity): decode attention is then a
batched matmul over (b, k) with contiguous operands. The layers are either
stacked into one [L, B, K, S, H] array (for the scanned layer loop) or kept as
a tuple of L arrays (for the unrolled loop, where each layer's buffer is read
and written in place with no slicing copies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lctx.config import ModelConfig

# Logical axes of one cache array (stacked form has "layers" in front).
CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_seq", "head_dim")


@struct.dataclass
class KVCache:
  k: jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, H] or L x [B, K, S, H]
  v: jax.Array | tuple[jax.Array, ...]
  lengths: jax.Array  # [B] int32: valid tokens per row; the next token goes there

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def capacity(self) -> int:
    return (self.k if self.stacked else self.k[0]).shape[-2]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def nbytes(self) -> int:
    """Physical bytes: K and V payload plus the lengths."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))


def _layer_shape(config: ModelConfig, batch: int, capacity: int) -> tuple[int, ...]:
  if capacity <= 0 or batch <= 0:
    raise ValueError(f"cache batch ({batch}) and capacity ({capacity}) must be positive")
  return (batch, config.num_kv_heads, capacity, config.head_dim)


def init_cache(config: ModelConfig, batch: int, capacity: int, stacked: bool = True) -> KVCache:
  """An empty cache (zeros; never uninitialised memory) in the compute dtype."""
  shape = _layer_shape(config, batch, capacity)
  dtype = jnp.dtype(config.dtype)
  if stacked:
    k = jnp.zeros((config.num_layers, *shape), dtype)
    v = jnp.zeros((config.num_layers, *shape), dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


def abstract_cache(config: ModelConfig, batch: int, capacity: int,
                   stacked: bool = True) -> KVCache:
  """ShapeDtypeStructs of a cache: for compiling at 1M tokens without allocating."""
  return jax.eval_shape(lambda: init_cache(config, batch, capacity, stacked))
