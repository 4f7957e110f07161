"""The layer loop over a cache that lives in host memory (the `offload`
policy): each layer's cache block is brought to the device one layer ahead
of use, the layer runs on that block, and what it wrote goes back to host.

Static shapes, whole per-layer blocks (every array of the layer: K and V, or
a format's codes and scales). The fetch of layer l + 1 is issued before
layer l's compute and does not depend on it, so a backend with a copy engine
overlaps the two (FlexGen, Sheng et al. 2023, arXiv 2303.06865, sec. 4.1).
Each block crosses the host link once per step: layer 0's before the loop,
layer l + 1's inside iteration l, none after the last layer (it is peeled off
the scan, so no iteration fetches a block nobody reads).

A block is a one-layer stacked cache array [1, B, ...] on the device; the
layer body runs on it with layer index 0, through the same functions as an
on-device cache, so the arithmetic is the same (decode equals on-device
decode bitwise). Write-back: a decode step copies only the slot each row
wrote (a per-slot format: dense, int8, int4); a prefill copies the layer.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lctx.cache import store

DEVICE = jax.memory.Space.Device
_AXIS = {"k": 3, "v": 2}  # a one-layer cache array's slot axis (lctx.cache.store)


def _map(f, side):
  """f over a side's cache arrays: a dense array (or tuple of layers), or a
  format's dict name -> array."""
  return {n: f(x) for n, x in side.items()} if isinstance(side, dict) else f(side)


def _zip(f, side, other):
  if isinstance(side, dict):
    return {n: f(x, other[n]) for n, x in side.items()}
  return f(side, other)


def fetch(host, l):
  """Layer l of host cache arrays (k side, v side) as device blocks [1, ...]."""
  return tuple(_map(lambda x: jax.device_put(store.layer(x, l)[None], DEVICE), side)
               for side in host)


def _to(x, value):
  """value in the memory space of cache array x (one array or a tuple of
  layers): host; the device when a cost analysis traces abstract host
  arrays, whose placement is then in the jit's shardings."""
  return jax.device_put(value, jax.typeof(x[0] if isinstance(x, tuple) else x).memory_space)


def write_back_layer(host, l, block):
  """The whole block back into layer l of the host arrays (a prefill)."""
  return tuple(_zip(lambda x, b: store.write_layer(x, l, _to(x, b[0])), side, blk)
               for side, blk in zip(host, block))


def write_back_slots(host, l, block, start, n: int):
  """Slots [start, start + n) of every row of the block back into layer l of
  the host arrays (a prefill chunk's tokens)."""
  def one(side_name):
    axis = _AXIS[side_name]
    return lambda x, b: store.write_slots(
        x, l, _to(x, store.slots(b, 0, start, n, axis)), start, axis)
  return tuple(_zip(one(name), side, blk) for name, side, blk in zip("kv", host, block))


def write_back_slot(host, l, block, slots):
  """Slot slots[b] of each row b of the block back into layer l of the host
  arrays (a decode step's one token per row; out-of-range slots are clamped
  by dynamic_update_slice, as the engine never lets a row pass its capacity)."""
  def one(side_name):
    axis = _AXIS[side_name]

    def write(x, b):
      for row in range(slots.shape[0]):
        start = [row, 0, 0, 0]
        start[axis] = slots[row]
        size = list(b.shape[1:])
        size[0], size[axis] = 1, 1
        entry = _to(x, jax.lax.dynamic_slice(b[0], start, size))
        if isinstance(x, tuple):
          x = x[:l] + (jax.lax.dynamic_update_slice(x[l], entry, start),) + x[l + 1:]
        else:
          x = jax.lax.dynamic_update_slice(x, entry[None], [l, *start])
      return x
    return write
  return tuple(_zip(one(name), side, blk) for name, side, blk in zip("kv", host, block))


def layer_loop(layers, carry, host, body: Callable, write_back: Callable):
  """Runs body(layer_params, l, carry, block) -> (carry, block) over the
  layers of a host-resident cache `host` = (k side, v side) (stacked [L, ...]
  or tuples of L arrays, in host memory), fetching layer l + 1's block while
  layer l runs; write_back(host, l, block) -> host after each layer.
  Returns (carry, host)."""
  if isinstance(layers, (tuple, list)):
    L = len(layers)
    block = fetch(host, 0)
    for l, lp in enumerate(layers):
      nxt = fetch(host, l + 1) if l + 1 < L else None
      carry, block = body(lp, l, carry, block)
      host, block = write_back(host, l, block), nxt
    return carry, host

  L = jax.tree.leaves(layers)[0].shape[0]
  # Layer l's weights by index, as scan would slice them: slicing the stack
  # to its first L - 1 layers instead would copy nearly all the weights.
  weights = lambda l: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, l, 0, False), layers)

  def step(c, l):
    carry, host, block = c
    nxt = fetch(host, l + 1)  # issued before this layer's compute, independent of it
    carry, block = body(weights(l), l, carry, block)
    return (carry, write_back(host, l, block), nxt), None

  c = (carry, host, fetch(host, 0))
  if L > 1:
    c, _ = jax.lax.scan(step, c, jnp.arange(L - 1))
  carry, host, block = c
  carry, block = body(weights(L - 1), L - 1, carry, block)
  return carry, write_back(host, L - 1, block)
