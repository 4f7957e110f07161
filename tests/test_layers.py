"""RMSNorm, RoPE and attention against plain numpy written independently."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lctx import ModelConfig
from lctx.config import RopeScaling
from lctx.model import attention
from lctx.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq


def np_rms_norm(x, w, eps):
  return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w


def np_llama3_freqs(theta, H, factor, low, high, old_len):
  """Llama 3.1's scaled RoPE frequencies, one frequency at a time."""
  out = []
  for i in range(0, H, 2):
    f = 1.0 / theta ** (i / H)
    wavelen = 2 * math.pi / f
    if wavelen < old_len / high:
      out.append(f)
    elif wavelen > old_len / low:
      out.append(f / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def np_rope(x, positions, freqs):
  """Rotation of pairs (i, i + H/2) by angle position * freq_i."""
  H = x.shape[-1]
  out = np.empty_like(x, dtype=np.float64)
  for t, pos in enumerate(positions):
    for i in range(H // 2):
      c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
      a, b = x[t, ..., i], x[t, ..., i + H // 2]
      out[t, ..., i] = a * c - b * s
      out[t, ..., i + H // 2] = b * c + a * s
  return out


def test_rms_norm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32) * 3
  w = rng.normal(size=(16,)).astype(np.float32)
  got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)
  np.testing.assert_allclose(got, np_rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale,eps", [(1e-4, 1e-5), (1e-4, 1e-6), (3e-3, 1e-5)])
def test_rms_norm_small_inputs_use_epsilon(scale, eps):
  """Mean squares of 1e-8 to 1e-5, at or below eps: the output depends on eps
  (dropping it rescales the output by sqrt(1 + eps / ms), 1.4x to 32x)."""
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(4, 64)) * scale).astype(np.float32)
  w = rng.normal(size=(64,)).astype(np.float32)
  want = np_rms_norm(x, w, eps)
  # The case is sensitive: without eps the reference is off by far more than rtol.
  assert np.abs(np_rms_norm(x, w, 0.0) - want).max() > 0.2 * np.abs(want).max()
  got = rms_norm(jnp.asarray(x), jnp.asarray(w), eps)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("linear", 4.0),
                                     RopeScaling("llama3", 8.0, 1.0, 4.0, 32)])
def test_rope_matches_numpy(scaling):
  H, theta = 16, 10000.0
  cfg = ModelConfig(vocab_size=8, hidden_size=2 * H, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=H, rope_theta=theta,
                    rope_scaling=scaling)
  if scaling.rope_type == "llama3":
    freqs = np_llama3_freqs(theta, H, 8.0, 1.0, 4.0, 32)
  else:
    freqs = np.array([1.0 / theta ** (i / H) for i in range(0, H, 2)]) / scaling.factor
  np.testing.assert_allclose(rope_inv_freq(cfg), freqs, rtol=1e-6)
  rng = np.random.default_rng(1)
  positions = np.array([0, 1, 5, 37, 300])
  x = rng.normal(size=(len(positions), 3, H)).astype(np.float32)
  cos, sin = rope_cos_sin(cfg, jnp.asarray(positions)[None])
  got = apply_rope(jnp.asarray(x)[None], cos, sin)[0]
  np.testing.assert_allclose(got, np_rope(x, positions, freqs), rtol=1e-4, atol=1e-4)


