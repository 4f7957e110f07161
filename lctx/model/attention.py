"""Grouped-query attention over key segments, merged with the online-softmax rule.

Every attention here produces a `Partial`: the unnormalised output, the running
max and the running sum of exponentials. Partials over disjoint key sets merge
exactly (`merge`; across devices `merge_across`), so a query's keys may come
from several *segments*, each attended on its own and merged once (`attend`).
This is the one seam where KV-cache layouts plug in: the dense cache is one
segment, the chunk being prefilled another; quantized blocks, full-precision
residual windows, host-resident blocks and evicted-and-compacted buffers are
further segment types, with nothing special inside the attention code.

The segment contract. A segment is any object with

    partial(q_btnh) -> Partial

  q_btnh  [B, T, N, H] queries (RoPE applied, not yet scaled), the compute dtype;
  returns Partial(out [B, T, N, H] fp32, max [B, T, N] fp32, sum [B, T, N] fp32),
          query head n reading KV head n // (N / K) (grouped-query attention).

It owns its keys and values (or whatever yields scores: a quantized segment
dequantizes a block, or scores it directly) and decides which of its keys
each query may see: from a validity mask (filled slots), the keys' original
positions (causality; an evicted-and-compacted buffer stores them), or both.
Rules: scores are q . k / sqrt(H) accumulated in fp32 (keys cast to q's dtype
for the product, `preferred_element_type` fp32); probabilities are cast to
the values' dtype for the second product, accumulated in fp32; a key a query
may not see contributes exactly 0 (MASKED before the max, and a zeroed
probability), so a segment with no visible key for a query yields
(0, MASKED, 0) for it, the identity of `merge`. Every query must see at least
one key over all segments (causal attention always sees itself).

Three segment types exist:
  SourceSegment the slots of a `lctx.cache.segments.Blocks` source, read
                block by block through the source's `read(lo, n)` (a
                compressed cache dequantizes one block there: no
                full-precision copy of a layer) with its own visibility;
                queries in tiles, a loop over the filled blocks only; a
                traced length makes the loop's trip count traced too (see
                TRIPS_SCOPE).
  CacheSegment  slots [0, length) of a dense cache layer ([B, K, H, S] keys,
                [B, K, S, H] values): a SourceSegment reading the cache
                buffer in place.
  ChunkSegment  the keys of the queries' own tokens, causally: the lower
                triangle of block pairs (causal_attention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cache.segments import Blocks

# Finite stand-in for -inf: exp(MASKED - m) underflows to 0 without inf - inf NaNs.
MASKED = -0.7 * float(np.finfo(np.float32).max)
# A scan's trip count and loop counter are int32.
_MAX_TRIP_COUNT = int(np.iinfo(np.int32).max)
# The name scope of the attention cores (in every op_name they emit): the cost
# model counts what runs under it as one fused attention kernel per call, as a
# GPU server runs it (lctx.cost.kernels), and costs it with attention's
# efficiency (lctx.cost.calibrated).
SCOPE = "lctx_attention"
# The name scope of a compressed cache's write (quantize and store the new
# keys and values): counted as one kernel per call, as serving engines fuse
# it (vLLM's reshape_and_cache quantizes and writes K and V in one kernel).
WRITE_SCOPE = "lctx_kv_write"


def _scoped(fn):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.named_scope(SCOPE):
      return fn(*args, **kwargs)
  return wrapped


class Partial(NamedTuple):
  """Softmax attention over a subset of keys, before normalisation.

  out: [..., H] fp32, sum_s exp(score_s - max) * v_s
  max: [...] fp32, the running max of the scores
  sum: [...] fp32, sum_s exp(score_s - max)
  """
  out: jax.Array
  max: jax.Array
  sum: jax.Array


def merge(a: Partial, b: Partial) -> Partial:
  """Online-softmax merge of attention over two disjoint key sets."""
  m = jnp.maximum(a.max, b.max)
  ca, cb = jnp.exp(a.max - m), jnp.exp(b.max - m)
  return Partial(a.out * ca[..., None] + b.out * cb[..., None], m, a.sum * ca + b.sum * cb)


def merge_across(p: Partial, axis_name: str, scatter_axis: int | None = None) -> Partial:
  """The online-softmax merge of the partials held by every device along a
  mesh axis (flash-decoding across devices): rescale each to the global max,
  then sum. Called inside shard_map. scatter_axis: a query axis of p.max
  (and of p.out) split evenly over the devices after the merge: device r
  keeps its r-th block of queries (a reduce-scatter instead of an all-reduce,
  for queries gathered from every device)."""
  m = jax.lax.pmax(p.max, axis_name)
  scale = jnp.exp(p.max - m)
  out, total = p.out * scale[..., None], p.sum * scale
  if scatter_axis is None:
    return Partial(jax.lax.psum(out, axis_name), m, jax.lax.psum(total, axis_name))
  n = m.shape[scatter_axis] // jax.lax.axis_size(axis_name)
  scatter = lambda x: jax.lax.psum_scatter(x, axis_name, scatter_dimension=scatter_axis,
                                           tiled=True)
  return Partial(scatter(out), jax.lax.dynamic_slice_in_dim(
      m, jax.lax.axis_index(axis_name) * n, n, scatter_axis), scatter(total))


def finalize(p: Partial, dtype) -> jax.Array:
  return (p.out / p.sum[..., None]).astype(dtype)


# Loops whose trip count is only known at run time (a CacheSegment's block
# loop over a traced length) declare the trip count the cost model should
# charge, averaged over the program's executions of the loop, as the name
# scope "lctx_trips=<n>" around the loop: lctx.cost.hlo reads it from the
# while op's op_name when XLA has no known_trip_count. Costs are linear in a
# loop's trips, so the mean gives the exact total.
TRIPS_SCOPE = "lctx_trips"


@dataclasses.dataclass(frozen=True)
class CacheSegment:
  """Slots [0, length) of one layer of a dense KV cache, as a segment.

  k: keys [B, K, H, S], or the stacked cache [L, B, K, H, S] with `layer`.
  v: values [B, K, S, H], or [L, B, K, S, H] with `layer`.
  length: [B] or scalar int32, the visible slots of each row (the first ones).
  layer: the layer to read from a stacked cache (int or traced), else None.
  block: keys scored per step (at most S); blocks are read from the cache
    buffer in place, so nothing here grows with S but the loop's trip count.
  trips: the trip count to charge when length is traced and more than one
    block may run (TRIPS_SCOPE); a ValueError otherwise, so the cost model
    never silently charges one trip.
  """
  k: jax.Array
  v: jax.Array
  length: jax.Array | int
  layer: jax.Array | int | None = None
  block: int = 512
  trips: float | None = None

  def partial(self, q_btnh: jax.Array) -> Partial:
    K, S = self.v.shape[-3], self.v.shape[-2]

    def read(x, lo, blk, axis):  # slots [lo, lo + blk) of one layer (axis: its slot axis)
      if self.layer is None:
        return jax.lax.dynamic_slice_in_dim(x, lo, blk, axis)
      starts, size = [self.layer, 0, 0, 0, 0], list(x.shape)
      starts[axis + 1], size[0], size[axis + 1] = lo, 1, blk
      return jax.lax.dynamic_slice(x, starts, size)[0]

    source = Blocks(lambda lo, n: (read(self.k, lo, n, 3), read(self.v, lo, n, 2)),
                    self.length, S, K)
    return SourceSegment(source, self.block, self.trips).partial(q_btnh)


def cache_segment(kv_k, kv_v, l, length, block: int, trips: float | None = None) -> CacheSegment:
  """Layer l's cache slots [0, length) as a segment, read from the cache
  buffers in place, for either layout (stacked [L, ...] or a tuple of layers)."""
  if isinstance(kv_k, tuple):
    return CacheSegment(kv_k[l], kv_v[l], length, None, block, trips)
  return CacheSegment(kv_k, kv_v, length, l, block, trips)


@dataclasses.dataclass(frozen=True)
class SourceSegment:
  """A segment over the slots of a `Blocks` source: the queries in tiles, each
  looping over the filled key blocks (only those below max(length) run).
  block: keys scored per step (at most S). trips: the trip count to charge
  when length is traced and more than one block may run (TRIPS_SCOPE); a
  ValueError otherwise, so the cost model never silently charges one trip."""
  source: Blocks
  block: int = 512
  trips: float | None = None

  @_scoped
  def partial(self, q_btnh: jax.Array) -> Partial:
    B, T, N, H = q_btnh.shape
    src = self.source
    K, S = src.kv_heads, src.slots
    G, blk = N // K, min(self.block, S)
    # Queries in tiles of qb tokens (all G heads of a KV head as rows of one
    # matmul), each against the key blocks in turn: a tile's scores stay
    # cache-sized (whole chunks against a block measured ~20% slower on CPU).
    # Rows (g, t), the head major (as causal_attention's): when the model axis
    # exceeds K, G is split over model_rep (lctx.sharding.Plan), and only a
    # major factor of the merged rows keeps that split; rows (t, g) made the
    # partitioner replicate the whole segment over model_rep.
    nq = -(-T // self.block)
    qb = min(_round_up(-(-T // nq), 8), T)  # even tiles: a short chunk pads at most 7 rows a tile
    q = jnp.pad(q_btnh, [(0, 0), (0, nq * qb - T), (0, 0), (0, 0)])
    q = q.reshape(B, nq, qb, K, G, H).transpose(1, 0, 3, 4, 2, 5).reshape(nq, B, K, G * qb, H)
    length = jnp.broadcast_to(jnp.asarray(src.length, jnp.int32), (B,))

    def one_block(q, j):  # q: [B, K, M, H], one tile; j: a key block
      # The last block may overlap the one before it (S not a multiple of blk):
      # its start is clamped and the slots already seen are hidden.
      lo = jnp.minimum(j * blk, S - blk)
      slot = lo + jnp.arange(blk)
      shown = (slot[None, :] < length[:, None]) if src.valid is None else src.valid(slot)
      visible = ((slot >= j * blk)[None, :] & shown)[:, None, None]
      k, v = src.read(lo, blk)
      s = jnp.einsum("bkmh,bkhs->bkms", q, k.astype(q.dtype),
                     preferred_element_type=jnp.float32) * (H ** -0.5)
      s = jnp.where(visible, s, MASKED)
      m = s.max(axis=-1)
      p = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)
      out = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), v,
                       preferred_element_type=jnp.float32)
      return Partial(out, m, p.sum(axis=-1))

    n_blocks = -(-S // blk)
    static = isinstance(src.length, int)
    if static:
      n_blocks = -(-min(max(src.length, 0), S) // blk)
    elif n_blocks > 1 and self.trips is None:
      raise ValueError("a segment over a traced length with more than one block "
                       "needs trips= (the block count the cost model charges)")
    bound = n_blocks if static else jnp.minimum((length.max() + blk - 1) // blk, n_blocks)

    def tile(q):
      if n_blocks == 1:
        return one_block(q, 0)
      acc = Partial(jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], MASKED, jnp.float32),
                    jnp.zeros(q.shape[:-1], jnp.float32))
      with jax.named_scope(f"{TRIPS_SCOPE}={float(n_blocks if static else self.trips)!r}"):
        return jax.lax.fori_loop(0, bound, lambda j, acc: merge(acc, one_block(q, j)), acc)

    if n_blocks == 0:  # nothing visible: merge's identity
      return Partial(jnp.zeros(q_btnh.shape, jnp.float32),
                     jnp.full(q_btnh.shape[:-1], MASKED, jnp.float32),
                     jnp.zeros(q_btnh.shape[:-1], jnp.float32))
    part = jax.tree.map(lambda x: x[None], tile(q[0])) if nq == 1 else jax.lax.map(tile, q)
    # [nq, B, K, (g, t), ...] -> [B, T, N = (k, g), ...]
    rows = lambda x: x.reshape(nq, B, K, G, qb, -1).transpose(1, 0, 4, 2, 3, 5).reshape(
        B, nq * qb, N, -1)[:, :T]
    return Partial(rows(part.out), rows(part.max[..., None])[..., 0],
                   rows(part.sum[..., None])[..., 0])


@dataclasses.dataclass(frozen=True)
class ChunkSegment:
  """The keys of the queries' own tokens, causally: k, v [B, Tk, K, H].

  q_offset None: the queries are exactly these Tk tokens (the triangle walk of
  causal_attention, exact causal FLOPs). Otherwise the queries are a shard of
  them starting at token q_offset (sequence parallelism: the rectangle walk,
  hidden block pairs skipped at run time by a cond).
  """
  k: jax.Array
  v: jax.Array
  block: int = 512
  q_offset: jax.Array | int | None = None

  def partial(self, q_btnh: jax.Array) -> Partial:
    return causal_attention(q_btnh, self.k, self.v, self.block, self.q_offset,
                            normalize=False)


def attend(q_btnh: jax.Array, segments) -> Partial:
  """Attention of queries [B, T, N, H] over the union of `segments` (see the
  module docstring): each segment's Partial, merged once."""
  if not segments:
    raise ValueError("attend needs at least one segment")
  return functools.reduce(merge, (seg.partial(q_btnh) for seg in segments))


