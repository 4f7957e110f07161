"""The decoder as pure functions of (config, params, inputs[, cache]).

Three entry points share one layer body:
  forward  teacher-forced logits [B, T, V], no cache;
  prefill  fills cache slots [0, T) and returns the logits of each row's last
           prompt token; in one pass, or C tokens at a time (chunk=C), each
           chunk attending the cache before it and itself (two attention
           segments, lctx.model.attention);
  decode   one token per row, written at slot `lengths[b]`, attends to slots
           [0, lengths[b]].
With a compressed cache (cache.format, lctx.cache.quant), prefill (one pass
or chunked) and decode go through its format: the format writes the new K/V and attention reads
its sources block by block (_format_prefill, _format_chunk, _format_decode);
meshes with a `seq` axis are refused for it.
The layer loop follows the params' layout: stacked layers run under
`lax.scan` (fast to compile at any depth), a tuple of per-layer dicts runs
unrolled (each layer reads its own weight and cache buffers with no slicing
copies: about 2x faster decode on CPU, measured in experiments/bench_decode).
Cross-layer KV sharing (config.kv_share_every = s > 1, _kv_loop): the loop
runs over groups of s layers; the group's first layer computes K/V with its
params["kv_layers"] weights, writes them into cache layer l // s and attends
them; the other layers compute only their queries and attend the same K/V
(the chunk's or prompt's own K/V, and cache layer l // s, read only).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cache import store
from lctx.cache import evict
from lctx.cache.evict.base import Candidates, gather, select
from lctx.cache.dense import KVCache, check_evict_sharing
from lctx.cache.quant.base import View
from lctx.config import ModelConfig
from lctx.model import attention, evicting, streaming
from lctx.model.layers import apply_rope, rms_norm, rope_cos_sin, swiglu
from lctx.model.params import Params

PREFILL_BLOCK = 512


# ---- pieces of one layer -----------------------------------------------------

def _qkv(config: ModelConfig, lp: Params, x_btd: jax.Array, rope: tuple[jax.Array, jax.Array],
         raw_k: bool = False, kv: bool = True):
  """Q, K (rotated by the RoPE tables `rope` = (cos, sin), computed once for
  all layers) and V of one layer.

  With config.qkv_bias the projections add their biases (Qwen2, Llama's
  attention_bias); with config.qk_norm each head of q and k is RMS-normalised
  over head_dim with weights shared by the heads, after the bias and before
  RoPE (Qwen3). raw_k: also return k before RoPE (a cache format that
  stores keys unrotated, e.g. KVQuant). kv=False: q alone (a layer that
  attends its group's K/V under cross-layer KV sharing has no K/V weights)."""
  # Separate Q, K, V matmuls: a fused [D, N + 2K, H] projection measured 2x
  # slower in CPU prefill (slicing its output costs more than it saves).
  dtype = x_btd.dtype
  h = rms_norm(x_btd, lp["attn_norm"], config.rms_norm_eps)
  q = jnp.einsum("btd,dnh->btnh", h, lp["w_q"].astype(dtype))
  if not kv:
    if config.qkv_bias:
      q = q + lp["b_q"].astype(dtype)
    if config.qk_norm:
      q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    return apply_rope(q, *rope)
  k = jnp.einsum("btd,dkh->btkh", h, lp["w_k"].astype(dtype))
  v = jnp.einsum("btd,dkh->btkh", h, lp["w_v"].astype(dtype))
  if config.qkv_bias:
    q = q + lp["b_q"].astype(dtype)
    k = k + lp["b_k"].astype(dtype)
    v = v + lp["b_v"].astype(dtype)
  if config.qk_norm:
    q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], config.rms_norm_eps)
  cos, sin = rope
  if raw_k:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _out_and_mlp(config: ModelConfig, lp: Params, x_btd: jax.Array, attn_btnh: jax.Array):
  B, T, N, H = attn_btnh.shape
  # One [N*H, D] matmul on flattened heads (N*H need not equal D): with a (n, h)
  # einsum the CPU backend picked a layout that transposes w_o every step.
  w_o = lp["w_o"].astype(x_btd.dtype).reshape(N * H, -1)
  out = attn_btnh.reshape(B, T, N * H) @ w_o
  if config.o_bias:
    out = out + lp["b_o"].astype(x_btd.dtype)
  x = x_btd + out
  h = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
  return x + swiglu(h, lp["w_gate"], lp["w_up"], lp["w_down"])


def _layer_loop(layers, carry, body: Callable):
  """Runs body(layer_params, l, carry) -> carry over the layers.

  l is a traced index under scan (stacked layers), a Python int when unrolled.
  """
  if isinstance(layers, (tuple, list)):
    for l, lp in enumerate(layers):
      carry = body(lp, l, carry)
    return carry
  L = jax.tree.leaves(layers)[0].shape[0]
  carry, _ = jax.lax.scan(lambda c, xs: (body(xs[0], xs[1], c), None), carry,
                          (layers, jnp.arange(L)))
  return carry


