"""The interface every compressed KV-cache format implements, and the one
layer view formats read and write through.

A compressed cache stores, per layer, a few arrays on the key side and a few
on the value side (payload codes, scales, zero points, outliers, residual
buffers...), each 4-D per layer with its slot axis where the dense cache has
it: key-side arrays [B, K, X, S'] (slot axis 3), value-side arrays
[B, K, S', X] (slot axis 2); S' is the slot count (S) or a count of slot
groups or a small buffer's size. The arrays live in two dicts (`k`, `v`),
each entry stacked [L, ...] or a tuple of L arrays, like the dense cache.

A format (a frozen, hashable dataclass built from a parsed policy and the
model config) writes new keys and values into one layer (`View`) and hands
attention the sources it reads block by block (`attention.Blocks`), where it
dequantizes one block at a time: no full-precision copy of a layer is ever
made. New keys arrive laid out as the cache's keys, k [B, K, H, n], values as
v [B, K, n, H], in the compute dtype, RoPE applied (or not, for a format
with `pre_rope`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cache import store
from lctx.cache.segments import Blocks

KEY_AXIS, VALUE_AXIS = 3, 2  # the slot axis of a key-side / value-side array of one layer
_AXIS = {"k": KEY_AXIS, "v": VALUE_AXIS}


@dataclasses.dataclass(frozen=True)
class View:
  """One layer (l) of a compressed cache: k and v are dicts name -> cache array
  (stacked [L, ...] or a tuple of L arrays). Functional: every write returns a
  new View. side: "k" (slot axis 3) or "v" (slot axis 2)."""
  k: dict
  v: dict
  l: object

  def _with(self, side, name, arr):
    d = dict(getattr(self, side))
    d[name] = arr
    return dataclasses.replace(self, **{side: d})

  def size(self, side: str, name: str) -> int:
    """The length of an array's slot axis (no op emitted)."""
    x = getattr(self, side)[name]
    return (x[0] if isinstance(x, tuple) else x[0]).shape[_AXIS[side]]

  def get(self, side: str, name: str) -> jax.Array:
    """The layer's whole array [B, ...]."""
    return store.layer(getattr(self, side)[name], self.l)

  def slots(self, side: str, name: str, lo, n: int) -> jax.Array:
    """Entries [lo, lo + n) along the slot axis."""
    return store.slots(getattr(self, side)[name], self.l, lo, n, _AXIS[side])

  def set(self, side: str, name: str, new) -> "View":
    return self._with(side, name, store.write_layer(getattr(self, side)[name], self.l, new))

  def set_slots(self, side: str, name: str, new, lo) -> "View":
    """Writes `new` (n entries along the slot axis) at [lo, lo + n), every row."""
    return self._with(side, name, store.write_slots(getattr(self, side)[name], self.l, new, lo,
                                                    _AXIS[side]))

  def set_token(self, side: str, name: str, new_b, slots_b) -> "View":
    """Writes row b's entry new_b[b] (no batch or slot axis) at slots_b[b];
    out-of-range slots are dropped (the row writes nothing)."""
    return self._with(side, name, store.write_token(getattr(self, side)[name], self.l, slots_b,
                                                    new_b, _AXIS[side]))


  def set_tokens(self, side: str, name: str, new, slots_bn) -> "View":
    """Writes n entries per row: new (n entries along the slot axis) at slots
    slots_bn [B, n]; out-of-range slots are dropped."""
    return self._with(side, name, store.write_tokens(getattr(self, side)[name], self.l, slots_bn,
                                                     new, _AXIS[side]))


