"""Grouped-query attention as partial softmaxes merged with the online-softmax rule.

Every attention here produces a `Partial`: the unnormalised output, the running
max and the running sum of exponentials. Partials over disjoint key sets (key
blocks in prefill; later, cache segments or sequence shards) merge exactly, so
compression policies and context parallelism compose without special cases.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf: exp(MASKED - m) underflows to 0 without inf - inf NaNs.
MASKED = -0.7 * float(np.finfo(np.float32).max)


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


def finalize(p: Partial, dtype) -> jax.Array:
  return (p.out / p.sum[..., None]).astype(dtype)


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


def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     block: int = 512) -> jax.Array:
  """Causal self-attention over T tokens, blockwise with an online softmax.

  Only the lower-triangular (query block, key block) pairs are computed: one
  scan walks them row by row with a statically known trip count of
  nb (nb + 1) / 2, so compiled FLOPs are the causal count (plus half of the
  diagonal blocks) and memory grows linearly in T. The G query heads sharing a
  KV head are folded into the rows of one matmul per pair, and only diagonal
  pairs pay for the mask. Returns [B, T, N, H].
  """
  B, T, N, H = q_btnh.shape
  K = k_btkh.shape[2]
  G = N // K
  block = min(block, _round_up(T, 8))
  T_pad = _round_up(T, block)
  nb, M = T_pad // block, G * block
  if T_pad != T:  # padded keys sit after every real query, so causality hides them
    pad = [(0, 0), (0, T_pad - T), (0, 0), (0, 0)]
    q_btnh, k_btkh, v_btkh = (jnp.pad(a, pad) for a in (q_btnh, k_btkh, v_btkh))
  # q: [B, K, nb, M, H] with rows (g, t) of query block i; k, v: [B, K, nb, block, H].
  q = (q_btnh * H ** -0.5).reshape(B, nb, block, K, G, H).transpose(0, 3, 1, 4, 2, 5)
  q = q.reshape(B, K, nb, M, H)
  k = k_btkh.reshape(B, nb, block, K, H).transpose(0, 3, 1, 2, 4)
  v = v_btkh.reshape(B, nb, block, K, H).transpose(0, 3, 1, 2, 4)
  rows, cols = np.tril_indices(nb)  # (0,0), (1,0), (1,1), (2,0), ...: row by row
  diagonal_visible = jnp.tile(jnp.arange(block), G)[:, None] >= jnp.arange(block)[None, :]

  def step(carry, ij):
    acc, out = carry
    i, j = ij
    q_i = jax.lax.dynamic_index_in_dim(q, i, axis=2, keepdims=False)  # [B, K, M, H]
    k_j = jax.lax.dynamic_index_in_dim(k, j, axis=2, keepdims=False)  # [B, K, blk, H]
    v_j = jax.lax.dynamic_index_in_dim(v, j, axis=2, keepdims=False)
    s = jnp.einsum("bkmh,bksh->bkms", q_i, k_j.astype(q_i.dtype),
                   preferred_element_type=jnp.float32)
    s = jax.lax.cond(i == j, lambda s: jnp.where(diagonal_visible, s, MASKED), lambda s: s, s)
    # Online softmax; a row's first pair (j == 0) starts from an empty accumulator.
    first = j == 0
    m = jnp.maximum(s.max(axis=-1), jnp.where(first, MASKED, acc.max))
    p = jnp.exp(s - m[..., None])
    correction = jnp.where(first, 0.0, jnp.exp(acc.max - m))
    o = acc.out * correction[..., None] + jnp.einsum(
        "bkms,bksh->bkmh", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
    acc = Partial(o, m, acc.sum * correction + p.sum(axis=-1))
    # Row i ends with its diagonal pair (i, i): write the finished rows then.
    out = jax.lax.cond(
        i == j, lambda out: jax.lax.dynamic_update_index_in_dim(
            out, finalize(acc, out.dtype), i, axis=2), lambda out: out, out)
    return (acc, out), None

  acc0 = Partial(jnp.zeros((B, K, M, H), jnp.float32), jnp.full((B, K, M), MASKED, jnp.float32),
                 jnp.zeros((B, K, M), jnp.float32))
  (_, out), _ = jax.lax.scan(step, (acc0, jnp.zeros_like(q)),
                             (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)))
  out = out.reshape(B, K, nb, G, block, H).transpose(0, 2, 4, 1, 3, 5)
  return out.reshape(B, T_pad, N, H)[:, :T]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m
