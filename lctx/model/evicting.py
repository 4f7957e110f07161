"""Token eviction inside the model's steps (lctx.cache.evict: methods, selector).

Three places evict, all with static shapes and one compile:
  prefill (one pass)  each layer scores its whole prompt right after its
      attention and writes only the kept tokens into the cache (kvpress's
      protocol: layer by layer, from the uncompressed forward pass, so no
      layer's hidden states change); the cache holds n_kept slots, the
      prompt's K/V of one layer are the only full-length transient.
  chunked prefill     each chunk attends the kept slots and itself, then the
      kept slots and the chunk's tokens are scored together and compacted
      back to the budget: the cache never holds more than budget slots, the
      transients are budget + one chunk.
  decode (decode=evict, methods with Method.decode) while a row is below its
      budget the token is appended; at the budget the new token's attention
      scores the cache and itself and the lowest-scoring one goes: one in,
      one out, per KV head, written with a scatter in place.
Kept slots store their original positions (EvictState.pos): RoPE of new
tokens continues from the original length (EvictState.next_pos), masks and
kept_positions read them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lctx.cache import evict as evict_lib
from lctx.cache import store
from lctx.cache.evict.base import EMPTY, PROTECTED, Candidates, gather, kept_table, scored, select
from lctx.cache.quant.base import SlotFormat, View
from lctx.model import attention
from lctx.model.layers import apply_rope, rope_cos_sin


def rerotate(config, k_bkhn: jax.Array, delta_bkn: jax.Array) -> jax.Array:
  """Keys [B, K, H, n] (post-RoPE) rotated by delta positions [B, K, n]:
  RoPE is a rotation per frequency pair, so R(p + d) = R(d) R(p)."""
  B, K, H, n = k_bkhn.shape
  cos, sin = rope_cos_sin(config, delta_bkn.reshape(B, K * n))  # [B, K*n, H] tables
  x = k_bkhn.transpose(0, 1, 3, 2).reshape(B, K * n, 1, H)
  return apply_rope(x, cos, sin).reshape(B, K, n, H).transpose(0, 1, 3, 2).astype(k_bkhn.dtype)


def write_kept(config, cache_parts, l, fmt, kk, vv, pp, acc, count):
  """Writes the kept keys kk [B, K, H, n], values vv [B, K, n, H], positions
  pp [B, K, n] and accumulators [B, K, n] into slots [0, n) of layer l."""
  kc, vc, pos, acc_arr = cache_parts
  if fmt is None:
    kc = store.write_prefix(kc, l, kk.astype(config.dtype))
    vc = store.write_prefix(vc, l, vv.astype(config.dtype))
  else:
    with jax.named_scope(attention.WRITE_SCOPE):
      view = fmt.write_prefix(View(kc, vc, l), kk, vv, count)
    kc, vc = view.k, view.v
  pos = store.write_prefix(pos, l, pp[:, :, None, :].astype(jnp.int32))
  if acc_arr is not None:
    acc_arr = store.write_prefix(acc_arr, l, acc[:, :, None, :].astype(jnp.float32))
  return kc, vc, pos, acc_arr


def lse_of(part) -> jax.Array:
  """An attention Partial's log-sum-exp per query and head: [B, N, T]."""
  return (part.max + jnp.log(jnp.maximum(part.sum, 1e-30))).transpose(0, 2, 1)


