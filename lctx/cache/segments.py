"""What attention reads from a cache: key/value sources, block by block.

lctx.model.attention turns a `Blocks` source into a segment (SourceSegment);
cache formats (lctx.cache.quant) build their sources from their own arrays,
so attention never knows a format and the cache never imports the model.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Keys and values that attention reads block by block: a segment's source.

  read(lo, n) -> (k [B, K, H, n], v [B, K, n, H]): slots [lo, lo + n), in any
    dtype (k is cast to the queries' dtype for the product); lo may be traced.
    A quantized cache dequantizes here, one block at a time.
  length: [B] or scalar int32 (or a Python int): slots [0, length) are visible
    to every query, unless `valid` says otherwise.
  slots: S, the slot count; kv_heads: K.
  valid: optional (slot [n] int32) -> [B, n] bool, which of those slots hold a
    visible key (default slot < length); slots >= length must be invalid.
  """
  read: object
  length: jax.Array | int
  slots: int
  kv_heads: int
  valid: object = None
