"""Token eviction: the scorer / selector contract (design: COMPRESSION.md).

A method is a *scorer*: a pure function of what a layer has at hand when it
compresses (the queries of the new tokens, the candidate keys with their
original positions, accumulated scores) that returns a score per candidate,
per KV head [B, K, S] or per layer [B, S] (broadcast to K). One shared
*selector* (`select`) keeps the `n_kept` highest-scoring candidates per
(row, KV head), plus the protected ones (sinks, a recent window, a method's
own, e.g. SnapKV's observation window), with one top-k and one gather into a
fixed-size buffer sorted by original position.

Number kept (kvpress 0.5.5's rule): `max(1, int(T * (1 - ratio)))` for a
row of T tokens, in Python floats (T = 300, ratio 0.9 keeps 29), or
`min(budget, T)` with budget= given. Protected candidates count toward it.
Computed on the host for every T up to the prompt width (`kept_table`), so a
traced row length indexes an exact table instead of redoing the float32 product.

Errors: ValueError from `Method.check_capacity`-style helpers name the knob
and the allowed values; everything here is checked before compiling.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cache.spec import Knob, Policy

# Scores of protected candidates and of empty ones: protected always win the
# top-k, empty ones always lose (finite: no inf - inf in the selector).
PROTECTED = 3.0e38
EMPTY = -3.0e38


def common_knobs(ratio: float = 0.0, sinks: int = 0) -> dict[str, Knob]:
  """The knobs every eviction method takes (kvpress's `compression_ratio`,
  a token budget, attention sinks) and when it evicts."""
  return {
      "ratio": Knob(float, ratio, "fraction of the context removed (kvpress's "
                    "compression_ratio; kept = max(1, int(T * (1 - ratio))))", low=0.0, high=1.0),
      "budget": Knob(int, 0, "tokens kept per row and KV head; 0: from ratio; > 0 overrides "
                     "ratio", low=0),
      "sinks": Knob(int, sinks, "first tokens always kept (attention sinks)", low=0),
  }


DECODE_KNOB = Knob(str, "append", "append: compress the prompt once, then append every new "
                   "token (kvpress's protocol); evict: also evict during decoding, one token in "
                   "and one out at the budget", choices=("append", "evict"))


def n_kept(policy: Policy, T: int) -> int:
  """Tokens kept of a row of T tokens (module docstring); 0 for T = 0."""
  if T <= 0:
    return 0
  if policy["budget"]:
    return min(policy["budget"], T)
  return max(1, int(T * (1 - policy["ratio"])))


def kept_table(policy: Policy, T: int) -> np.ndarray:
  """int32 [T + 1]: n_kept(policy, t) for t = 0..T (indexed by traced lengths)."""
  return np.array([n_kept(policy, t) for t in range(T + 1)], np.int32)


def hash_uniform(seed: int, *ints) -> jax.Array:
  """Uniform floats in (0, 1), float32, one per element of the broadcast int
  arrays `ints`, from a counter-based hash (lowbias32 mixing, Chris Wellons'
  hash-prospector) of (seed, *ints). The same (seed, ints) give the same
  value whatever the array layout, so a chunked prefill draws exactly what a
  one-pass prefill draws; tests/np_eviction.py reimplements it in numpy."""
  h = jnp.uint32(seed) * jnp.uint32(0x9E3779B9)
  for x in ints:
    h = _mix(h ^ (jnp.asarray(x).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))
  # 23 bits: (code + 0.5) * 2**-23 is exact in float32, so u < 1 and u > 0
  # (24 bits rounded the top code to exactly 1.0: an infinite Gumbel draw).
  return ((h >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -23)


def _mix(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class Candidates:
  """What a layer has at hand when it evicts: the candidate tokens (cached
  slots and the new tokens) and the queries that just attended them.

  q: [B, Tq, N, H] queries of the new tokens (RoPE applied), the compute dtype.
  q_pos: [B, Tq] int32 original positions; q_valid: [B, Tq] bool (not padding).
  k: [B, K, H, S] candidate keys (post-RoPE, as cached); v: [B, K, S, H];
    None in a decode step (its logits are given).
  pos: [B, K, S] int32 original positions; valid: [B, K, S] bool (holds a token).
  acc: [B, K, S] float32 scores accumulated so far (methods that accumulate;
    zero for the new tokens), else None.
  next_pos: [B] int32, the position after the last real token seen.
  budget: [B] int32, the tokens each row keeps.
  layer: the layer index (int or traced), for seeded methods.
  logits: [B, K, G, Tq, S] float32, the queries' attention logits over the
    candidates when the caller has them at hand (a decode step: its one
    query's), else None (computed from q and k on demand).
  step: [B] int32 decode steps since the prefill (0 in the prefill).
  kv_axis, group_axis: when run per device (shard_map), the mesh axes that
    split the KV heads and each KV head's group of query heads, else None.
  probs: [B, K, G, Tq, S] float32, those logits' softmax over the visible
    candidates when at hand too (a decode step), else None.
  lse: [B, K, G, Tq] float32, each query's log-sum-exp over the candidates
    (from the attention that just ran: column_sums then needs one pass), or None.
  """
  q: jax.Array
  q_pos: jax.Array
  q_valid: jax.Array
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  valid: jax.Array
  acc: jax.Array | None
  next_pos: jax.Array
  budget: jax.Array
  layer: object
  logits: jax.Array | None = None
  step: jax.Array | None = None
  kv_axis: str | None = None
  group_axis: str | None = None
  lse: jax.Array | None = None
  probs: jax.Array | None = None


  @property
  def group(self) -> int:
    """G, the query heads per KV head (all of them, when split over devices)."""
    g = self.q.shape[2] // self.pos.shape[1]
    return g * (jax.lax.axis_size(self.group_axis) if self.group_axis else 1)

  def head_ids(self) -> jax.Array:
    """[K, G'] int32: the global index k * G + g of each local query head."""
    K, g_local = self.pos.shape[1], self.q.shape[2] // self.pos.shape[1]
    k0 = jax.lax.axis_index(self.kv_axis) * K if self.kv_axis else 0
    g0 = jax.lax.axis_index(self.group_axis) * g_local if self.group_axis else 0
    return ((k0 + jnp.arange(K))[:, None] * self.group + g0 + jnp.arange(g_local)[None, :])

  def over_group(self, x: jax.Array) -> jax.Array:
    """x [B, K, ...] summed over a group's query heads: across devices too."""
    return jax.lax.psum(x, self.group_axis) if self.group_axis else x

  def mean_over_heads(self, x: jax.Array) -> jax.Array:
    """x [B, K, G, ...] -> the mean over all N query heads [B, ...]; inside a
    shard_map whose axes split the heads, over every device's."""
    total, n = x.sum(axis=(1, 2)), x.shape[1] * x.shape[2]
    for axis in (self.kv_axis, self.group_axis):
      if axis is not None:
        total, n = jax.lax.psum(total, axis), n * jax.lax.axis_size(axis)
    return total / n

  def scores(self, q_rows: jax.Array) -> jax.Array:
    """q_rows [B, T', N, H] against every candidate: [B, K, G, T', S] fp32,
    scaled by 1/sqrt(H) (as attention scores them)."""
    B, T, N, H = q_rows.shape
    K = self.k.shape[1]
    q = q_rows.reshape(B, T, K, N // K, H)
    return jnp.einsum("btkgh,bkhs->bkgts", q, self.k.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (H ** -0.5)

  def visible(self, q_pos: jax.Array, q_valid: jax.Array) -> jax.Array:
    """[B, K, 1, T', S] bool: candidate s is visible to a query at q_pos
    (causal by original position; both real tokens)."""
    return (self.valid[:, :, None, None, :] & q_valid[:, None, None, :, None]
            & (self.pos[:, :, None, None, :] <= q_pos[:, None, None, :, None]))

  def softmax(self, q_rows, q_pos, q_valid, transform: Callable | None = None):
    """Attention probabilities [B, K, G, T', S] fp32 of those queries over the
    visible candidates (q_rows None: all new queries, using self.logits when
    given); transform(logits, q_pos [B, T'], k_pos [B, K, S]) -> logits
    before the softmax (Keyformer's Gumbel noise and temperature). Rows that
    see nothing are 0. For a few rows (a window, a decode step): the whole
    prompt goes through column_sums."""
    if q_rows is None and self.probs is not None and transform is None:
      return self.probs
    if q_rows is None and self.logits is not None:
      s = self.logits
    else:
      s = self.scores(self.q if q_rows is None else q_rows)
    if transform is not None:
      s = transform(s, q_pos, self.pos)
    vis = self.visible(q_pos, q_valid)
    s = jnp.where(vis, s, EMPTY)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    p = jnp.where(vis, p, 0.0)
    return p / jnp.maximum(p.sum(axis=-1, keepdims=True), 1e-30)

  def column_sums(self, transform: Callable | None = None, q_tile: int = 512,
                  k_block: int = 2048) -> jax.Array:
    """sum over the new tokens' queries and the G heads of each group of the
    attention probabilities: [B, K, S] fp32. With logits at hand (a decode
    step), one softmax. Otherwise two passes over (query tile, key block)
    pairs, as flash attention walks them, so nothing grows with T x S: the
    first finds each query's normaliser (online max and sum), the second sums
    exp(logit - normaliser) per key; without a transform the attention's
    own normaliser (self.lse) skips the first. The whole rectangle is walked
    (the causal mask hides its upper half): about 2x the causal attention's
    QK FLOPs per pass."""
    if self.logits is not None:
      return self.over_group(self.softmax(None, self.q_pos, self.q_valid, transform)
                             .sum(axis=(2, 3)))
    B, T, N, H = self.q.shape
    K, S, G = self.pos.shape[1], self.pos.shape[2], self.group
    qt, kb = min(q_tile, T), min(k_block, S)
    nq, nk = -(-T // qt), -(-S // kb)
    pad_q, pad_k = nq * qt - T, nk * kb - S
    # Tiles: queries [nq, B, qt, N, H], keys [nk, B, K, H, kb]; padding is invisible.
    q = jnp.pad(self.q, [(0, 0), (0, pad_q), (0, 0), (0, 0)])
    qp = jnp.pad(self.q_pos, [(0, 0), (0, pad_q)])
    qv = jnp.pad(self.q_valid, [(0, 0), (0, pad_q)])
    tiles = lambda x: jnp.moveaxis(x.reshape(B, nq, qt, *x.shape[2:]), 1, 0)
    q, qp, qv = tiles(q), tiles(qp), tiles(qv)
    k = jnp.pad(self.k, [(0, 0), (0, 0), (0, 0), (0, pad_k)])
    kp = jnp.pad(self.pos, [(0, 0), (0, 0), (0, pad_k)])
    kv = jnp.pad(self.valid, [(0, 0), (0, 0), (0, pad_k)])
    blocks = lambda x: jnp.moveaxis(x.reshape(*x.shape[:-1], nk, kb), -2, 0)
    k, kp, kv = blocks(k), blocks(kp), blocks(kv)

    def logits(i, j):  # [B, K, G, qt, kb] (masked) of query tile i, key block j
      qi = q[i].reshape(B, qt, K, G, H)
      z = jnp.einsum("btkgh,bkhs->bkgts", qi, k[j].astype(qi.dtype),
                     preferred_element_type=jnp.float32) * (H ** -0.5)
      if transform is not None:
        z = transform(z, qp[i], kp[j])
      vis = (kv[j][:, :, None, None, :] & qv[i][:, None, None, :, None]
             & (kp[j][:, :, None, None, :] <= qp[i][:, None, None, :, None]))
      return jnp.where(vis, z, EMPTY), vis

    def normaliser(i):  # [B, K, G, qt]: max + log(sum exp) over every key block
      def step(carry, j):
        m, l = carry
        z, vis = logits(i, j)
        m_new = jnp.maximum(m, z.max(axis=-1))
        l = l * jnp.exp(m - m_new) + jnp.where(vis, jnp.exp(z - m_new[..., None]), 0.0).sum(-1)
        return (m_new, l), None
      init = (jnp.full((B, K, G, qt), EMPTY, jnp.float32), jnp.zeros((B, K, G, qt), jnp.float32))
      (m, l), _ = jax.lax.scan(step, init, jnp.arange(nk))
      return m + jnp.log(jnp.maximum(l, 1e-30))

    if transform is None and self.lse is not None:  # the attention's own normaliser
      lse = jnp.moveaxis(jnp.pad(self.lse, [(0, 0)] * 3 + [(0, pad_q)]).reshape(
          B, K, G, nq, qt), 3, 0)
    else:
      lse = jax.lax.map(normaliser, jnp.arange(nq))  # [nq, B, K, G, qt]

    def key_block(j):  # [B, K, kb]: this block's column sums over every query tile
      def step(total, i):
        z, vis = logits(i, j)
        p = jnp.where(vis, jnp.exp(z - lse[i][..., None]), 0.0)
        return total + p.sum(axis=(2, 3)), None
      total, _ = jax.lax.scan(step, jnp.zeros((B, K, kb), jnp.float32), jnp.arange(nq))
      return total

    sums = jax.lax.map(key_block, jnp.arange(nk))  # [nk, B, K, kb]
    return jnp.moveaxis(sums, 0, 2).reshape(B, K, nk * kb)[..., :S]


def last_rows(c: Candidates, n: int):
  """The last n real queries of each row (fewer when a row has fewer; the
  missing ones are marked invalid): (q [B, n, N, H], pos [B, n], valid [B, n])."""
  B, T = c.q_pos.shape
  count = c.q_valid.sum(axis=1)  # real queries are a prefix of each row's new tokens
  idx = count[:, None] - n + jnp.arange(n)[None, :]
  ok = idx >= 0
  idx = jnp.clip(idx, 0, T - 1)
  q = jnp.take_along_axis(c.q, idx[:, :, None, None], axis=1)
  pos = jnp.take_along_axis(c.q_pos, idx, axis=1)
  return q, pos, ok & jnp.take_along_axis(c.q_valid, idx, axis=1)


class Method:
  """An eviction method: its spec knobs and its scorer. Subclasses set the
  class attributes and implement `score`.

  name: the spec name; doc: what it keeps, and its source.
  knobs: every key it takes (common_knobs + its own).
  per_layer: its scores are [B, S], the same for every KV head.
  accumulates: it carries scores over steps (the cache stores them: acc).
  decode: it can evict during decoding (one in, one out at the budget).
  """

  name = ""
  doc = ""
  knobs: dict[str, Knob] = {}
  per_layer = False
  accumulates = False
  decode = False

  def score(self, policy: Policy, c: Candidates):
    """(scores [B, K, S] or [B, S] float32, new acc [B, K, S] or None)."""
    raise NotImplementedError

  def protected(self, policy: Policy, c: Candidates) -> jax.Array | None:
    """[B, K, S] or [B, 1, S] bool: candidates kept whatever their score,
    beyond the sinks (e.g. a recent window); None for none."""
    return None

  def dropped(self, policy: Policy, c: Candidates) -> jax.Array | None:
    """[B, K, S] or [B, 1, S] bool: candidates never protected, not even as
    sinks (the anti-oracle's answer spans); None for none."""
    return None

  def validate(self, policy: Policy) -> None:
    """Knob checks at parse time (ValueError). Subclasses extend it."""
    if policy["budget"] and policy["sinks"] > policy["budget"]:
      raise ValueError(f"policy {policy.name!r}: key 'sinks' = {policy['sinks']} exceeds "
                       f"'budget' = {policy['budget']} (sinks are kept within the budget); "
                       f"allowed: sinks <= budget")
    if "recent" in dict(policy.params) and policy["recent"] > 1:
      raise ValueError(f"policy {policy.name!r}: key 'recent' = {policy['recent']} is a "
                       f"fraction of the kept tokens; allowed: a float in [0, 1]")


def recent_window(policy: Policy, c: Candidates) -> jax.Array:
  """[B, K, S] bool: the int(budget[b] * recent) most recent candidates, the
  product in Python floats (a host table indexed by the traced budget, as
  kept_table: float32 would round 90 * 0.7 to 63, not 62)."""
  size = c.pos.shape[-1] + 1  # a budget never exceeds the candidates
  table = np.array([int(b * policy["recent"]) for b in range(size)], np.int32)
  return recent(c, jnp.asarray(table)[jnp.minimum(c.budget, size - 1)])


def recent(c: Candidates, n) -> jax.Array:
  """[B, K, S] bool: candidates among the n ([B] or int) most recent positions."""
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), c.next_pos.shape)
  return c.pos >= (c.next_pos - n)[:, None, None]


def scored(method: Method, policy: Policy, c: Candidates):
  """The method's scores for every candidate, float32 [B, K, S] (a per-layer
  method's broadcast to K), which candidates are protected [B, K, S] (the
  first `sinks` positions and method.protected), and the new accumulators
  ([B, K, S] or None): what the prefill's selector and the decode step's
  one-out choice both start from."""
  scores, acc = method.score(policy, c)
  B, K, S = c.pos.shape
  scores = jnp.broadcast_to(scores[:, None] if scores.ndim == 2 else scores, (B, K, S))
  keep = c.pos < policy["sinks"]
  extra = method.protected(policy, c)
  if extra is not None:
    keep = keep | extra
  never = method.dropped(policy, c)
  if never is not None:
    keep = keep & ~never
  return scores.astype(jnp.float32), keep, acc


def select(method: Method, policy: Policy, c: Candidates, n_max: int):
  """The selector: per (row, KV head), the `budget[b]` candidates to keep.

  Returns (idx [B, K, n_max] int32 into the candidate axis, sorted by
  original position, the first budget[b] of a row real and the rest
  repeating its last kept index; count [B] int32 = min(budget, valid
  candidates); new acc [B, K, S] or None). Protected: the first `sinks`
  positions and the method's own (method.protected). Ties go to the lower
  candidate index (jax.lax.top_k).
  """
  scores, keep, acc = scored(method, policy, c)
  scores = jnp.where(keep, PROTECTED, scores)
  scores = jnp.where(c.valid, scores, EMPTY)
  _, top = jax.lax.top_k(scores, n_max)  # [B, K, n_max], best first
  count = jnp.minimum(c.budget, c.valid[:, 0].sum(axis=-1)).astype(jnp.int32)
  chosen = jnp.arange(n_max)[None, None, :] < count[:, None, None]
  # Sort the chosen by original position (the rest after them).
  order_key = jnp.where(chosen, jnp.take_along_axis(c.pos, top, axis=-1), jnp.iinfo(jnp.int32).max)
  top = jnp.take_along_axis(top, jnp.argsort(order_key, axis=-1, stable=True), axis=-1)
  last = jnp.take_along_axis(top, jnp.maximum(count - 1, 0)[:, None, None], axis=-1)
  top = jnp.where(chosen, top, last)
  return top.astype(jnp.int32), count, acc


def gather(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """x [B, K, ..., S, ...] taken at idx [B, K, n] along `axis` (the slot axis)."""
  shape = [1] * x.ndim
  shape[0], shape[1], shape[axis] = idx.shape[0], idx.shape[1], idx.shape[2]
  return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)