def _kv_loop(config: ModelConfig, params: Params, carry, body: Callable):
  """Runs body(lp, l, carry, shared) -> (carry, kv) over the layers, where
  shared is None for a layer that computes its own K/V and kv is what it
  computed (_layer_qkv's (k, v, k_store)).

  Without sharing (kv_share_every = 1): _layer_loop, every layer shared=None,
  l its index. With kv_share_every = s > 1 the layers run in groups of s:
  the group's first layer gets its params["kv_layers"] weights merged into
  lp and shared=None; each other layer of the group gets the first layer's
  kv as shared; all of them l = g, the group's (and its cache layer's)
  index. Stacked params: one scan over the L / s groups (layers reshaped to
  [L / s, s, ...]), the s layers of a group unrolled in its body; unrolled
  params: a Python loop.
  """
  layers, s = params["layers"], config.kv_share_every
  if s == 1:
    return _layer_loop(layers, carry, lambda lp, l, c: body(lp, l, c, None)[0])

  def group(lps, kv_lp, g, c):
    c, kv = body({**lps[0], **kv_lp}, g, c, None)
    for lp in lps[1:]:
      c, _ = body(lp, g, c, kv)
    return c

  if isinstance(layers, (tuple, list)):
    for g, kv_lp in enumerate(params["kv_layers"]):
      carry = group(layers[g * s:(g + 1) * s], kv_lp, g, carry)
    return carry
  G = config.num_kv_layers
  grouped = jax.tree.map(lambda a: a.reshape(G, s, *a.shape[1:]), layers)

  def step(c, xs):
    lg, kv_lp, g = xs
    return group([jax.tree.map(lambda a: a[j], lg) for j in range(s)], kv_lp, g, c), None

  carry, _ = jax.lax.scan(step, carry, (grouped, params["kv_layers"], jnp.arange(G)))
  return carry


def _units(config: ModelConfig, params: Params):
  """The layers grouped by the cache layer they read (one per layer, or the
  kv_share_every = s layers of a group): stacked (a pytree with a leading
  [L / s] axis) or a list (unrolled params), for lctx.model.streaming."""
  layers, s = params["layers"], config.kv_share_every
  if s == 1:
    return layers
  if isinstance(layers, (tuple, list)):
    return [(tuple(layers[g * s:(g + 1) * s]), kv) for g, kv in enumerate(params["kv_layers"])]
  G = config.num_kv_layers
  return {"layers": jax.tree.map(lambda a: a.reshape(G, s, *a.shape[1:]), layers),
          "kv": params["kv_layers"]}


def _run_unit(config: ModelConfig, unit, l, carry, body: Callable):
  """One unit of _units through body (as _kv_loop runs it), at cache layer l."""
  s = config.kv_share_every
  if s == 1:
    return body(unit, l, carry, None)[0]
  if isinstance(unit, dict):
    lps, kv_lp = [jax.tree.map(lambda a: a[j], unit["layers"]) for j in range(s)], unit["kv"]
  else:
    lps, kv_lp = unit
  carry, kv = body({**lps[0], **kv_lp}, l, carry, None)
  for lp in lps[1:]:
    carry, _ = body(lp, l, carry, kv)
  return carry


def _cache_loop(config: ModelConfig, params: Params, x, cache: KVCache, body: Callable,
                write_back: Callable):
  """_kv_loop over (x, cache.k, cache.v), or for a streamed (`offload`)
  cache, lctx.model.streaming.layer_loop: each cache layer's block fetched
  one ahead, the unit's layers run on it at index 0, write_back(host, l,
  block) after. Returns (x, k, v)."""
  if not cache.offload:
    return _kv_loop(config, params, (x, cache.k, cache.v), body)

  def unit(u, l, x, block):
    x, k, v = _run_unit(config, u, 0, (x, *block), body)
    return x, (k, v)

  x, (k, v) = streaming.layer_loop(_units(config, params), x, (cache.k, cache.v), unit,
                                   write_back)
  return x, k, v


def _layer_qkv(config: ModelConfig, fmt, lp: Params, x: jax.Array, rope, shared):
  """(q, k, v, k_store) of one layer: k_store the keys the cache stores (k,
  or before RoPE for a format that stores them so); with shared (its group's
  (k, v, k_store), cross-layer KV sharing) only q is computed."""
  if shared is not None:
    return (_qkv(config, lp, x, rope, kv=False), *shared)
  if fmt is None:
    q, k, v = _qkv(config, lp, x, rope)
    return q, k, v, k
  return _qkv_stored(config, fmt, lp, x, rope)


# ---- cache access, for both layouts (lctx.cache.store) ------------------------------

_cache_layer = store.layer
_cache_write_prefix = store.write_prefix
_cache_write_slots = store.write_slots
_cache_slots = store.slots
_cache_write_token = store.write_token


_segment = attention.cache_segment


# ---- embedding and head ----------------------------------------------------------

