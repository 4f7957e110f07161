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


def decode_attention(q_bkgh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array,
                     valid_bs: jax.Array) -> Partial:
  """One query token per row against a cache laid out [B, K, S, H].

  The [B, K, S, H] layout makes both products plain batched matmuls over (b, k)
  with contiguous operands: no transposed copy of the cache per step.
  valid_bs: [B, S] bool, which cache slots this row may attend to.
  """
  H = q_bkgh.shape[-1]
  s = jnp.einsum("bkgh,bksh->bkgs", q_bkgh, k_bksh.astype(q_bkgh.dtype),
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

  Only the lower-triangular (query block, key block) pairs are computed: a single
  scan walks them in row order with a statically known trip count of
  nb (nb + 1) / 2, so compiled FLOPs are the causal count (plus half of the
  diagonal blocks) and memory grows linearly in T. Returns [B, T, N, H].
  """
  B, T, N, H = q_btnh.shape
  K = k_btkh.shape[2]
  G = N // K
  block = min(block, _round_up(T, 8))
  T_pad = _round_up(T, block)
  nb = T_pad // block
  if T_pad != T:  # padded keys sit after every real query, so causality hides them
    pad = [(0, 0), (0, T_pad - T), (0, 0), (0, 0)]
    q_btnh, k_btkh, v_btkh = (jnp.pad(a, pad) for a in (q_btnh, k_btkh, v_btkh))
  q = q_btnh.reshape(B, nb, block, K, G, H)
  k = k_btkh.reshape(B, nb, block, K, H)
  v = v_btkh.reshape(B, nb, block, K, H)
  rows, cols = np.tril_indices(nb)  # (0,0), (1,0), (1,1), (2,0), ...: row by row
  offsets = jnp.arange(block)

  def step(carry, ij):
    acc, out = carry
    i, j = ij
    q_i = jax.lax.dynamic_index_in_dim(q, i, axis=1, keepdims=False)  # [B, blk, K, G, H]
    k_j = jax.lax.dynamic_index_in_dim(k, j, axis=1, keepdims=False)  # [B, blk, K, H]
    v_j = jax.lax.dynamic_index_in_dim(v, j, axis=1, keepdims=False)
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j,
                   preferred_element_type=jnp.float32) * (H ** -0.5)
    visible = (i * block + offsets)[:, None] >= (j * block + offsets)[None, :]
    s = jnp.where(visible, s, MASKED)
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])
    o = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_j.dtype), v_j,
                   preferred_element_type=jnp.float32)
    fresh = Partial(o, m, p.sum(axis=-1))
    acc = jax.tree.map(lambda a, f: jnp.where(j == 0, f, a), merge(acc, fresh), fresh)
    # Row i's last pair is (i, i); earlier writes of row i are overwritten by it.
    o_i = finalize(acc, q.dtype).transpose(0, 3, 1, 2, 4)  # [B, blk, K, G, H]
    out = jax.lax.dynamic_update_index_in_dim(out, o_i, i, axis=1)
    return (acc, out), None

  acc0 = Partial(jnp.zeros((B, K, G, block, H), jnp.float32),
                 jnp.full((B, K, G, block), MASKED, jnp.float32),
                 jnp.zeros((B, K, G, block), jnp.float32))
  out0 = jnp.zeros_like(q)
  (_, out), _ = jax.lax.scan(step, (acc0, out0),
                             (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)))
  return out.reshape(B, T_pad, N, H)[:, :T]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m