def group_lse(lse_bnt: jax.Array, K: int) -> jax.Array:
  """[B, N, T] -> [B, K, G, T] (query head n reads KV head n // G)."""
  B, N, T = lse_bnt.shape
  return lse_bnt.reshape(B, K, N // K, T)


def prefill_layer(config, cache, parts, l, q, k, v, k_store, lengths, n_max, step_budget,
                  lse=None):
  """One-pass prefill eviction at layer l: scores the T prompt tokens (q, k, v
  [B, T, heads, H], k post-RoPE; k_store: what the format stores) and writes
  the n_max best per row and KV head (budget[b] of them real) into the
  cache parts (k, v, pos, acc). lse: the prompt attention's Partial (its
  normaliser spares column sums a pass). Returns (parts, count [B])."""
  policy = cache.evict.policy
  method = evict_lib.method(policy)
  B, T, K, H = k.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, K, T))
  real = jnp.arange(T)[None, :] < lengths[:, None]
  kt = k.transpose(0, 2, 3, 1)
  c = Candidates(q=q, q_pos=pos[:, 0], q_valid=real, k=kt, v=v.transpose(0, 2, 1, 3), pos=pos,
                 valid=jnp.broadcast_to(real[:, None, :], (B, K, T)),
                 acc=jnp.zeros((B, K, T), jnp.float32) if method.accumulates else None,
                 next_pos=lengths, budget=step_budget, layer=l,
                 step=jnp.zeros((B,), jnp.int32),
                 lse=None if lse is None else group_lse(lse_of(lse), K))
  idx, count, acc = select(method, policy, c, n_max)
  ks = gather(k_store.transpose(0, 2, 3, 1), idx, 3)
  pp = gather(pos, idx, 2)
  if cache_positions(policy):  # rotated to their slots; pos keeps the original positions
    slot = jnp.broadcast_to(jnp.arange(n_max, dtype=jnp.int32), pp.shape)
    ks = rerotate(config, ks, slot - pp)
  parts = write_kept(config, parts, l, cache.format, ks, gather(c.v, idx, 2), pp,
                     None if acc is None else gather(acc, idx, 2), count)
  return parts, count


def check_chunked_format(policy, fmt) -> None:
  """ValueError unless a chunked prefill can compact this format by
  gathering stored entries: a per-token format (SlotFormat: int8, int4),
  with a per-KV-head scale unless the method keeps the same tokens for
  every KV head."""
  if fmt is None:
    return
  if not isinstance(fmt, SlotFormat):
    raise ValueError(f"chunked prefill with eviction {policy} and {fmt.spec!r}: it compacts "
                     f"the cache by moving stored tokens, which must each be stored on their "
                     f"own (int8, int4; fp8's scale is fixed by the first write, KIVI groups "
                     f"tokens); allowed: a one-pass prefill (chunk=None), or int8 / int4")
  if not evict_lib.method(policy).per_layer and getattr(fmt, "scale", None) == "token":
    raise ValueError(f"chunked prefill with eviction {policy} and {fmt.spec!r}: its scale is "
                     f"shared by the KV heads, which keep different tokens; allowed: "
                     f"scale=head, or a one-pass prefill (chunk=None)")


class Slots:
  """A layer's cache slots as a chunked eviction sees them, dense or in a
  per-token format: attention segments over the filled slots, all slots
  read in full precision (for scoring), and compaction of kept candidates
  (slots then the chunk's tokens) into slots [0, n)."""

  def __init__(self, config, fmt):
    self.config, self.fmt = config, fmt

  def segments(self, kc, vc, l, filled, block, trips):
    if self.fmt is None:
      return [attention.cache_segment(kc, vc, l, filled, block, trips)]
    return [attention.SourceSegment(src, block, trips)
            for src in self.fmt.sources(View(kc, vc, l), filled)]

  def read(self, kc, vc, l):
    """Every slot of layer l: (k [B, K, H, S], v [B, K, S, H])."""
    if self.fmt is None:
      return store.layer(kc, l), store.layer(vc, l)
    view = View(kc, vc, l)
    (src,) = self.fmt.sources(view, view.size("v", "codes"))
    return src.read(0, src.slots)

  def compact(self, kc, vc, l, k_new, v_new, idx):
    """Slots [0, n) of layer l := candidates idx [B, K, n] of (the layer's
    slots, then the new tokens k_new [B, K, H, C], v_new [B, K, C, H])."""
    if self.fmt is None:
      k_all = jnp.concatenate([store.layer(kc, l), k_new.astype(self.config.dtype)], axis=-1)
      v_all = jnp.concatenate([store.layer(vc, l), v_new.astype(self.config.dtype)], axis=-2)
      return (store.write_prefix(kc, l, gather(k_all, idx, 3)),
              store.write_prefix(vc, l, gather(v_all, idx, 2)))
    view = View(kc, vc, l)
    with jax.named_scope(attention.WRITE_SCOPE):
      for side, new in (("k", k_new), ("v", v_new)):
        axis = 3 if side == "k" else 2
        for name, entry in self.fmt.encode(side, new).items():
          both = jnp.concatenate([view.get(side, name), entry], axis=axis)
          # An entry shared by the KV heads (axis of 1) follows head 0's choice
          # (check_chunked_format allows it for per-layer methods only).
          pick = idx if both.shape[1] == idx.shape[1] else idx[:, :1]
          view = view.set_slots(side, name, gather(both, pick, axis), 0)
    return view.k, view.v