def _embed(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
  return jnp.take(params["embed"], tokens, axis=0).astype(config.dtype)


def _logits(config: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
  """Final norm and output head, logits in fp32."""
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  if config.tie_word_embeddings:
    return jnp.einsum("...d,vd->...v", h, params["embed"].astype(h.dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("...d,dv->...v", h, params["lm_head"].astype(h.dtype),
                    preferred_element_type=jnp.float32)


# ---- entry points ------------------------------------------------------------------

def forward(config: ModelConfig, params: Params, tokens: jax.Array,
            block: int = PREFILL_BLOCK) -> jax.Array:
  """Teacher-forced logits [B, T, V] (fp32) for tokens [B, T]."""
  B, T = tokens.shape
  rope = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(T), (B, T)))  # one table, all layers

  def body(lp, l, x, shared):
    q, k, v, k_store = _layer_qkv(config, None, lp, x, rope, shared)
    attn = attention.causal_attention(q, k, v, block)
    return _out_and_mlp(config, lp, x, attn), (k, v, k_store)

  x = _kv_loop(config, params, _embed(config, params, tokens), body)
  return _logits(config, params, x)


def _manual_over_cache(plan, mode: str, fn, k_cache, v_cache, l, args, args_axes, out_axes):
  """Runs fn(k_cache, v_cache, l, *args) -> (out, k_cache, v_cache) once per
  device (shard_map over the whole mesh) on its blocks of the cache and of
  args (logical axes args_axes; out: out_axes), for either cache layout: the
  stacked arrays with layer index l, or only layer l's arrays of an unrolled
  cache (as a one-layer tuple, index 0), the others left untouched."""
  k_axes = ("cache_batch", "cache_kv_heads", None, "cache_seq")
  v_axes = ("cache_batch", "cache_kv_heads", "cache_seq", None)
  if isinstance(k_cache, tuple):
    def one(kc, vc, *args):
      out, (kc,), (vc,) = fn((kc,), (vc,), 0, *args)
      return out, kc, vc
    out, kc, vc = plan.manual(one, (k_axes, v_axes, *args_axes), (out_axes, k_axes, v_axes),
                              mode)(k_cache[l], v_cache[l], *args)
    return out, k_cache[:l] + (kc,) + k_cache[l + 1:], v_cache[:l] + (vc,) + v_cache[l + 1:]
  k_axes, v_axes = ("layers",) + k_axes, ("layers",) + v_axes
  return plan.manual(fn, (k_axes, v_axes, (), *args_axes), (out_axes, k_axes, v_axes),
                     mode)(k_cache, v_cache, l, *args)


def _prefill_attention(config: ModelConfig, k_cache, v_cache, l, q, k, v, block: int, plan,
                       write: bool = True):
  """Writes the prompt's K/V into cache slots [0, T) of layer l and runs its
  causal attention; with a `seq` mesh axis, sequence-parallel. write=False:
  attention only (a layer sharing its group's K/V, already written).

  Each seq shard all-gathers K and V and attends its own queries at their
  offset. All-gather rather than a ring: with GQA, K and V are N / K times
  smaller than Q, so one collective moves little, and per-device memory stays
  linear in T; the price is no compute/communication overlap and more work on
  later shards (their queries see more keys). Each shard then writes its own
  slice of the cache, slots [r S/s, (r+1) S/s), from the gathered K/V: left
  to the partitioner, a prompt shorter than the cache (T/s rows per shard
  against S/s slots) made every device gather the whole cache.
  """
  if plan is None or not plan.seq_parallel:
    if write:
      k_cache = _cache_write_prefix(k_cache, l, k.transpose(0, 2, 3, 1).astype(config.dtype))
      v_cache = _cache_write_prefix(v_cache, l, v.transpose(0, 2, 1, 3).astype(config.dtype))
    return attention.causal_attention(q, k, v, block), k_cache, v_cache

  def local(kc, vc, l, q, k, v):
    k_all = jax.lax.all_gather(k, "seq", axis=1, tiled=True)  # [B, T, K, H]
    v_all = jax.lax.all_gather(v, "seq", axis=1, tiled=True)
    out = attention.causal_attention(q, k_all, v_all, block,
                                     q_offset=jax.lax.axis_index("seq") * q.shape[1])
    if not write:
      return out, kc, vc
    T, S = k_all.shape[1], _cache_layer(vc, l).shape[-2]  # S: this shard's slots
    start = jax.lax.axis_index("seq") * S
    slots = start + jnp.arange(S)
    rows = jnp.minimum(slots, T - 1)  # the prompt rows of this shard's slots
    k_new, v_new = k_all[:, rows].transpose(0, 2, 3, 1), v_all[:, rows].transpose(0, 2, 1, 3)
    k_old, v_old = _cache_layer(kc, l), _cache_layer(vc, l)
    k_new = jnp.where(slots < T, k_new.astype(k_old.dtype), k_old)  # slots past T keep theirs
    v_new = jnp.where((slots < T)[:, None], v_new.astype(v_old.dtype), v_old)
    return out, _cache_write_prefix(kc, l, k_new), _cache_write_prefix(vc, l, v_new)

  # Every device holds whole GQA groups: its query heads and the KV head they read.
  q_axes, kv_axes = ("batch", "seq", "heads", None), ("batch", "seq", "kv_heads", None)
  return _manual_over_cache(plan, "prefill", local, k_cache, v_cache, l, (q, k, v),
                            (q_axes, kv_axes, kv_axes), q_axes)


def _chunk_attention(config: ModelConfig, k_cache, v_cache, l, q, k, v, start,
                     block: int, trips: float | None, plan, write: bool = True):
  """One prefill chunk's attention at layer l: writes its K/V into the cache
  slots [start, start + C), then merges two segments, the cache slots
  [0, start) (CacheSegment) and the chunk itself (ChunkSegment, causal).
  write=False: no write (a layer sharing its group's K/V, already written).

  With a `seq` mesh axis the cache stays split along its slots and the
  chunk's tokens along seq (C/s per device); per device (shard_map): the
  chunk's Q, K and V are all-gathered (small next to the cache: one chunk),
  the device writes the chunk slots it owns, attends all C queries over its
  own slice (its filled slots before start), and the per-device partials are
  merged and reduce-scattered back to each device's C/s queries
  (flash-decoding across seq); its own queries then attend the chunk's keys
  causally. Nothing of the cache moves between devices.
  """
  dtype = config.dtype
  if plan is None or not plan.seq_parallel:
    if write:
      k_cache = _cache_write_slots(k_cache, l, k.transpose(0, 2, 3, 1).astype(dtype), start, 3)
      v_cache = _cache_write_slots(v_cache, l, v.transpose(0, 2, 1, 3).astype(dtype), start, 2)
    part = attention.attend(q, [_segment(k_cache, v_cache, l, start, block, trips),
                                attention.ChunkSegment(k, v, block)])
    return attention.finalize(part, q.dtype), k_cache, v_cache

  def local(kc, vc, l, start, q, k, v):
    r, n = jax.lax.axis_index("seq"), q.shape[1]
    gather = lambda x: jax.lax.all_gather(x, "seq", axis=1, tiled=True)
    k_all, v_all = gather(k), gather(v)  # [B, C, kv_heads, H]
    C = k_all.shape[1]
    S = _cache_layer(vc, l).shape[-2]  # this device's slots
    # The chunk covers local slots [a, a + C); write the window of W slots
    # that holds this device's share in place (slots outside the chunk keep theirs).
    a, W = start - r * S, min(C, S)
    p = jnp.clip(a, 0, S - W)
    inside = (p + jnp.arange(W) >= a) & (p + jnp.arange(W) < a + C)
    rows = jnp.clip(p + jnp.arange(W) - a, 0, C - 1)

    def blend(buf, new, axis):  # the window with the chunk's slots blended in, in place
      old = _cache_slots(buf, l, p, W, axis)
      mask = inside if axis == 3 else inside[:, None]
      return _cache_write_slots(buf, l, jnp.where(mask, new.astype(old.dtype), old), p, axis)

    if write:
      kc = blend(kc, k_all[:, rows].transpose(0, 2, 3, 1), 3)
      vc = blend(vc, v_all[:, rows].transpose(0, 2, 1, 3), 2)
    # Every query of the chunk over this device's slice, merged across seq and
    # handed back to the device holding it; then its own queries over the chunk.
    prefix = _segment(kc, vc, l, jnp.clip(a, 0, S), block, trips).partial(gather(q))
    part = attention.merge(attention.merge_across(prefix, "seq", scatter_axis=1),
                           attention.ChunkSegment(k_all, v_all, block, q_offset=r * n).partial(q))
    return attention.finalize(part, q.dtype), kc, vc

  # Every device holds whole GQA groups: its query heads and the KV head they read.
  q_axes, kv_axes = ("batch", "seq", "heads", None), ("batch", "seq", "kv_heads", None)
  return _manual_over_cache(plan, "prefill", local, k_cache, v_cache, l, (start, q, k, v),
                            ((), q_axes, kv_axes, kv_axes), q_axes)


# ---- compressed caches (lctx.cache.quant): a format writes, attention reads its sources ----

# Slots a decode step dequantizes and scores at a time from a compressed cache:
# its temporaries stay a block, not a layer (a dense decode reads the layer in
# one block, in place).
QUANT_DECODE_BLOCK = 512


def _rotate(config: ModelConfig):
  """rotate(k [B, K, H, n], positions [n]) -> k with RoPE at those positions,
  for formats that store keys before RoPE."""
  def rotate(k_bkhn, positions):
    cos, sin = rope_cos_sin(config, positions[None, :])
    return apply_rope(k_bkhn.transpose(0, 3, 1, 2), cos, sin).transpose(0, 2, 3, 1)
  return rotate


def _qkv_stored(config, fmt, lp, x, rope):
  """q, k, v as attention uses them, and the keys the format stores."""
  if fmt.pre_rope:
    q, k, v, raw = _qkv(config, lp, x, rope, raw_k=True)
    return q, k, v, raw
  q, k, v = _qkv(config, lp, x, rope)
  return q, k, v, k


def _format_prefill(fmt, kc, vc, l, q, k, v, k_store, lengths, block: int, write: bool = True):
  """One-pass prefill at layer l with a compressed cache: the prompt's keys
  and values go into the format (unless write=False: a layer sharing its
  group's K/V); the prompt attends itself at full precision (its K/V are at
  hand, as in any serving kernel)."""
  if not write:
    return attention.causal_attention(q, k, v, block), kc, vc
  with jax.named_scope(attention.WRITE_SCOPE):
    view = fmt.write_prefix(View(kc, vc, l), k_store.transpose(0, 2, 3, 1),
                            v.transpose(0, 2, 1, 3), lengths)
  return attention.causal_attention(q, k, v, block), view.k, view.v


def _format_chunk(config, fmt, kc, vc, l, q, k, v, k_store, start, lengths, block: int,
                  trips, write: bool = True):
  """One prefill chunk at layer l with a compressed cache: the chunk's K/V go
  into the format (unless write=False: a layer sharing its group's K/V),
  then its queries attend the format's sources for slots [0, start)
  (dequantized block by block) and the chunk itself."""
  view = View(kc, vc, l)
  if write:
    with jax.named_scope(attention.WRITE_SCOPE):
      view = fmt.write_chunk(view, k_store.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3),
                             start, lengths)
  segments = [attention.SourceSegment(src, block, trips)
              for src in fmt.sources(view, start, _rotate(config))]
  part = attention.attend(q, segments + [attention.ChunkSegment(k, v, block)])
  return attention.finalize(part, q.dtype), view.k, view.v


def _format_decode(config, fmt, kc, vc, l, lengths, q, k_store, v, capacity: int,
                   write: bool = True):
  """A decode step at layer l with a compressed cache: the token goes into
  the format at slot lengths[b] (unless write=False: a layer sharing its
  group's K/V, which its first layer wrote); attention reads slots
  [0, lengths] block by block (QUANT_DECODE_BLOCK), charging the whole
  capacity's blocks, as the dense step reads the whole layer."""
  view = View(kc, vc, l)
  if write:
    with jax.named_scope(attention.WRITE_SCOPE):
      view = fmt.write_token(view, k_store[:, 0], v[:, 0], lengths)
  blk = min(QUANT_DECODE_BLOCK, capacity)
  segments = [attention.SourceSegment(src, blk, -(-capacity // blk))
              for src in fmt.sources(view, lengths + 1, _rotate(config))]
  return attention.finalize(attention.attend(q, segments), q.dtype), view.k, view.v


def _check_format_plan(cache: KVCache, plan) -> None:
  if plan is None:
    return
  if cache.compressed:
    plan.check(compressed=cache.format.spec)
  if cache.evicting:
    plan.check(compressed=str(cache.evict.policy))


def chunk_trips(T: int, chunk: int, capacity: int, seq: int = 1,
                block: int = PREFILL_BLOCK) -> tuple[float, int]:
  """Cache blocks the chunked prefill's CacheSegment loop runs per layer:
  (the mean over the scanned full chunks at offsets 0, C, 2C, ..., the last
  shorter chunk's). On a seq mesh, the most any device runs (the one holding
  the earliest slots): the devices meet at every layer's merge, so the
  slowest sets the pace. With C a multiple of the block, no block is partly
  empty, so the loop's FLOPs are exactly the causal prefix's."""
  S = capacity // seq
  blk = min(block, S)
  trips = lambda start: -(-min(start, S) // blk)
  full = T // chunk
  mean = sum(trips(i * chunk) for i in range(full)) / full if full else 0.0
  return mean, trips(full * chunk)


def _chunked_prefill(config: ModelConfig, params: Params, tokens: jax.Array,
                     lengths: jax.Array, cache: KVCache, block: int, chunk: int, plan):
  """prefill in chunks of `chunk` tokens (see prefill). Every chunk runs all
  layers; at each, _chunk_attention writes its K/V into the cache and attends
  the cache slots before it plus the chunk itself, causally. A scan walks the
  full chunks (one traced body, the offset a loop variable, the cache loop's
  trip count declared by chunk_trips) and a last, shorter chunk is traced once
  more at its static offset: one compiled program, at most two chunk bodies.
  (The short chunk goes last so that every chunk starts at a multiple of C,
  hence of the attention block: see chunk_trips.)"""
  B, T = tokens.shape
  D = config.hidden_size
  full, tail = divmod(T, chunk)
  seq = plan.size("seq") if plan is not None else 1
  mean_trips, tail_trips = chunk_trips(T, chunk, cache.capacity, seq, block)
  last_row = lengths - 1  # the position whose logits each row returns
  fmt = cache.format

  def run(carry, start, size, trips):
    k_cache, v_cache, last = carry
    x0 = _embed(config, params, jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1))
    if plan is not None:  # the chunk's tokens split over seq, as a one-pass prompt's
      x0 = plan.constrain(x0, plan.sharding(("batch", "seq", "embed"), "prefill"))
    rope = rope_cos_sin(config, jnp.broadcast_to(start + jnp.arange(size), (B, size)))

    def body(lp, l, c, shared):
      x, kc, vc = c
      q, k, v, k_store = _layer_qkv(config, fmt, lp, x, rope, shared)
      write = shared is None
      if fmt is None:
        attn, kc, vc = _chunk_attention(config, kc, vc, l, q, k, v, start, block, trips, plan,
                                        write)
      else:
        attn, kc, vc = _format_chunk(config, fmt, kc, vc, l, q, k, v, k_store, start, lengths,
                                     block, trips, write)
      return (_out_and_mlp(config, lp, x, attn), kc, vc), (k, v, k_store)

    x, k_cache, v_cache = _cache_loop(
        config, params, x0, cache.replace(k=k_cache, v=v_cache), body,
        lambda host, l, block: streaming.write_back_slots(host, l, block, start, size))
    inside = (last_row >= start) & (last_row < start + size)
    row = x[jnp.arange(B), jnp.clip(last_row - start, 0, size - 1)]
    return k_cache, v_cache, jnp.where(inside[:, None], row, last)

  carry = (cache.k, cache.v, jnp.zeros((B, D), config.dtype))
  if full:
    carry, _ = jax.lax.scan(lambda c, i: (run(c, i * chunk, chunk, mean_trips), None), carry,
                            jnp.arange(full))
  if tail:  # at a static offset: one device's cache loop has a known trip count
    carry = run(carry, full * chunk, tail, tail_trips)
  k_cache, v_cache, last = carry
  return _logits(config, params, last), cache.replace(k=k_cache, v=v_cache,
                                                      lengths=lengths.astype(jnp.int32))


def check_chunk(chunk, plan=None, prompt_len: int | None = None) -> int | None:
  """The prefill chunk as an int (numpy integers accepted) or None; ValueError
  naming the allowed values for one that is not None or an int >= 0, or, on a
  mesh with a `seq` axis of size s, for a chunk shorter than the prompt that
  s does not divide (each device holds C/s of a chunk's tokens)."""
  if chunk is None:
    return None
  if isinstance(chunk, (bool, np.bool_)) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
    raise ValueError(f"prefill chunk={chunk!r}; allowed: None or an int >= 0 (0: one pass)")
  chunk = int(chunk)
  s = plan.size("seq") if plan is not None else 1
  if chunk and chunk % s and (prompt_len is None or chunk < prompt_len):
    raise ValueError(f"prefill chunk={chunk} on a mesh with seq:{s}: allowed: 0 (one pass) or "
                     f"a multiple of {s} (each device holds chunk/{s} of a chunk's tokens; a "
                     f"chunk as long as the prompt runs in one pass)")
  return chunk


def prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache, block: int = PREFILL_BLOCK, plan=None,
            chunk: int | None = None) -> tuple[jax.Array, KVCache]:
  """Runs right-padded prompts tokens [B, T] (row b valid up to lengths[b]).

  Returns the logits [B, V] of each row's last prompt token and the cache with
  slots [0, T) written and `lengths` set. Padding slots beyond lengths[b] are
  overwritten by decode before anything attends to them. plan: an
  lctx.sharding.Plan when running sharded (sequence parallelism needs it).
  chunk: prefill C tokens at a time through all layers (_chunked_prefill);
  None, 0 or C >= T: one pass. Raises ValueError for a prompt longer than the
  cache, a chunk that is not a non-negative int, or a chunk shorter than the
  prompt that a `seq` mesh axis does not divide (check_chunk).
  """
  B, T = tokens.shape
  chunk = check_chunk(chunk, plan, T)
  _check_format_plan(cache, plan)
  if cache.evicting:
    check_evict_sharing(config, cache.evict.policy)
    return _evict_prefill(config, params, tokens, lengths, cache, block, chunk)
  if T > cache.capacity:
    raise ValueError(f"prompt length {T} exceeds the cache capacity {cache.capacity}")
  if chunk and chunk < T:
    return _chunked_prefill(config, params, tokens, lengths, cache, block, chunk, plan)
  rope = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(T), (B, T)))  # one table, all layers

  fmt = cache.format

  def body(lp, l, carry, shared):
    x, k_cache, v_cache = carry
    q, k, v, k_store = _layer_qkv(config, fmt, lp, x, rope, shared)
    write = shared is None
    if fmt is None:
      attn, k_cache, v_cache = _prefill_attention(config, k_cache, v_cache, l, q, k, v, block,
                                                  plan, write)
    else:
      attn, k_cache, v_cache = _format_prefill(fmt, k_cache, v_cache, l, q, k, v, k_store,
                                               lengths, block, write)
    return (_out_and_mlp(config, lp, x, attn), k_cache, v_cache), (k, v, k_store)

  x, k_cache, v_cache = _cache_loop(config, params, _embed(config, params, tokens), cache, body,
                                    streaming.write_back_layer)
  last = x[jnp.arange(B), lengths - 1]  # [B, D]
  return _logits(config, params, last), cache.replace(k=k_cache, v=v_cache,
                                                      lengths=lengths.astype(jnp.int32))