class Format:
  """A compressed cache format. Subclasses are frozen dataclasses with at
  least `num_kv_heads`, `head_dim`, `dtype` (the compute dtype, a str) and
  `spec` (the policy's canonical string, for messages and tables). Each side
  holds an array named "codes"; the value side's has all S slots."""

  pre_rope = False  # keys arrive before RoPE; sources rotate them after dequantization
  slot_multiple = 1  # the capacity must be a multiple of this (e.g. KIVI's key groups)

  def init_layer(self, batch: int, capacity: int) -> tuple[dict, dict]:
    """One layer's empty arrays: (key side, value side), dicts name -> array."""
    raise NotImplementedError

  def write_prefix(self, view: View, k, v, lengths) -> View:
    """Prompt keys k [B, K, H, T] and values v [B, K, T, H] into slots [0, T);
    row b holds lengths[b] real tokens (the rest is padding, overwritten later)."""
    raise NotImplementedError

  def write_chunk(self, view: View, k, v, start, lengths) -> View:
    """A chunk's keys k [B, K, H, C] and values v [B, K, C, H] into slots
    [start, start + C) of every row (start may be traced; rows hold
    lengths[b] real tokens in all, the chunk's later ones may be padding)."""
    raise NotImplementedError

  def write_token(self, view: View, k, v, slots_b) -> View:
    """One new token per row, k and v [B, K, H], at slot slots_b[b]."""
    raise NotImplementedError

  def sources(self, view: View, length, rotate=None) -> list:
    """What attention reads for slots [0, length) ([B] int32 or int): a list
    of attention.Blocks (their union is those slots, each key once).
    rotate(k [B, K, H, n], positions [n]) -> k applies RoPE (pre_rope formats)."""
    raise NotImplementedError

  def bytes_per_token(self) -> float:
    """Physical bytes per token per layer (keys and values, all KV heads), the
    closed form the cache's arrays must match (per-layer constants such as a
    residual buffer are amortised over `capacity` in physical_bytes, not here)."""
    raise NotImplementedError

  def fixed_bytes(self, batch: int) -> int:
    """Physical bytes per layer that do not grow with the capacity (a
    residual window, a per-tensor scale), for `batch` rows."""
    return 0


def nbytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) in a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def unpack_parts(packed, bits: int, axis: int):
  """Bytes [..., n, ...] that hold 8 / bits codes each (code j + p n in bits
  [p bits, (p + 1) bits) of byte j: the channels split into contiguous
  parts) -> uint8 codes [..., n 8 / bits, ...]. The bytes are tiled and
  shifted by a per-channel constant, one fused pointwise pass: a concatenate
  of the shifted parts measured 5x slower in an XLA:CPU decode loop."""
  if bits == 8:
    return packed
  P, n = 8 // bits, packed.shape[axis]
  reps = [1] * packed.ndim
  reps[axis] = P
  shape = [1] * packed.ndim
  shape[axis] = P * n
  shifts = jnp.repeat(jnp.arange(P, dtype=jnp.uint8) * bits, n).reshape(shape)
  return (jnp.tile(packed, reps) >> shifts) & jnp.uint8(2 ** bits - 1)


def round_up_scale(scale_f32, dtype):
  """scale_f32 rounded to `dtype`, never down: x / stored <= x / exact, so
  a code computed with the stored scale never exceeds the range it was sized
  for (the reconstruction error stays within half of the stored step)."""
  stored = scale_f32.astype(dtype)
  up = jnp.nextafter(stored, jnp.asarray(np.inf, dtype))
  return jnp.where(stored.astype(jnp.float32) < scale_f32, up, stored)


class SlotFormat(Format):
  """A format whose every slot is encoded on its own (per-token scales): a
  write encodes the new tokens and stores their entries at their slots; a
  read decodes the block's entries. Subclasses give encode and decode."""

  def encode(self, side: str, x) -> dict:
    """x: keys [B, K, H, n] (side "k") or values [B, K, n, H] ("v") -> dict
    name -> array with n entries along the side's slot axis."""
    raise NotImplementedError

  def decode(self, side: str, entries: dict):
    """The inverse: entries of n slots -> [B, K, H, n] or [B, K, n, H] in the compute dtype."""
    raise NotImplementedError

  def _shape(self, side, batch, n):
    K, H = self.num_kv_heads, self.head_dim
    return (batch, K, H, n) if side == "k" else (batch, K, n, H)

  def init_layer(self, batch: int, capacity: int) -> tuple[dict, dict]:
    def empty(side):
      x = jax.ShapeDtypeStruct(self._shape(side, batch, capacity), self.dtype)
      shapes = jax.eval_shape(lambda x: self.encode(side, x), x)
      return {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
    return empty("k"), empty("v")

  def write_prefix(self, view, k, v, lengths):
    return self.write_chunk(view, k, v, 0, lengths)

  def write_chunk(self, view, k, v, start, lengths):
    for side, x in (("k", k), ("v", v)):
      for name, e in self.encode(side, x).items():
        view = view.set_slots(side, name, e, start)
    return view

  def write_token(self, view, k, v, slots_b):
    for side, x in (("k", k), ("v", v)):
      axis = _AXIS[side]
      for name, e in self.encode(side, jnp.expand_dims(x, axis)).items():
        view = view.set_token(side, name, jnp.squeeze(e, axis), slots_b)
    return view

  def sources(self, view, length, rotate=None):
    names = {side: tuple(getattr(view, side)) for side in ("k", "v")}
    S = view.size("v", "codes")

    def read(lo, n):
      return tuple(self.decode(side, {name: view.slots(side, name, lo, n) for name in names[side]})
                   for side in ("k", "v"))

    return [Blocks(read, length, S, self.num_kv_heads)]
