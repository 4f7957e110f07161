"""Grouped-query attention as partial softmaxes merged with the online-softmax rule.

Every attention here produces a `Partial`: the unnormalised output, the running
max and the running sum of exponentials. Partials over disjoint key sets (key
blocks in prefill; later, cache segments or sequence shards) merge exactly, so
compression policies and context parallelism compose without special cases.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf: exp(MASKED - m) underflows to 0 without inf - inf NaNs.
MASKED = -0.7 * float(np.finfo(np.float32).max)
# A scan's trip count and loop counter are int32.
_MAX_TRIP_COUNT = int(np.iinfo(np.int32).max)
# The name scope of the attention cores (in every op_name they emit): the cost
# model counts what runs under it as one fused attention kernel per call, as a
# GPU server runs it (lctx.cost.kernels), and costs it with attention's
# efficiency (lctx.cost.calibrated).
SCOPE = "lctx_attention"


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


def merge_across(p: Partial, axis_name: str) -> Partial:
  """The online-softmax merge of the partials held by every device along a
  mesh axis (flash-decoding across devices): rescale each to the global max,
  then sum. Called inside shard_map."""
  m = jax.lax.pmax(p.max, axis_name)
  scale = jnp.exp(p.max - m)
  return Partial(jax.lax.psum(p.out * scale[..., None], axis_name), m,
                 jax.lax.psum(p.sum * scale, axis_name))


def finalize(p: Partial, dtype) -> jax.Array:
  return (p.out / p.sum[..., None]).astype(dtype)


@_scoped
def decode_attention(q_bkgh: jax.Array, k_bkhs: jax.Array, v_bksh: jax.Array,
                     valid_bs: jax.Array) -> Partial:
  """One query token per row against a cache of keys [B, K, H, S], values [B, K, S, H].

  Both products are then plain batched matmuls over (b, k) whose large operand
  is contiguous along the output: on CPU, keys laid out [B, K, S, H] made
  q @ k^T about 2x slower (measured in experiments/bench_decode).
  valid_bs: [B, S] bool, which cache slots this row may attend to.
  """
  H = q_bkgh.shape[-1]
  s = jnp.einsum("bkgh,bkhs->bkgs", q_bkgh, k_bkhs.astype(q_bkgh.dtype),
                 preferred_element_type=jnp.float32) * (H ** -0.5)
  s = jnp.where(valid_bs[:, None, None, :], s, MASKED)
  m = s.max(axis=-1)
  p = jnp.exp(s - m[..., None])
  out = jnp.einsum("bkgs,bksh->bkgh", p.astype(v_bksh.dtype), v_bksh,
                   preferred_element_type=jnp.float32)
  return Partial(out, m, p.sum(axis=-1))


@_scoped
def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     block: int = 512, q_offset: jax.Array | None = None) -> jax.Array:
  """Causal attention, blockwise with an online softmax. Returns [B, Tq, N, H].

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
    done = finalize(acc, out.dtype)  # outside the cond: its branches differ only in bytes
    out = jax.lax.cond(is_last, lambda out: jax.lax.dynamic_update_index_in_dim(
        out, done, i, axis=2), lambda out: out, out)
    i, j = jnp.where(is_last, i + 1, i), jnp.where(is_last, 0, j + 1)
    return (acc, out, i, j), None

  acc0 = Partial(jnp.zeros((B, K, M, H), jnp.float32), jnp.full((B, K, M), MASKED, jnp.float32),
                 jnp.zeros((B, K, M), jnp.float32))
  zero = jnp.zeros((), jnp.int32)
  (_, out, _, _), _ = jax.lax.scan(step, (acc0, jnp.zeros_like(q), zero, zero), None,
                                   length=steps)
  out = out.reshape(B, K, nbq, G, block, H).transpose(0, 2, 4, 1, 3, 5)
  return out.reshape(B, Tq_pad, N, H)[:, :Tq]


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