def _evict_prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
                   cache: KVCache, block: int, chunk: int | None):
  """prefill with token eviction (lctx.model.evicting): one pass, each layer
  keeps its best tokens; or in chunks, compacted back to the budget after
  each (_evict_chunked_prefill)."""
  B, T = tokens.shape
  policy = cache.evict.policy
  budget, n_max = evicting.budgets(policy, lengths, T)
  if n_max > cache.capacity:
    raise ValueError(f"{policy} keeps up to {n_max} of the prompt's {T} tokens; the cache "
                     f"capacity is {cache.capacity} (allowed: a capacity >= {n_max})")
  if chunk and chunk < T:
    return _evict_chunked_prefill(config, params, tokens, lengths, cache, block, chunk, budget,
                                  n_max)
  fmt = cache.format
  rope = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(T), (B, T)))

  def body(lp, l, carry):
    x, parts = carry
    if fmt is None:
      q, k, v = _qkv(config, lp, x, rope)
      k_store = k
    else:
      q, k, v, k_store = _qkv_stored(config, fmt, lp, x, rope)
    part = attention.causal_attention(q, k, v, block, normalize=False)
    attn = attention.finalize(part, q.dtype)
    parts, _ = evicting.prefill_layer(config, cache, parts, l, q, k, v, k_store, lengths, n_max,
                                      budget, part)
    return _out_and_mlp(config, lp, x, attn), parts

  ev = cache.evict
  x, parts = _layer_loop(params["layers"], (_embed(config, params, tokens),
                                            (cache.k, cache.v, ev.pos, ev.acc)), body)
  last = x[jnp.arange(B), lengths - 1]
  return _logits(config, params, last), _evicted(cache, parts, lengths, budget)


