"""The decoder as pure functions of (config, params, inputs[, cache]).

Three entry points share one layer body:
  forward  teacher-forced logits [B, T, V], no cache;
  prefill  fills cache slots [0, T) and returns the logits of each row's last
           prompt token;
  decode   one token per row, written at slot `lengths[b]`, attends to slots
           [0, lengths[b]].
The layer loop follows the params' layout: stacked layers run under
`lax.scan` (fast to compile at any depth), a tuple of per-layer dicts runs
unrolled (each layer reads its own weight and cache buffers with no slicing
copies: about 2x faster decode on CPU, measured in experiments/bench_decode).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lctx.cache.dense import KVCache
from lctx.config import ModelConfig
from lctx.model import attention
from lctx.model.layers import apply_rope, rms_norm, rope_cos_sin, swiglu
from lctx.model.params import Params

PREFILL_BLOCK = 512


# ---- pieces of one layer -----------------------------------------------------

def _qkv(config: ModelConfig, lp: Params, x_btd: jax.Array, positions_bt: jax.Array):
  # Separate Q, K, V matmuls: a fused [D, N + 2K, H] projection measured 2x
  # slower in CPU prefill (slicing its output costs more than it saves).
  dtype = x_btd.dtype
  h = rms_norm(x_btd, lp["attn_norm"], config.rms_norm_eps)
  q = jnp.einsum("btd,dnh->btnh", h, lp["w_q"].astype(dtype))
  k = jnp.einsum("btd,dkh->btkh", h, lp["w_k"].astype(dtype))
  v = jnp.einsum("btd,dkh->btkh", h, lp["w_v"].astype(dtype))
  cos, sin = rope_cos_sin(config, positions_bt)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _out_and_mlp(config: ModelConfig, lp: Params, x_btd: jax.Array, attn_btnh: jax.Array):
  B, T, N, H = attn_btnh.shape
  # One [N*H, D] matmul on flattened heads: with a (n, h) einsum the CPU backend
  # picked a layout that transposes w_o every step.
  w_o = lp["w_o"].astype(x_btd.dtype).reshape(N * H, -1)
  x = x_btd + attn_btnh.reshape(B, T, N * H) @ w_o
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


# ---- cache access, for both layouts -------------------------------------------

def _cache_layer(kv, l):
  if isinstance(kv, tuple):
    return kv[l]
  return jax.lax.dynamic_index_in_dim(kv, l, axis=0, keepdims=False)


def _cache_write_prefix(kv, l, new):
  """Writes slots [0, T) of layer l (every row) in place; new is laid out as the cache."""
  if isinstance(kv, tuple):
    return kv[:l] + (jax.lax.dynamic_update_slice(kv[l], new, (0, 0, 0, 0)),) + kv[l + 1:]
  return jax.lax.dynamic_update_slice(kv, new[None], (l, 0, 0, 0, 0))


def _cache_write_token(kv, l, slots_b, new_bkh, seq_axis):
  """Writes row b's new token at slot slots_b[b] of layer l, in place.

  seq_axis: the slot axis of a per-layer array (3 for keys [B, K, H, S], 2 for
  values [B, K, S, H]). Out-of-range slots are dropped, never clamped onto a
  valid slot (callers check capacity before the step).
  """
  rows = jnp.arange(slots_b.shape[0])
  if rows.shape[0] == 1:
    # XLA rewrites a one-update scatter into a dynamic-update-slice, which the CPU
    # backend then duplicates into its readers and copies the whole cache layer
    # every step. A second, identical update keeps it a scatter, updated in place.
    rows, slots_b, new_bkh = (jnp.concatenate([a, a]) for a in (rows, slots_b, new_bkh))
  index = [rows, slice(None), slice(None), slice(None)]
  index[seq_axis] = slots_b
  if isinstance(kv, tuple):
    layer = kv[l].at[tuple(index)].set(new_bkh, mode="drop")
    return kv[:l] + (layer,) + kv[l + 1:]
  return kv.at[(l, *index)].set(new_bkh, mode="drop")


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
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))

  def body(lp, l, x):
    q, k, v = _qkv(config, lp, x, positions)
    return _out_and_mlp(config, lp, x, attention.causal_attention(q, k, v, block))

  x = _layer_loop(params["layers"], _embed(config, params, tokens), body)
  return _logits(config, params, x)


def prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache, block: int = PREFILL_BLOCK) -> tuple[jax.Array, KVCache]:
  """Runs right-padded prompts tokens [B, T] (row b valid up to lengths[b]).

  Returns the logits [B, V] of each row's last prompt token and the cache with
  slots [0, T) written and `lengths` set. Padding slots beyond lengths[b] are
  overwritten by decode before anything attends to them.
  """
  B, T = tokens.shape
  if T > cache.capacity:
    raise ValueError(f"prompt length {T} exceeds the cache capacity {cache.capacity}")
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))

  def body(lp, l, carry):
    x, k_cache, v_cache = carry
    q, k, v = _qkv(config, lp, x, positions)
    k_cache = _cache_write_prefix(k_cache, l, k.transpose(0, 2, 3, 1).astype(config.dtype))
    v_cache = _cache_write_prefix(v_cache, l, v.transpose(0, 2, 1, 3).astype(config.dtype))
    x = _out_and_mlp(config, lp, x, attention.causal_attention(q, k, v, block))
    return x, k_cache, v_cache

  x, k_cache, v_cache = _layer_loop(
      params["layers"], (_embed(config, params, tokens), cache.k, cache.v), body)
  last = x[jnp.arange(B), lengths - 1]  # [B, D]
  return _logits(config, params, last), KVCache(k_cache, v_cache, lengths.astype(jnp.int32))


def decode(config: ModelConfig, params: Params, tokens: jax.Array,
           cache: KVCache) -> tuple[jax.Array, KVCache]:
  """One step: tokens [B] at positions cache.lengths; returns logits [B, V]."""
  B = tokens.shape[0]
  K, G, H = config.num_kv_heads, config.group_size, config.head_dim
  lengths = cache.lengths
  valid_bs = jnp.arange(cache.capacity)[None, :] <= lengths[:, None]

  def body(lp, l, carry):
    x, k_cache, v_cache = carry
    q, k, v = _qkv(config, lp, x, lengths[:, None])  # [B, 1, heads, H]
    k_cache = _cache_write_token(k_cache, l, lengths, k[:, 0].astype(config.dtype), 3)
    v_cache = _cache_write_token(v_cache, l, lengths, v[:, 0].astype(config.dtype), 2)
    part = attention.decode_attention(q.reshape(B, K, G, H), _cache_layer(k_cache, l),
                                      _cache_layer(v_cache, l), valid_bs)
    attn = attention.finalize(part, x.dtype).reshape(B, 1, K * G, H)
    return _out_and_mlp(config, lp, x, attn), k_cache, v_cache

  x, k_cache, v_cache = _layer_loop(
      params["layers"], (_embed(config, params, tokens[:, None]), cache.k, cache.v), body)
  return _logits(config, params, x[:, 0]), KVCache(k_cache, v_cache, lengths + 1)
