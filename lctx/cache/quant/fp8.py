"""FP8 KV cache: float8 codes with a scale fixed by the first write.

As vLLM's kv_cache_dtype=fp8_e4m3 / fp8_e5m2 (with dynamically computed
scales): each element is stored as one float8 number, code = fp8(clip(x /
scale, -fmax, fmax)), read back as code * scale. The format is
float8_e4m3fn (3 mantissa bits, max 448, no inf: an out-of-range cast is
NaN, hence the clip before it) or float8_e5m2 (2 mantissa bits, max 57344).
Rounding to nearest gives a relative error of at most 2^-4 (e4m3) or 2^-3
(e5m2) for a scaled value in the normal range, and at most half the
smallest subnormal step (2^-10 or 2^-17, times the scale) below it.

Scales (float32, keys and values separately): one per row and layer
(`scale=tensor`, [B, 1, 1, 1]) or one per row, layer and KV head
(`scale=head`, [B, K, 1, 1]). A scale is set by the first write whose real
tokens (slots below the row's length; padding excluded) have a nonzero
amax: scale = amax / fmax (computed as amax * float32(1 / fmax)), so the
prompt's largest element maps to fmax. Later writes reuse it, and a later
element beyond amax saturates at +-fmax * scale (never inf or NaN). A
stored scale of 0 means "not set yet"; until it is set every code is 0 (the
real tokens written so far were all zero). With a chunked prefill the first
chunk sets it.

Arrays per layer: keys "codes" [B, K, H, S] and "scale"; values "codes"
[B, K, S, H] and "scale". The codes are float8 numbers stored as their bit
patterns, uint8 (lax.bitcast_convert_type on the way in and out): XLA's CPU
backend has no float8 arithmetic and converts a whole float8 array to
float16 around every scatter and slice of it (a decode step then held about
half a dense cache in temporaries); uint8 writes in place and a read converts
one block. One byte per element: 2 K H bytes per token, the scales a fixed
cost per row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lctx.cache.quant.base import KEY_AXIS, VALUE_AXIS, Format, View
from lctx.cache.segments import Blocks

_DTYPE = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
_SLOT = {"k": KEY_AXIS, "v": VALUE_AXIS}  # the slot axis of a side's [B, K, ., .] array


@dataclasses.dataclass(frozen=True)
class Fp8(Format):
  num_kv_heads: int
  head_dim: int
  dtype: str  # the compute dtype: what reads return
  scale: str = "tensor"  # "tensor" | "head"
  format: str = "e4m3"  # "e4m3" | "e5m2"
  spec: str = "fp8"

  def __post_init__(self):
    if self.scale not in ("tensor", "head"):
      raise ValueError(f"fp8 scale={self.scale!r}; allowed: tensor, head")
    if self.format not in _DTYPE:
      raise ValueError(f"fp8 format={self.format!r}; allowed: e4m3, e5m2")

  @property
  def code_dtype(self):
    return _DTYPE[self.format]

  @property
  def fmax(self) -> float:
    """The largest finite code: 448 (e4m3fn) or 57344 (e5m2)."""
    return float(jnp.finfo(self.code_dtype).max)

  def _scale_shape(self, batch):
    return (batch, self.num_kv_heads if self.scale == "head" else 1, 1, 1)

  def init_layer(self, batch, capacity):
    K, H = self.num_kv_heads, self.head_dim
    scale = lambda: jnp.zeros(self._scale_shape(batch), jnp.float32)  # two buffers: both donated
    return ({"codes": jnp.zeros((batch, K, H, capacity), jnp.uint8), "scale": scale()},
            {"codes": jnp.zeros((batch, K, capacity, H), jnp.uint8), "scale": scale()})

  # ---- encoding ------------------------------------------------------------------

  def _amax(self, x, real):
    """The amax of x [B, K, ., .] over its real entries (real broadcasts
    against x), per row ([B, 1, 1, 1]) or per row and KV head ([B, K, 1, 1])."""
    a = jnp.where(real, jnp.abs(x.astype(jnp.float32)), 0.0)
    return a.max(axis=(1, 2, 3) if self.scale == "tensor" else (2, 3), keepdims=True)

  def encode(self, x, scale):
    """x [B, K, ., .] (any float dtype) with scale (float32, broadcasting
    against x; 0 = unset) -> the float8 codes' bit patterns (uint8), x's shape."""
    s = scale.astype(jnp.float32)
    y = jnp.where(s > 0, x.astype(jnp.float32) / jnp.where(s > 0, s, 1.0), 0.0)
    codes = jnp.clip(y, -self.fmax, self.fmax).astype(self.code_dtype)
    return jax.lax.bitcast_convert_type(codes, jnp.uint8)

  def decode(self, codes, scale):
    """Stored codes (uint8 bit patterns) * scale (in float32), returned in the compute dtype."""
    x = jax.lax.bitcast_convert_type(codes, self.code_dtype).astype(jnp.float32)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)

  def _update_scale(self, view, side, x, real):
    """The side's scale after a write of x whose real entries are `real`:
    entries still unset (0) take this write's amax / fmax."""
    old = view.get(side, "scale")
    # amax * float32(1 / fmax): what XLA makes of amax / fmax anyway (a division
    # by a constant becomes a product by its reciprocal), written out.
    new = self._amax(x, real) * jnp.float32(1 / self.fmax)
    return jnp.where(old > 0, old, new)

  # ---- writes -----------------------------------------------------------------------

  def write_prefix(self, view, k, v, lengths):
    return self.write_chunk(view, k, v, 0, lengths)

  def write_chunk(self, view, k, v, start, lengths):
    C = v.shape[2]
    real = (start + jnp.arange(C))[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]  # [B, C]
    for side, x, mask in (("k", k, real[:, None, None, :]), ("v", v, real[:, None, :, None])):
      scale = self._update_scale(view, side, x, mask)
      view = view.set(side, "scale", scale)
      view = view.set_slots(side, "codes", self.encode(x, scale), start)
    return view

  def write_token(self, view, k, v, slots_b):
    S = view.size("v", "codes")
    slots_b = jnp.asarray(slots_b, jnp.int32)
    real = ((slots_b >= 0) & (slots_b < S))[:, None, None]  # a dropped token sets no scale
    for side, x in (("k", k), ("v", v)):
      x4 = jnp.expand_dims(x, _SLOT[side])
      scale = self._update_scale(view, side, x4, real[..., None])
      view = view.set(side, "scale", scale)
      codes = jnp.squeeze(self.encode(x4, scale), _SLOT[side])
      view = view.set_token(side, "codes", codes, slots_b)
    return view

  # ---- reads ------------------------------------------------------------------------

  def sources(self, view: View, length, rotate=None):
    S = view.size("v", "codes")
    k_scale, v_scale = view.get("k", "scale"), view.get("v", "scale")

    def read(lo, n):
      return (self.decode(view.slots("k", "codes", lo, n), k_scale),
              self.decode(view.slots("v", "codes", lo, n), v_scale))

    return [Blocks(read, length, S, self.num_kv_heads)]

  # ---- bytes ------------------------------------------------------------------------

  def bytes_per_token(self) -> int:
    return 2 * self.num_kv_heads * self.head_dim  # one byte per element

  def fixed_bytes(self, batch: int) -> int:
    n = batch * (self.num_kv_heads if self.scale == "head" else 1)
    return 2 * n * jnp.dtype(jnp.float32).itemsize


__all__ = ["Fp8"]