def cache_positions(policy) -> bool:
  return dict(policy.params).get("positions") == "cache"


def budgets(policy, lengths: jax.Array, T: int) -> tuple[jax.Array, int]:
  """([B] int32 tokens each row keeps, the most any row keeps: n_max)."""
  table = kept_table(policy, T)
  return jnp.asarray(table)[lengths], int(table.max())


def decode_layer(config, cache, parts, l, q, k, v, lengths, plan=None):
  """A decode step at layer l with eviction during decoding (dense cache):
  the new token (q [B, 1, N, H], k, v [B, 1, K, H]) attends the filled slots
  and itself; a row below its budget appends it at slot lengths[b], a row
  at its budget scores the cache and the new token and overwrites the
  lowest (per KV head) with it, or drops the new token if it scores lowest.
  The cache arrays are read and written in place, in either layout. With a
  plan, runs per device on its rows and KV heads (shard_map: the per-head
  scatter needs no collective; scores that sum query heads sum them across
  the devices holding them: `model`, and `model_rep` when the model axis
  exceeds the KV heads). Returns (attn [B, 1, N, H], parts)."""
  ev = cache.evict
  n = 3 if parts[3] is None else 4
  arrays = list(parts[:n])
  state = (lengths, ev.next_pos, ev.budget, ev.step)
  fn = functools.partial(_decode_layer_local, config, ev.policy)
  if plan is None:
    attn, arrays = fn(arrays, l, q, k, v, state, (None, None))
    return attn, tuple(arrays) + (None,) * (4 - n)
  unrolled = isinstance(arrays[0], tuple)
  spec = lambda axes: plan.spec(axes, "decode")
  lead = () if unrolled else ("layers",)
  cache_spec = spec(lead + ("cache_batch", "cache_kv_heads", None, None))
  q_spec = spec(("batch", None, "heads", None))
  kv_spec = spec(("batch", None, "cache_kv_heads", None))
  row = spec(("cache_batch",))
  axes = [a if plan.mesh.shape[a] > 1 else None for a in ("model", "model_rep")]
  # The unrolled layout passes layer l's arrays as one-layer tuples (index 0).
  local_in = [(a[l],) for a in arrays] if unrolled else arrays
  in_cache = [(cache_spec,) for _ in arrays] if unrolled else [cache_spec] * n
  attn, out = jax.shard_map(
      lambda arrays, li, q, k, v, state: fn(arrays, 0 if unrolled else li, q, k, v, state, axes),
      mesh=plan.mesh,
      in_specs=(in_cache, spec(()), q_spec, kv_spec, kv_spec, (row,) * 4),
      out_specs=(q_spec, in_cache), check_vma=False)(
          local_in, 0 if unrolled else l, q, k, v, state)
  if unrolled:
    out = [a[:l] + o + a[l + 1:] for a, o in zip(arrays, out)]
  return attn, tuple(out) + (None,) * (4 - n)