def _evicted(cache: KVCache, parts, lengths, budget) -> KVCache:
  """The cache after an evicting prefill: budget[b] slots filled per row."""
  k, v, pos, acc = parts
  count = jnp.minimum(budget, lengths).astype(jnp.int32)
  policy = cache.evict.policy
  lengths = lengths.astype(jnp.int32)
  shift = lengths - count if evicting.cache_positions(policy) else jnp.zeros_like(count)
  ev = cache.evict.replace(pos=pos, acc=acc, next_pos=lengths, shift=shift,
                           budget=budget.astype(jnp.int32),
                           step=jnp.zeros_like(count))
  return cache.replace(k=k, v=v, lengths=count, evict=ev)


def _evict_chunked_prefill(config: ModelConfig, params: Params, tokens: jax.Array,
                           lengths: jax.Array, cache: KVCache, block: int, chunk: int,
                           budget: jax.Array, n_max: int):
  """Chunked prefill with eviction: each chunk attends the kept slots
  [0, filled) and itself (causally), then at every layer the kept slots and
  the chunk's tokens are scored together (lctx.cache.evict.select) and the
  best budget[b] written back to slots [0, n_max): memory is bounded by the
  budget plus one chunk, whatever the prompt's length. Full chunks run
  under a scan, a shorter last one once more (as _chunked_prefill). A
  per-token quantized cache (int8, int4) is compacted by gathering its
  stored entries, never re-quantized (lctx.model.evicting.Slots)."""
  policy = cache.evict.policy
  if evicting.cache_positions(policy):
    raise ValueError(f"chunked prefill with {policy}: positions=cache re-rotates keys once, "
                     f"after a one-pass prefill; allowed: chunk=None, or positions=original")
  method = evict.method(policy)
  evicting.check_chunked_format(policy, cache.format)
  B, T = tokens.shape
  D = config.hidden_size
  full, tail = divmod(T, chunk)
  S = cache.capacity
  blk = min(block, S)
  trips = float(-(-min(n_max, S) // blk))
  last_row = lengths - 1
  slots = evicting.Slots(config, cache.format)

  def run(carry, start, size):
    parts, filled, last = carry
    x0 = _embed(config, params, jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1))
    q_pos = jnp.broadcast_to(start + jnp.arange(size, dtype=jnp.int32), (B, size))
    rope = rope_cos_sin(config, q_pos)
    real = q_pos < lengths[:, None]
    seen = jnp.minimum(lengths, start + size).astype(jnp.int32)

    def body(lp, l, c):
      x, (kc, vc, pa, aa) = c
      q, k, v = _qkv(config, lp, x, rope)
      part = attention.attend(q, slots.segments(kc, vc, l, filled, block, trips)
                              + [attention.ChunkSegment(k, v, block)])
      attn = attention.finalize(part, q.dtype)
      K = k.shape[2]
      kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
      k_old, v_old = slots.read(kc, vc, l)
      cand_pos = jnp.concatenate([store.layer(pa, l)[:, :, 0, :],
                                  jnp.broadcast_to(q_pos[:, None, :], (B, K, size))], axis=-1)
      in_cache = jnp.arange(S)[None, :] < filled[:, None]
      valid = jnp.concatenate([jnp.broadcast_to(in_cache[:, None], (B, K, S)),
                               jnp.broadcast_to(real[:, None], (B, K, size))], axis=-1)
      acc = None
      if aa is not None:
        acc = jnp.concatenate([store.layer(aa, l)[:, :, 0, :],
                               jnp.zeros((B, K, size), jnp.float32)], axis=-1)
      cand = Candidates(
          q=q, q_pos=q_pos, q_valid=real,
          k=jnp.concatenate([k_old.astype(kt.dtype), kt], axis=-1),
          v=jnp.concatenate([v_old.astype(vt.dtype), vt], axis=-2),
          pos=cand_pos, valid=valid, acc=acc, next_pos=seen, budget=budget, layer=l,
          step=jnp.zeros((B,), jnp.int32),
          lse=evicting.group_lse(evicting.lse_of(part), K))
      idx, _, acc = select(method, policy, cand, n_max)
      kc, vc = slots.compact(kc, vc, l, kt, vt, idx)
      pa = store.write_prefix(pa, l, gather(cand_pos, idx, 2)[:, :, None, :])
      if aa is not None:
        aa = store.write_prefix(aa, l, gather(acc, idx, 2)[:, :, None, :])
      return _out_and_mlp(config, lp, x, attn), (kc, vc, pa, aa)

    x, parts = _layer_loop(params["layers"], (x0, parts), body)
    filled = jnp.minimum(budget, seen).astype(jnp.int32)
    inside = (last_row >= start) & (last_row < start + size)
    row = x[jnp.arange(B), jnp.clip(last_row - start, 0, size - 1)]
    return parts, filled, jnp.where(inside[:, None], row, last)

  ev = cache.evict
  carry = ((cache.k, cache.v, ev.pos, ev.acc), jnp.zeros((B,), jnp.int32),
           jnp.zeros((B, D), config.dtype))
  if full:
    carry, _ = jax.lax.scan(lambda c, i: (run(c, i * chunk, chunk), None), carry,
                            jnp.arange(full))
  if tail:
    carry = run(carry, full * chunk, tail)
  parts, _, last = carry
  return _logits(config, params, last), _evicted(cache, parts, lengths, budget)


def _decode_attention(config: ModelConfig, k_cache, v_cache, l, lengths, q, k, v,
                      seq_axis: str | None = None, write: bool = True):
  """Writes the new token's K/V and attends over the cache slots [0, lengths].
  write=False: attends only (a layer sharing its group's K/V: its first
  layer wrote the token into the same cache layer).

  With seq_axis (inside shard_map), the cache arrays are this device's slice
  of the sequence: the token is written only by the shard owning its slot, and
  the per-shard partial softmaxes are merged across devices.
  """
  # Local shapes: a shard may hold a subset of rows, heads and slots.
  S = _cache_layer(v_cache, l).shape[-2]
  offset = 0 if seq_axis is None else jax.lax.axis_index(seq_axis) * S
  if write:
    k_cache = _cache_write_token(k_cache, l, lengths - offset, k[:, 0].astype(config.dtype), 3)
    v_cache = _cache_write_token(v_cache, l, lengths - offset, v[:, 0].astype(config.dtype), 2)
  # One block of the whole slice: a decode step scores all S slots in one product.
  local = jnp.clip(lengths + 1 - offset, 0, S)  # this slice's slots up to the new token
  part = _segment(k_cache, v_cache, l, local, block=S).partial(q)
  if seq_axis is not None:
    part = attention.merge_across(part, seq_axis)
  return attention.finalize(part, q.dtype), k_cache, v_cache


def decode(config: ModelConfig, params: Params, tokens: jax.Array, cache: KVCache,
           plan=None) -> tuple[jax.Array, KVCache]:
  """One step: tokens [B] at positions cache.lengths; returns logits [B, V].

  With a plan whose `seq` axis splits the cache's sequence, every device
  attends over its own slice and the partial softmaxes are merged with the
  online-softmax rule (flash-decoding across devices); the cache is never
  gathered.
  """
  lengths = cache.lengths
  fmt = cache.format
  _check_format_plan(cache, plan)
  if cache.evicting:
    check_evict_sharing(config, cache.evict.policy)
    return _evict_decode(config, params, tokens, cache, plan)

  def attend(k_cache, v_cache, l, q, k, v, write):
    if plan is None or not plan.seq_parallel:
      return _decode_attention(config, k_cache, v_cache, l, lengths, q, k, v, write=write)
    # Manual over the whole mesh: each device its batch rows, heads and sequence slice.
    q_axes, new_axes = ("batch", None, "heads", None), ("batch", None, "cache_kv_heads", None)
    fn = lambda kc, vc, l, lens, q, k, v: _decode_attention(
        config, kc, vc, l, lens, q, k, v, "seq", write)
    return _manual_over_cache(plan, "decode", fn, k_cache, v_cache, l, (lengths, q, k, v),
                              (("batch",), q_axes, new_axes, new_axes), q_axes)

  rope = rope_cos_sin(config, lengths[:, None])

  def body(lp, l, carry, shared):
    x, k_cache, v_cache = carry
    q, k, v, k_store = _layer_qkv(config, fmt, lp, x, rope, shared)  # [B, 1, heads, H]
    write = shared is None
    if fmt is None:
      attn, k_cache, v_cache = attend(k_cache, v_cache, l, q, k, v, write)
    else:
      attn, k_cache, v_cache = _format_decode(config, fmt, k_cache, v_cache, l, lengths, q,
                                              k_store, v, cache.capacity, write)
    return (_out_and_mlp(config, lp, x, attn), k_cache, v_cache), (k, v, k_store)

  x, k_cache, v_cache = _cache_loop(
      config, params, _embed(config, params, tokens[:, None]), cache, body,
      lambda host, l, block: streaming.write_back_slot(host, l, block, lengths))
  return _logits(config, params, x[:, 0]), cache.replace(k=k_cache, v=v_cache,
                                                         lengths=lengths + 1)


def _evict_decode(config: ModelConfig, params: Params, tokens: jax.Array, cache: KVCache,
                  plan=None) -> tuple[jax.Array, KVCache]:
  """A decode step of an evicting cache. With decode=evict (methods that
  evict while decoding), lctx.model.evicting.decode_layer: append below the
  budget, one in and one out at it. Otherwise the token is appended at slot
  lengths[b] as in decode (dense or through the format), at RoPE position
  next_pos[b], and its position recorded."""
  ev, lengths, fmt = cache.evict, cache.lengths, cache.format
  policy = ev.policy
  evict_now = dict(policy.params).get("decode") == "evict"
  rope = rope_cos_sin(config, (ev.next_pos - ev.shift)[:, None])
  B = lengths.shape[0]

  def body(lp, l, carry):
    x, parts = carry
    if evict_now:
      q, k, v = _qkv(config, lp, x, rope)
      attn, parts = evicting.decode_layer(config, cache, parts, l, q, k, v, lengths, plan)
      return _out_and_mlp(config, lp, x, attn), parts
    kc, vc, pa, aa = parts
    if fmt is None:
      q, k, v = _qkv(config, lp, x, rope)
      attn, kc, vc = _decode_attention(config, kc, vc, l, lengths, q, k, v)
    else:
      q, k, v, k_store = _qkv_stored(config, fmt, lp, x, rope)
      attn, kc, vc = _format_decode(config, fmt, kc, vc, l, lengths, q, k_store, v,
                                    cache.capacity)
    K = k.shape[2]
    pa = _cache_write_token(pa, l, lengths, jnp.broadcast_to(ev.next_pos[:, None, None],
                                                             (B, K, 1)), 3)
    return _out_and_mlp(config, lp, x, attn), (kc, vc, pa, aa)

  x, (k, v, pos, acc) = _layer_loop(
      params["layers"], (_embed(config, params, tokens[:, None]),
                         (cache.k, cache.v, ev.pos, ev.acc)), body)
  grow = lengths + 1
  if evict_now:
    grow = jnp.where(lengths >= ev.budget, lengths, lengths + 1)
  new_ev = ev.replace(pos=pos, acc=acc, next_pos=ev.next_pos + 1, step=ev.step + 1)
  return _logits(config, params, x[:, 0]), cache.replace(k=k, v=v, lengths=grow, evict=new_ev)


# ---- one prefill, many eviction policies (the quality harness) ----------------

def prefill_capture(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
                    block: int = PREFILL_BLOCK):
  """An uncompressed one-pass prefill that keeps what each layer's eviction
  would score: returns (logits [B, V] of each row's last token, captured),
  captured = per layer (q [B, T, N, H], k [B, T, K, H] post-RoPE, v, the
  attention's Partial), each stacked over the layers [L, ...].

  In the one-pass protocol (kvpress's) a layer's hidden states do not depend
  on what the layers below keep, so this is the common first half of every
  evicting prefill of these tokens: `evict_from_capture` finishes it for any
  policy, as _evict_prefill would, without running the model again.
  ValueError under cross-layer KV sharing (eviction refuses it anyway)."""
  if config.kv_share_every != 1:
    raise ValueError(f"prefill_capture with kv_share_every={config.kv_share_every}: eviction "
                     f"needs one cache layer per layer; allowed: kv_share_every=1")
  B, T = tokens.shape
  rope = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(T), (B, T)))

  def layer(lp, x):
    q, k, v = _qkv(config, lp, x, rope)
    part = attention.causal_attention(q, k, v, block, normalize=False)
    return _out_and_mlp(config, lp, x, attention.finalize(part, q.dtype)), (q, k, v, part)

  x = _embed(config, params, tokens)
  if isinstance(params["layers"], (tuple, list)):
    per_layer = []
    for lp in params["layers"]:
      x, c = layer(lp, x)
      per_layer.append(c)
    captured = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  else:
    x, captured = jax.lax.scan(lambda x, lp: layer(lp, x), x, params["layers"])
  return _logits(config, params, x[jnp.arange(B), lengths - 1]), captured