def np_causal_attention(q, k, v):
  """Dense masked softmax attention with GQA, [B, T, N, H] -> [B, T, N, H]."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("T,block", [(1, 512), (7, 512), (40, 8), (37, 16), (64, 16)])
def test_blockwise_causal_attention_matches_dense(T, block):
  rng = np.random.default_rng(T)
  q = rng.normal(size=(2, T, 8, 16)).astype(np.float32)
  k = rng.normal(size=(2, T, 2, 16)).astype(np.float32)
  v = rng.normal(size=(2, T, 2, 16)).astype(np.float32)
  got = attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block)
  np.testing.assert_allclose(got, np_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_blockwise_attention_visits_only_lower_triangle():
  """The compiled block loop runs nb(nb+1)/2 times on block x block tiles."""
  T, block = 4096, 512
  q = jax.ShapeDtypeStruct((1, T, 8, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
  hlo = jax.jit(attention.causal_attention, static_argnums=3).lower(
      q, kv, kv, block).compile().as_text()
  nb = T // block
  assert f'"known_trip_count":{{"n":"{nb * (nb + 1) // 2}"}}' in hlo
  assert f"{T},{T}]" not in hlo  # no T x T score matrix anywhere


def _np_attention_over_slots(q, k, v, length):
  """q [B, T, N, H] over the first length[b] slots of k, v [B, K, S, H] (numpy)."""
  B, T, N, H = q.shape
  G = N // k.shape[1]
  kk, vv = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # [B, N, S, H]
  s = np.einsum("btnh,bnsh->btns", q, kk) / math.sqrt(H)
  s = np.where(np.arange(k.shape[2])[None, None, None] < length[:, None, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("btns,bnsh->btnh", p / p.sum(-1, keepdims=True), vv)


@pytest.mark.parametrize("block", [4, 5, 10, 512])
def test_cache_segment_matches_numpy(block):
  """Slots [0, length[b]) of a cache layer, in blocks (5 and 10: the last block
  overlaps the one before it; 512: one block), per-row lengths."""
  rng = np.random.default_rng(block)
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)  # [B, T, N, H], G = 2
  k = rng.normal(size=(2, 2, 12, 8)).astype(np.float32)  # [B, K, S, H]
  v = rng.normal(size=(2, 2, 12, 8)).astype(np.float32)
  length = np.array([12, 7], np.int32)
  kt = k.transpose(0, 1, 3, 2)  # the cache's key layout [B, K, H, S]
  seg = attention.CacheSegment(jnp.asarray(kt), jnp.asarray(v), jnp.asarray(length),
                               block=block, trips=3.0)
  got = attention.finalize(seg.partial(jnp.asarray(q)), jnp.float32)
  np.testing.assert_allclose(got, _np_attention_over_slots(q, k, v, length), rtol=1e-5,
                             atol=1e-6)
  # The stacked layout reads layer 1 of [L, ...] in place, to the same result.
  stacked = attention.CacheSegment(jnp.stack([kt * 0, kt]), jnp.stack([v * 0, v]),
                                   jnp.asarray(length), layer=1, block=block, trips=3.0)
  np.testing.assert_allclose(attention.finalize(stacked.partial(jnp.asarray(q)), jnp.float32),
                             got, rtol=1e-6, atol=1e-6)


def test_cache_segment_over_a_traced_length_needs_declared_trips():
  kt, v = jnp.zeros((1, 1, 8, 32)), jnp.zeros((1, 1, 32, 8))
  seg = attention.CacheSegment(kt, v, jnp.array([9]), block=8)
  with pytest.raises(ValueError, match="needs trips="):
    seg.partial(jnp.zeros((1, 1, 2, 8)))


def test_merge_of_partials_equals_attention_over_union():
  """Two segments over disjoint slots (and a segment with no visible key, the
  identity of merge) give the attention over their union."""
  rng = np.random.default_rng(3)
  q = rng.normal(size=(1, 2, 4, 8)).astype(np.float32)  # [B, T, N, H]
  k = rng.normal(size=(1, 2, 10, 8)).astype(np.float32)  # [B, K, S, H]
  v = rng.normal(size=(1, 2, 10, 8)).astype(np.float32)
  kt = k.transpose(0, 1, 3, 2)
  seg = lambda a, b, n: attention.CacheSegment(jnp.asarray(kt[..., a:b]),
                                               jnp.asarray(v[:, :, a:b]), n)
  whole = attention.attend(jnp.asarray(q), [seg(0, 10, 10)])
  parts = attention.attend(jnp.asarray(q), [seg(0, 6, 6), seg(6, 10, 4), seg(0, 10, 0)])
  np.testing.assert_allclose(attention.finalize(parts, jnp.float32),
                             attention.finalize(whole, jnp.float32), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(attention.finalize(whole, jnp.float32),
                             _np_attention_over_slots(q, k, v, np.array([10])), rtol=1e-5,
                             atol=1e-6)


def test_chunk_segment_partial_merges_with_a_cache_prefix():
  """A chunk's causal attention (ChunkSegment) merged with the cache slots
  before it (CacheSegment) equals causal attention over the whole sequence."""
  rng = np.random.default_rng(4)
  T, start = 24, 16
  q = rng.normal(size=(2, T, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, T, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, T, 2, 8)).astype(np.float32)
  prefix = attention.CacheSegment(jnp.asarray(k.transpose(0, 2, 3, 1)),
                                  jnp.asarray(v.transpose(0, 2, 1, 3)), start, block=8)
  chunk = attention.ChunkSegment(jnp.asarray(k[:, start:]), jnp.asarray(v[:, start:]), 8)
  got = attention.finalize(attention.attend(jnp.asarray(q[:, start:]), [prefix, chunk]),
                           jnp.float32)
  np.testing.assert_allclose(got, np_causal_attention(q, k, v)[:, start:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,shards,block", [(64, 4, 8), (40, 2, 8), (48, 8, 512)])
def test_query_shard_attention_matches_dense(T, shards, block):
  """A shard of queries at an offset against all keys (sequence-parallel prefill)."""
  rng = np.random.default_rng(T)
  q = rng.normal(size=(2, T, 8, 16)).astype(np.float32)
  k = rng.normal(size=(2, T, 2, 16)).astype(np.float32)
  v = rng.normal(size=(2, T, 2, 16)).astype(np.float32)
  want = np_causal_attention(q, k, v)
  n = T // shards
  for s in range(shards):
    got = attention.causal_attention(jnp.asarray(q[:, s * n:(s + 1) * n]), jnp.asarray(k),
                                     jnp.asarray(v), block, q_offset=jnp.int32(s * n))
    np.testing.assert_allclose(got, want[:, s * n:(s + 1) * n], rtol=1e-5, atol=1e-5)