def _decode_layer_local(config, policy, arrays, l, q, k, v, state, axes):
  """decode_layer on one device's blocks: arrays = [k, v, pos(, acc)],
  each stacked [L, ...] or a tuple of layers; layer l read and written in
  place."""
  method = evict_lib.method(policy)
  kc, vc, pc = arrays[:3]
  ac = arrays[3] if len(arrays) > 3 else None
  kl, vl, pl = store.layer(kc, l), store.layer(vc, l), store.layer(pc, l)
  al = None if ac is None else store.layer(ac, l)
  lengths, next_pos, budget, step = state
  B, K, H, S = kl.shape
  N = q.shape[2]
  G = N // K
  qg = q[:, 0].reshape(B, K, G, H)
  with jax.named_scope(attention.SCOPE):
    s_c = jnp.einsum("bkgh,bkhs->bkgs", qg, kl.astype(q.dtype),
                     preferred_element_type=jnp.float32) * (H ** -0.5)
    s_n = jnp.einsum("bkgh,bkh->bkg", qg, k[:, 0].astype(q.dtype),
                     preferred_element_type=jnp.float32)[..., None] * (H ** -0.5)
    filled = jnp.arange(S)[None, :] < lengths[:, None]  # [B, S]
    vis = jnp.concatenate([jnp.broadcast_to(filled[:, None, None, :], (B, K, G, S)),
                           jnp.ones((B, K, G, 1), bool)], axis=-1)
    logits = jnp.concatenate([s_c, s_n], axis=-1)
    s = jnp.where(vis, logits, EMPTY)
    p = jnp.where(vis, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
    p = p / p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bksh->bkgh", p[..., :S].astype(vl.dtype), vl,
                     preferred_element_type=jnp.float32)
    out = out + p[..., S:] * v[:, 0].astype(jnp.float32)[:, :, None, :]
  attn = out.reshape(B, 1, N, H).astype(q.dtype)

  # Scoring and the one-in-one-out write: one fused kernel in a serving
  # engine (the column sums come out of the attention kernel), so counted
  # as one (attention.WRITE_SCOPE).
  with jax.named_scope(attention.WRITE_SCOPE):
    pos_c = jnp.concatenate([pl[:, :, 0, :], jnp.broadcast_to(next_pos[:, None, None],
                                                              (B, K, 1))], axis=-1)
    valid = jnp.concatenate([jnp.broadcast_to(filled[:, None, :], (B, K, S)),
                             jnp.ones((B, K, 1), bool)], axis=-1)
    acc = None
    if al is not None:
      acc = jnp.concatenate([al[:, :, 0, :], jnp.zeros((B, K, 1), jnp.float32)], axis=-1)
    c = Candidates(q=q, q_pos=next_pos[:, None], q_valid=jnp.ones((B, 1), bool), k=None,
                   v=None, pos=pos_c, valid=valid, acc=acc, next_pos=next_pos + 1,
                   budget=budget, layer=l, logits=logits[:, :, :, None, :], step=step,
                   probs=p[:, :, :, None, :],
                   kv_axis=axes[0], group_axis=axes[1])
    scores, keep, acc = scored(method, policy, c)
    scores = jnp.where(keep | ~valid, PROTECTED, scores)
    # The lowest score goes; among equals the newest (the new token first), as
    # the prefill's top-k keeps the lower positions. With every candidate
    # protected (sinks + recent window over the budget) the new token goes.
    out_slot = (S - jnp.argmin(scores[..., ::-1], axis=-1)).astype(jnp.int32)  # [B, K]; S: new
    full = (lengths >= budget)[:, None]
    slot = jnp.where(full, out_slot, lengths[:, None])  # [B, K]; S (out of range): not written
    # The writes must follow the attention's read of the layer. A slot chosen
    # without the attention (StreamingLLM's, by position) left them unordered
    # and XLA copied the whole layer to write first (2.7x slower on CPU; an
    # optimization_barrier copied it too): the slot depends on the output
    # (a row whose attention is not finite writes nothing).
    broken = ~jnp.isfinite(out.sum(axis=(2, 3)))  # [B, K]
    slot = jnp.where(broken, S + 1, slot)
    kc = _write_heads(kc, l, slot, k[:, 0], 3)
    vc = _write_heads(vc, l, slot, v[:, 0], 2)
    pc = _write_heads(pc, l, slot, jnp.broadcast_to(next_pos[:, None, None], (B, K, 1)), 3)
    if ac is not None:  # every slot's new sum, then the new token's in its slot
      ac = store.write_layer(ac, l, acc[:, :, None, :S])
      ac = _write_heads(ac, l, slot, acc[:, :, S:], 3)
  return attn, [kc, vc, pc] + ([] if ac is None else [ac])


def _write_heads(buf, l, slots_bk, new_bkx, seq_axis: int):
  """Writes new_bkx[b, k] (layer l's array without its batch, head and slot
  axes) at slot slots_bk[b, k], per KV head, in place, in either layout
  (lctx.cache.store); out-of-range slots are dropped."""
  B, K = slots_bk.shape
  bi = jnp.broadcast_to(jnp.arange(B)[:, None], (B, K))
  ki = jnp.broadcast_to(jnp.arange(K)[None, :], (B, K))
  if B * K == 1:  # keep it a scatter (see store.write_token)
    bi, ki, slots_bk, new_bkx = (jnp.concatenate([a, a]) for a in (bi, ki, slots_bk, new_bkx))
  index = [bi, ki, slice(None), slice(None)]
  index[seq_axis] = slots_bk
  if isinstance(buf, tuple):
    one = buf[l].at[tuple(index)].set(new_bkx.astype(buf[l].dtype), mode="drop")
    return buf[:l] + (one,) + buf[l + 1:]
  return buf.at[(l, *index)].set(new_bkx.astype(buf.dtype), mode="drop")