def evict_from_capture(config: ModelConfig, captured, lengths: jax.Array,
                       cache: KVCache) -> KVCache:
  """The evicting cache `cache` (empty; its policy and format) filled from a
  prefill_capture of prompts of `lengths` [B]: each layer selects and writes
  its kept tokens exactly as the one-pass evicting prefill does
  (evicting.prefill_layer). ValueError for a cache that does not evict, a
  format storing keys before RoPE, or too small a capacity."""
  if not cache.evicting:
    raise ValueError("evict_from_capture needs an evicting cache (an eviction policy in "
                     "kv_compression)")
  fmt = cache.format
  if fmt is not None and fmt.pre_rope:
    raise ValueError(f"evict_from_capture with {fmt.spec!r}: keys stored before RoPE; allowed: "
                     f"formats storing rotated keys (int8, int4, fp8, kivi)")
  T = captured[1].shape[-3]
  budget, n_max = evicting.budgets(cache.evict.policy, lengths, T)
  if n_max > cache.capacity:
    raise ValueError(f"{cache.evict.policy} keeps up to {n_max} tokens; the cache capacity is "
                     f"{cache.capacity} (allowed: a capacity >= {n_max})")

  def body(c, l, parts):
    q, k, v, part = c["c"]
    return evicting.prefill_layer(config, cache, parts, l, q, k, v, k, lengths, n_max, budget,
                                  part)[0]

  ev = cache.evict
  if isinstance(ev.pos, (tuple, list)):  # a cache per layer: static layer indices
    layers = [{"c": jax.tree.map(lambda a: a[l], captured)} for l in range(len(cache.k))]
  else:
    layers = {"c": captured}
  parts = _layer_loop(layers, (cache.k, cache.v, ev.pos, ev.acc), body)
  return _evicted(cache, parts, lengths, budget)
