"""Reads and writes of one layer of a cache array, in place, for both layouts.

A cache array is either stacked, [L, B, ...] (the scanned layer loop), or a
tuple of L arrays [B, ...] (the unrolled loop, where each layer's buffer is
read and written in place with no slicing copies). Per layer, every cache
array is 4-D with its slot axis at 3 (key-side arrays, [B, K, X, S]) or 2
(value-side arrays, [B, K, S, X]); `seq_axis` below is that per-layer axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer(kv, l):
  """Layer l's array [B, ...] (l a Python int or traced for the stacked layout)."""
  if isinstance(kv, tuple):
    return kv[l]
  return jax.lax.dynamic_index_in_dim(kv, l, axis=0, keepdims=False)


def write_layer(kv, l, new):
  """Replaces layer l's whole array with `new` (its shape and dtype), in place."""
  if isinstance(kv, tuple):
    return kv[:l] + (new,) + kv[l + 1:]
  return jax.lax.dynamic_update_slice(kv, new[None], (l,) + (0,) * new.ndim)


def write_prefix(kv, l, new):
  """Writes slots [0, T) of layer l (every row) in place; new is laid out as the cache."""
  if isinstance(kv, tuple):
    return kv[:l] + (jax.lax.dynamic_update_slice(kv[l], new, (0,) * new.ndim),) + kv[l + 1:]
  return jax.lax.dynamic_update_slice(kv, new[None], (l,) + (0,) * new.ndim)


def write_slots(kv, l, new, start, seq_axis: int):
  """Writes slots [start, start + n) of layer l (every row) in place; new is
  laid out as one layer of the cache with n slots along seq_axis; start may
  be traced, and start + n must not exceed the capacity (dynamic_update_slice
  would clamp)."""
  index = [0] * new.ndim
  index[seq_axis] = start
  if isinstance(kv, tuple):
    return kv[:l] + (jax.lax.dynamic_update_slice(kv[l], new, tuple(index)),) + kv[l + 1:]
  return jax.lax.dynamic_update_slice(kv, new[None], (l, *index))


def slots(kv, l, start, n: int, seq_axis: int):
  """Slots [start, start + n) of layer l (every row), laid out as one layer
  of the cache; start may be traced."""
  if isinstance(kv, tuple):
    return jax.lax.dynamic_slice_in_dim(kv[l], start, n, seq_axis)
  index = [l] + [0] * (kv.ndim - 1)
  index[seq_axis + 1] = start
  size = list(kv.shape)
  size[0], size[seq_axis + 1] = 1, n
  return jax.lax.dynamic_slice(kv, index, size)[0]


def write_token(kv, l, slots_b, new_b, seq_axis: int):
  """Writes row b's new entry new_b[b] (the layer's array without its batch
  and slot axes) at slot slots_b[b] of layer l, in place.

  Out-of-range slots are dropped, never clamped onto a valid slot (callers
  check capacity before the step; a row that should not write passes an
  out-of-range slot).
  """
  capacity = (kv[l] if isinstance(kv, tuple) else kv).shape[seq_axis - 4]
  # Negative indices would wrap around (numpy style) before "drop" applies.
  slots_b = jnp.where(slots_b < 0, capacity, slots_b)
  rows = jnp.arange(slots_b.shape[0])
  if rows.shape[0] == 1:
    # XLA rewrites a one-update scatter into a dynamic-update-slice, which the CPU
    # backend then duplicates into its readers and copies the whole cache layer
    # every step. A second, identical update keeps it a scatter, updated in place.
    rows, slots_b, new_b = (jnp.concatenate([a, a]) for a in (rows, slots_b, new_b))
  index = [rows, slice(None), slice(None), slice(None)]
  index[seq_axis] = slots_b
  if isinstance(kv, tuple):
    one = kv[l].at[tuple(index)].set(new_b, mode="drop")
    return kv[:l] + (one,) + kv[l + 1:]
  return kv.at[(l, *index)].set(new_b, mode="drop")


def write_tokens(kv, l, slots_bn, new, seq_axis: int):
  """Writes n entries per row: new (one layer's layout with n entries along
  seq_axis) at slots slots_bn[b, i] of row b, layer l, in place.
  Out-of-range slots (negative or >= the axis length) are dropped, so a row
  or an entry that should not be written passes an out-of-range slot."""
  capacity = (kv[l] if isinstance(kv, tuple) else kv).shape[seq_axis - 4]
  slots_bn = jnp.where(slots_bn < 0, capacity, slots_bn)
  B, n = slots_bn.shape
  # Move the slot axis next to the batch axis: new[b, i, ...] goes to [b, ..., slot, ...].
  entries = jnp.moveaxis(new, seq_axis, 1)  # [B, n, rest...]
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, n))
  index = [rows, slice(None), slice(None), slice(None)]
  index[seq_axis] = slots_bn
  # Advanced indices (rows, slots) separated by slices put their [B, n] dims first.
  if isinstance(kv, tuple):
    one = kv[l].at[tuple(index)].set(entries, mode="drop")
    return kv[:l] + (one,) + kv[l + 1:]
  return kv.at[(l, *index)].set(entries, mode="drop")