@_scoped
def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     block: int = 512, q_offset: jax.Array | None = None,
                     normalize: bool = True) -> jax.Array | Partial:
  """Causal attention, blockwise with an online softmax. Returns [B, Tq, N, H]
  in q's dtype, or with normalize=False the Partial (out [B, Tq, N, H], max and
  sum [B, Tq, N], fp32) for merging with other segments.

  Self-attention (q_offset None, Tq = Tk): only the lower-triangular (query
  block, key block) pairs are computed: one scan walks them row by row with a
  statically known trip count of nb (nb + 1) / 2, so compiled FLOPs are the
  causal count (plus half of the diagonal blocks) and memory grows linearly in
  T. A shard of queries (q_offset = position of q's first token, keys from 0):
  the scan walks the full rectangle and skips fully hidden pairs with a cond.
  The G query heads sharing a KV head are folded into the rows of one matmul
  per pair, and only pairs that straddle the diagonal pay for the mask.
  The pair count must fit the scan's int32 trip count (with 512-token blocks,
  up to 33.5M tokens of self-attention): beyond, a ValueError names the
  smallest block that fits, while tracing (nothing is compiled).
  """
  B, Tq, N, H = q_btnh.shape
  Tk, K = k_btkh.shape[1], k_btkh.shape[2]
  G = N // K
  block = min(block, _round_up(Tq, 8))
  Tq_pad, Tk_pad = _round_up(Tq, block), _round_up(Tk, block)
  nbq, nbk, M = Tq_pad // block, Tk_pad // block, G * block
  # Padded keys sit after every real query, so causality hides them.
  q_btnh = jnp.pad(q_btnh, [(0, 0), (0, Tq_pad - Tq), (0, 0), (0, 0)])
  k_btkh, v_btkh = (jnp.pad(a, [(0, 0), (0, Tk_pad - Tk), (0, 0), (0, 0)]) for a in (k_btkh, v_btkh))
  # q: [B, K, nbq, M, H] with rows (g, t) of query block i; k, v: [B, K, nbk, block, H].
  q = (q_btnh * H ** -0.5).reshape(B, nbq, block, K, G, H).transpose(0, 3, 1, 4, 2, 5)
  q = q.reshape(B, K, nbq, M, H)
  k = k_btkh.reshape(B, nbk, block, K, H).transpose(0, 3, 1, 2, 4)
  v = v_btkh.reshape(B, nbk, block, K, H).transpose(0, 3, 1, 2, 4)
  triangle = q_offset is None
  if triangle:
    q_offset = 0
  # Block pairs walked row by row, (0,0), (1,0), (1,1), (2,0), ... for the
  # triangle; (i, j) advance in the scan's carry, so nothing grows with T^2
  # outside the device loop (an index table of nb^2 pairs was 3.5 TiB of host
  # memory at 1e9 tokens).
  steps = _block_pairs(Tq, Tk, block, triangle)
  if steps > _MAX_TRIP_COUNT:
    raise ValueError(
        f"causal attention over {Tq:,} queries and {Tk:,} keys in blocks of {block} walks "
        f"{steps:,} block pairs, more than a scan's int32 trip count allows "
        f"({_MAX_TRIP_COUNT:,}); use a block of at least {_min_block(Tq, Tk, triangle)} tokens")
  row_pos = jnp.tile(jnp.arange(block), G)  # position within the block of each of the M rows

  def attend(acc, i, j):
    q_i = jax.lax.dynamic_index_in_dim(q, i, axis=2, keepdims=False)  # [B, K, M, H]
    k_j = jax.lax.dynamic_index_in_dim(k, j, axis=2, keepdims=False)  # [B, K, blk, H]
    v_j = jax.lax.dynamic_index_in_dim(v, j, axis=2, keepdims=False)
    s = jnp.einsum("bkmh,bksh->bkms", q_i, k_j.astype(q_i.dtype),
                   preferred_element_type=jnp.float32)
    q_lo, k_lo = q_offset + i * block, j * block
    visible = (q_lo + row_pos)[:, None] >= (k_lo + jnp.arange(block))[None, :]
    s = jax.lax.cond(k_lo + block - 1 > q_lo, lambda s: jnp.where(visible, s, MASKED),
                     lambda s: s, s)
    # Online softmax; a row's first pair (j == 0, never hidden) starts afresh.
    first = j == 0
    m = jnp.maximum(s.max(axis=-1), jnp.where(first, MASKED, acc.max))
    p = jnp.exp(s - m[..., None])
    correction = jnp.where(first, 0.0, jnp.exp(acc.max - m))
    o = acc.out * correction[..., None] + jnp.einsum(
        "bkms,bksh->bkmh", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
    return Partial(o, m, acc.sum * correction + p.sum(axis=-1))

  def step(carry, _):
    acc, out, i, j = carry
    is_last = j == (i if triangle else nbk - 1)  # the final pair of row i
    if triangle:  # every pair has visible keys
      acc = attend(acc, i, j)
    else:
      hidden = j * block > q_offset + i * block + block - 1
      acc = jax.lax.cond(hidden, lambda a: a, lambda a: attend(a, i, j), acc)
    done = finalize(acc, q.dtype) if normalize else acc  # outside the cond: same FLOPs
    out = jax.lax.cond(is_last, lambda out: jax.tree.map(
        lambda o, d: jax.lax.dynamic_update_index_in_dim(o, d, i, axis=2), out, done),
        lambda out: out, out)
    i, j = jnp.where(is_last, i + 1, i), jnp.where(is_last, 0, j + 1)
    return (acc, out, i, j), None

  acc0 = Partial(jnp.zeros((B, K, M, H), jnp.float32), jnp.full((B, K, M), MASKED, jnp.float32),
                 jnp.zeros((B, K, M), jnp.float32))
  zero = jnp.zeros((), jnp.int32)
  out0 = jnp.zeros_like(q) if normalize else jax.tree.map(
      lambda a: jnp.zeros((B, K, nbq, *a.shape[2:]), a.dtype), acc0)
  (_, out, _, _), _ = jax.lax.scan(step, (acc0, out0, zero, zero), None, length=steps)
  # [B, K, nbq, (g, t), ...] -> [B, Tq, N = (k, g), ...]
  rows = lambda x: x.reshape(B, K, nbq, G, block, -1).transpose(0, 2, 4, 1, 3, 5).reshape(
      B, Tq_pad, N, -1)[:, :Tq]
  if normalize:
    return rows(out)
  return Partial(rows(out.out), rows(out.max[..., None])[..., 0], rows(out.sum[..., None])[..., 0])


def _block_pairs(Tq: int, Tk: int, block: int, triangle: bool) -> int:
  """Steps of causal_attention's scan: the lower triangle of nb x nb block
  pairs, or the whole nbq x nbk rectangle (Python ints: nothing allocated)."""
  nbq, nbk = -(-Tq // block), -(-Tk // block)
  return nbq * (nbq + 1) // 2 if triangle else nbq * nbk


def _min_block(Tq: int, Tk: int, triangle: bool) -> int:
  """The smallest block (a multiple of 8) whose scan fits an int32 trip count."""
  block = _round_up(max(math.isqrt(Tq * Tk // (2 if triangle else 1) // _MAX_TRIP_COUNT), 1), 8)
  while _block_pairs(Tq, Tk, block, triangle) > _MAX_TRIP_COUNT:
    block += 8
  return block


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m
