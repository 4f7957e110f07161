"""lctx.cache.quant.kvquant: pre-RoPE per-channel keys, per-token values,
exact outliers and sinks, against a numpy reference written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import importorskip

import lctx
from lctx import ModelConfig, engine
from lctx.cache.quant import View, make_format
from lctx.cache.quant.kvquant import KVQuant
from lctx.cache.spec import parse
from lctx.model import attention, transformer

hypothesis = importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

CFG = ModelConfig.from_preset("tiny")  # head_dim 8, 2 KV heads, 8 query heads, 2 layers, fp32
K, H = CFG.num_kv_heads, CFG.head_dim
SPEC = "kvquant:outliers=0.25,sinks=2"  # 4 bits, 2 outliers of 8 channels, 2 sinks


def random_params(config, seed=0, std=0.02):
  """init_params' distribution (normal(0, std) weights, norms at 1) drawn with
  numpy: building the nnx module eagerly takes seconds on a loaded CPU."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, std, x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, lctx.abstract_params(config))


PARAMS = random_params(CFG)


def fmt_of(bits=4, outliers=0.25, sinks=2, heads=K, head_dim=H):
  return KVQuant(num_kv_heads=heads, head_dim=head_dim, dtype="float32", bits=bits,
                 outliers=outliers, sinks=sinks, spec="kvquant")


# ---- numpy reference ------------------------------------------------------------------

def np_rope(x, positions, inverse=False):
  """RoPE of keys x [B, K, H, n] at positions [n] (pairs (i, i + H/2)), the
  angles rounded to float32 as the model computes them; inverse: un-rotate."""
  H = x.shape[2]
  inv_freq = (1.0 / CFG.rope_theta ** (np.arange(0, H, 2) / H)).astype(np.float32)
  angle = (np.asarray(positions, np.float32)[:, None] * inv_freq).astype(np.float64).T  # [H/2, n]
  c, s = np.cos(angle), np.sin(angle) * (-1 if inverse else 1)
  a, b = x[:, :, :H // 2].astype(np.float64), x[:, :, H // 2:].astype(np.float64)
  return np.concatenate([a * c - b * s, b * c + a * s], axis=2)


def np_split(x, n_out, c):
  """(inliers, outlier values, outlier channels) of x along channel axis c:
  each vector's n_out largest magnitudes (ties: the lower channel)."""
  xl = np.moveaxis(np.asarray(x, np.float32), c, -1)
  idx = np.argsort(-np.abs(xl), axis=-1, kind="stable")[..., :n_out]
  inl = xl.copy()
  np.put_along_axis(inl, idx, 0, -1)
  back = lambda a: np.moveaxis(a, -1, c)
  return back(inl), back(np.take_along_axis(xl, idx, -1)), back(idx)


def np_roundtrip(inl, scale, qmax):
  s = np.asarray(scale, np.float32)
  y = np.where(s > 0, inl / np.where(s > 0, s, 1).astype(np.float32), 0).astype(np.float32)
  return np.clip(np.round(y), -qmax, qmax).astype(np.float32) * s


def np_key_scale(fmt, k, real):
  """Per-channel key scale [B, K, H, 1] of keys k [B, K, H, n] calibrated on
  the real slots [B, n] (amax of the inliers * float32(1 / qmax))."""
  inl, _, _ = np_split(k, fmt.n_out, 2)
  amax = np.where(real[:, None, None], np.abs(inl), 0).max(axis=3, keepdims=True)
  return amax * np.float32(1 / fmt.qmax)


def np_seen(fmt, k, v, key_scale):
  """What attention reads, keys before RoPE: k [B, K, H, S], v [B, K, S, H]
  quantized (keys with key_scale, values per token), outliers put back,
  slots < sinks exact."""
  out = []
  for side, x, c in (("k", k, 2), ("v", v, 3)):
    inl, vals, idx = np_split(x, fmt.n_out, c)
    if side == "k":
      scale = key_scale
    else:
      scale = np.abs(inl).max(axis=3, keepdims=True) * np.float32(1 / fmt.qmax)
    deq = np.moveaxis(np_roundtrip(inl, scale, fmt.qmax), c, -1)
    np.put_along_axis(deq, np.moveaxis(idx, c, -1), np.moveaxis(vals, c, -1), -1)
    deq = np.moveaxis(deq, -1, c)
    slot = 3 if side == "k" else 2
    sink = (np.arange(x.shape[slot]) < fmt.sinks).reshape([-1 if a == slot else 1
                                                           for a in range(4)])
    out.append(np.where(sink, x, deq).astype(np.float32))
  return out


def np_unpack(fmt, packed, c):
  """Packed codes (the documented layout) -> int codes along channel axis c."""
  if fmt.bits == 8:
    return np.asarray(packed, np.int64)
  p = np.asarray(packed, np.int64)
  parts = [(p >> (j * fmt.bits)) & (2 ** fmt.bits - 1) for j in range(8 // fmt.bits)]
  u = np.take(np.concatenate(parts, axis=c), np.arange(fmt.head_dim), axis=c)
  return u - 2 ** (fmt.bits - 1)


def np_attention(q, k, v, n):
  """q [B, N, H]; k [B, K, H, S] (RoPE applied), v [B, K, S, H]; row b reads
  slots [0, n[b]). float64 -> [B, N, H]."""
  B, N, _ = q.shape
  G = N // k.shape[1]
  out = np.zeros(q.shape)
  for b in range(B):
    for h in range(N):
      kk, vv = k[b, h // G, :, :n[b]].astype(np.float64), v[b, h // G, :n[b]].astype(np.float64)
      s = q[b, h].astype(np.float64) @ kk / np.sqrt(q.shape[-1])
      p = np.exp(s - s.max())
      out[b, h] = p @ vv / p.sum()
  return out


# ---- helpers ----------------------------------------------------------------------------

def fresh_view(fmt, B, S, unrolled=False):
  """One layer's empty arrays as a View: stacked [1, ...] or a one-layer tuple."""
  k, v = fmt.init_layer(B, S)
  wrap = (lambda a: (a,)) if unrolled else (lambda a: a[None])
  return View({n: wrap(a) for n, a in k.items()}, {n: wrap(a) for n, a in v.items()}, 0)


@functools.partial(jax.jit, static_argnums=0)
def _prefix(fmt, kd, vd, k, v, lengths):
  view = fmt.write_prefix(View(kd, vd, 0), k, v, lengths)
  return view.k, view.v


@functools.partial(jax.jit, static_argnums=0)
def _chunk(fmt, kd, vd, k, v, start, lengths):
  view = fmt.write_chunk(View(kd, vd, 0), k, v, start, lengths)
  return view.k, view.v


@functools.partial(jax.jit, static_argnums=0)
def _token(fmt, kd, vd, k, v, slots):
  view = fmt.write_token(View(kd, vd, 0), k, v, slots)
  return view.k, view.v


@functools.partial(jax.jit, static_argnums=(0, 3))
def _seen(fmt, kd, vd, S):
  """Keys (before RoPE) and values attention reads at every slot: the sink
  source's below `sinks`, the quantized source's above."""
  sources = fmt.sources(View(kd, vd, 0), S, lambda k, positions: k)
  k, v = sources[-1].read(0, S)
  if fmt.sinks:
    m = min(S, fmt.sinks)
    sk, sv = sources[0].read(0, fmt.sinks)
    k, v = k.at[..., :m].set(sk[..., :m]), v.at[:, :, :m].set(sv[:, :, :m])
  return k, v


def prefix(fmt, view, k, v, lengths):
  return View(*_prefix(fmt, view.k, view.v, jnp.asarray(k, jnp.float32),
                       jnp.asarray(v, jnp.float32), jnp.asarray(lengths, jnp.int32)), 0)


def chunk(fmt, view, k, v, start, lengths):
  return View(*_chunk(fmt, view.k, view.v, jnp.asarray(k, jnp.float32),
                      jnp.asarray(v, jnp.float32), jnp.int32(start),
                      jnp.asarray(lengths, jnp.int32)), 0)


def token(fmt, view, k, v, slots):
  return View(*_token(fmt, view.k, view.v, jnp.asarray(k, jnp.float32),
                      jnp.asarray(v, jnp.float32), jnp.asarray(slots, jnp.int32)), 0)


def seen(fmt, view):
  k, v = _seen(fmt, view.k, view.v, view.size("v", "codes"))
  return np.array(k), np.array(v)


def arr(view, side, name):
  return np.asarray(view.get(side, name))


# ---- format-level tests -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_outliers_come_back_exact(bits):
  """Each vector's n_out largest-magnitude entries are stored (values and
  channels) and read back bit-exact; the others are within half a step."""
  fmt = fmt_of(bits=bits, outliers=0.25, sinks=0)
  assert fmt.n_out == 2
  rng = np.random.default_rng(bits)
  B, T = 2, 7
  k = rng.standard_normal((B, K, H, T)).astype(np.float32)
  v = rng.standard_normal((B, K, T, H)).astype(np.float32)
  for x, c in ((k, 2), (v, 3)):  # plant two large entries per vector, at random channels
    xl = np.moveaxis(x, c, -1)
    big = rng.permuted(np.tile(np.arange(H), (B, K, T, 1)), axis=-1)[..., :2]
    np.put_along_axis(xl, big, 40 * np.take_along_axis(xl, big, -1), -1)
  view = prefix(fmt, fresh_view(fmt, B, T), k, v, [T, T])
  got_k, got_v = seen(fmt, view)
  for side, x, got, c in (("k", k, got_k, 2), ("v", v, got_v, 3)):
    _, vals, idx = np_split(x, 2, c)
    stored = arr(view, side, "outlier_index")
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(np.sort(stored, axis=c), np.sort(idx, axis=c))
    np.testing.assert_array_equal(arr(view, side, "outlier_values"),
                                  np.take_along_axis(x, stored.astype(np.int64), c))
    np.testing.assert_array_equal(np.take_along_axis(got, idx, c), vals)  # bit-exact
    mask = np.ones(x.shape, bool)
    np.put_along_axis(mask, idx, False, c)
    step = arr(view, side, "scale")
    err = np.abs(got - x) - np.broadcast_to(step, x.shape) / 2 * (1 + 2.0 ** -20)
    assert (err[mask] <= 0).all()


def test_sinks_exact_and_excluded_from_the_key_range():
  """The first `sinks` tokens are read back exactly from the sink buffers
  (prompt and decode writes), never calibrate the key scale, and the
  quantized source hides their slots; a row whose prompt is all sinks gets
  its key scale from its first later token."""
  fmt = fmt_of(bits=4, outliers=0.25, sinks=3)
  rng = np.random.default_rng(5)
  B, T, S = 2, 5, 8
  lengths = np.array([5, 2])
  k = rng.standard_normal((B, K, H, T)).astype(np.float32)
  v = rng.standard_normal((B, K, T, H)).astype(np.float32)
  k[..., :3] *= 1000  # sinks: huge, kept exactly, outside the key range
  view = prefix(fmt, fresh_view(fmt, B, S), k, v, lengths)
  real = (np.arange(T) >= 3)[None, :] & (np.arange(T)[None, :] < lengths[:, None])
  np.testing.assert_array_equal(arr(view, "k", "scale"), np_key_scale(fmt, k, real))
  assert not arr(view, "k", "scale")[1].any()  # row 1: no real token past the sinks
  got_k, got_v = seen(fmt, view)
  np.testing.assert_array_equal(got_k[0, :, :, :3], k[0, :, :, :3])
  np.testing.assert_array_equal(got_v[0, :, :3], v[0, :, :3])
  np.testing.assert_array_equal(got_k[1, :, :, :2], k[1, :, :, :2])
  # Decode: row 1's slot 2 is a sink (exact, no calibration), then slot 3 calibrates.
  new = [rng.standard_normal((B, K, H)).astype(np.float32) * 1000 for _ in range(2)]
  view = token(fmt, view, new[0], new[1], [5, 2])
  assert not arr(view, "k", "scale")[1].any()
  got_k, got_v = seen(fmt, view)
  np.testing.assert_array_equal(got_k[1, :, :, 2], new[0][1])
  np.testing.assert_array_equal(got_v[1, :, 2], new[1][1])
  k3 = rng.standard_normal((B, K, H)).astype(np.float32)
  view = token(fmt, view, k3, k3, [6, 3])
  want = np_key_scale(fmt, k3[..., None], np.ones((B, 1), bool))
  np.testing.assert_array_equal(arr(view, "k", "scale")[1], want[1])
  np.testing.assert_array_equal(arr(view, "k", "scale")[0], np_key_scale(fmt, k, real)[0])
  # The quantized source shows slots [sinks, length) only; the sink source slots < length.
  sink_src, q_src = fmt.sources(view, jnp.array([7, 4]), lambda k, p: k)
  assert sink_src.slots == 3 and sink_src.valid is None and q_src.slots == S
  np.testing.assert_array_equal(q_src.valid(jnp.arange(S)),
                                [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0, 0]])


def test_key_range_is_fixed_by_the_prompt():
  """Later keys beyond the calibrated range clip at +-qmax * scale (outliers
  aside); the key scale never moves once set; values scale per token."""
  fmt = fmt_of(bits=4, outliers=0.25, sinks=0)
  rng = np.random.default_rng(6)
  B, T, S = 2, 6, 7
  k = rng.standard_normal((B, K, H, S)).astype(np.float32)
  view = prefix(fmt, fresh_view(fmt, B, S), k, np.swapaxes(k, 2, 3), [T, T])
  scale = arr(view, "k", "scale")
  big = np.full((B, K, H), 10.0, np.float32) * np.abs(k).max()
  view = token(fmt, view, -big, big, [T, T])
  np.testing.assert_array_equal(arr(view, "k", "scale"), scale)
  got_k, got_v = seen(fmt, view)
  # A constant vector: its 2 outliers are channels 0 and 1 (ties: the lower channel).
  np.testing.assert_array_equal(got_k[..., :2, T], -big[..., :2])
  np.testing.assert_array_equal(got_k[..., 2:, T], -7 * scale[..., 2:, 0])
  np.testing.assert_allclose(got_v[:, :, T], big, rtol=1e-6)  # its own scale: no clip


def test_n_out_and_bytes_match_the_arrays():
  """n_out = ceil(outliers H); bytes_per_token and fixed_bytes are exactly
  the arrays' (int16 indices past 256 channels; odd head_dim with 2-bit
  packing pads a byte)."""
  assert [fmt_of(outliers=o, head_dim=30).n_out for o in (0, 0.01, 0.1, 0.2)] == [0, 1, 3, 6]
  for bits, outliers, sinks, head_dim, dtype in [(4, 0.01, 1, 8, "float32"),
                                                 (2, 0.25, 3, 6, "bfloat16"),
                                                 (8, 0.0, 0, 8, "float32"),
                                                 (4, 0.01, 4, 384, "bfloat16")]:
    fmt = KVQuant(num_kv_heads=3, head_dim=head_dim, dtype=dtype, bits=bits,
                  outliers=outliers, sinks=sinks)
    B, S = 2, 16
    arrays = jax.eval_shape(lambda: fmt.init_layer(B, S))
    total = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(arrays))
    assert total == S * B * fmt.bytes_per_token() + fmt.fixed_bytes(B)
    k_side = arrays[0]
    assert ("outlier_index" in k_side) == (outliers > 0) and ("sink" in k_side) == (sinks > 0)
    if outliers:
      assert k_side["outlier_index"].dtype == (jnp.int16 if head_dim > 256 else jnp.uint8)
    assert k_side["codes"].shape[2] == -(-head_dim * bits // 8)


# (bits, outliers, sinks, head_dim): those of test_outliers_come_back_exact (compiled
# once for both), 2-bit codes of 6 channels (a padded byte) with 2 outliers and 3
# sinks, 8-bit codes with no outliers.
PROPERTY_FORMATS = [(2, 0.25, 0, 8), (4, 0.25, 0, 8), (8, 0.25, 0, 8), (2, 0.45, 3, 6),
                    (8, 0.0, 1, 8)]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.data())
def test_quantization_property(data):
  """Bits 2 / 4 / 8, with and without outliers and sinks, padded packing;
  per-row lengths (shorter than the sinks too); values normal, over 30
  octaves, constant or zero, scaled by e^[-20, 20]: what attention reads is
  the numpy reference bit for bit; outliers and sinks are exact; every other
  entry of a real token past the sinks is within half a step (scale / 2)."""
  bits, outliers, sinks, head_dim = data.draw(st.sampled_from(PROPERTY_FORMATS))
  fmt = fmt_of(bits, outliers, sinks, heads=K, head_dim=head_dim)
  B, T = 2, 7  # fixed: one compile per format
  kind = data.draw(st.sampled_from(["normal", "zeros", "constant", "wide"]))
  rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
  shape = (B, K, head_dim, T)
  if kind == "zeros":
    k = np.zeros(shape)
  elif kind == "constant":
    k = np.full(shape, data.draw(st.sampled_from([-2.5, 1.0, 1e-3])))
  elif kind == "wide":
    k = rng.standard_normal(shape) * np.exp2(rng.uniform(-30, 0, shape))
  else:
    k = rng.standard_normal(shape)
  k = (k * np.exp(data.draw(st.floats(-20, 20)))).astype(np.float32)
  v = -np.swapaxes(k, 2, 3)[:, :, ::-1].copy()
  lengths = rng.integers(1, T + 1, B)
  real = (np.arange(T) >= sinks)[None, :] & (np.arange(T)[None, :] < lengths[:, None])
  view = prefix(fmt, fresh_view(fmt, B, T), k, v, lengths)
  key_scale = np_key_scale(fmt, k, real)
  np.testing.assert_array_equal(arr(view, "k", "scale"), key_scale)
  got_k, got_v = seen(fmt, view)
  want_k, want_v = np_seen(fmt, k, v, key_scale)
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
  is_sink = np.arange(T) < sinks
  for x, got, c, scale, r, sink in (
      (k, got_k, 2, key_scale, real[:, None, None, :], is_sink[None, None, None, :]),
      (v, got_v, 3, arr(view, "v", "scale"), real[:, None, :, None], is_sink[None, None, :, None])):
    r, sink = np.broadcast_to(r, x.shape), np.broadcast_to(sink, x.shape)
    out = np.zeros(x.shape, bool)
    if fmt.n_out:
      _, vals, idx = np_split(x, fmt.n_out, c)
      np.put_along_axis(out, idx, True, c)
      np.testing.assert_array_equal(np.take_along_axis(got, idx, c), vals)
    assert (got[sink] == x[sink]).all()
    inner = r & ~out
    half = np.broadcast_to(scale, x.shape) / 2
    assert (np.abs(got - x)[inner] <= (half * (1 + 2.0 ** -20))[inner] + 1e-30).all()
  if kind == "zeros":
    assert not got_k.any() and not got_v.any() and not arr(view, "k", "scale").any()


def test_keys_are_rotated_after_dequantization():
  """The keys attention reads are RoPE(dequant(stored codes, scale, outliers))
  at each slot's position (the model's rotate), for any block start; the
  sinks are RoPE(the exact keys)."""
  fmt = make_format(parse(SPEC).quantization, CFG, 40)
  assert isinstance(fmt, KVQuant) and fmt.pre_rope and fmt.n_out == 2 and fmt.sinks == 2
  rng = np.random.default_rng(7)
  B, S = 2, 40
  k = rng.standard_normal((B, K, H, S)).astype(np.float32)
  v = rng.standard_normal((B, K, S, H)).astype(np.float32)
  view = prefix(fmt, fresh_view(fmt, B, S), k, v, [S, S])
  # The stored arrays, decoded in numpy (the documented packing).
  codes = np_unpack(fmt, arr(view, "k", "codes"), 2)
  deq = np.moveaxis((codes * arr(view, "k", "scale")).astype(np.float32), 2, -1)
  np.put_along_axis(deq, np.moveaxis(arr(view, "k", "outlier_index"), 2, -1).astype(np.int64),
                    np.moveaxis(arr(view, "k", "outlier_values"), 2, -1), -1)
  deq = np.moveaxis(deq, -1, 2)
  blocks = ((0, S), (13, 16), (S - 7, 7))

  @jax.jit
  def reads(kd, vd, starts):
    sink_src, q_src = fmt.sources(View(kd, vd, 0), S, transformer._rotate(CFG))
    return [q_src.read(lo, n)[0] for lo, (_, n) in zip(starts, blocks)], sink_src.read(0, 2)

  got_q, (got, got_v) = reads(view.k, view.v, [jnp.int32(lo) for lo, _ in blocks])
  for (lo, n), got_k in zip(blocks, got_q):
    np.testing.assert_allclose(got_k, np_rope(deq[..., lo:lo + n], np.arange(lo, lo + n)),
                               atol=2e-6, rtol=0)
  np.testing.assert_allclose(got, np_rope(k[..., :2], [0, 1]), atol=2e-6, rtol=0)
  np.testing.assert_array_equal(got_v, v[:, :, :2])


# ---- against the model's dense K/V ------------------------------------------------------

def dense_kv(tokens, lengths, capacity):
  """The dense cache of a prefill: k [L, B, K, H, S] (RoPE applied), v [L, B, K, S, H]."""
  cache = engine.new_cache(CFG, PARAMS, tokens.shape[0], capacity, kv_compression="")
  _, cache = engine.prefill(CFG, PARAMS, tokens, cache, lengths=lengths)
  return np.asarray(cache.k), np.asarray(cache.v)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _attend(fmt, kd, vd, q, n, block):
  sources = fmt.sources(View(kd, vd, 0), n, transformer._rotate(CFG))
  trips = float(-(-sources[-1].slots // block))
  part = attention.attend(q, [attention.SourceSegment(src, block, trips) for src in sources])
  return attention.finalize(part, jnp.float32), len(sources)


@pytest.mark.parametrize("spec,layout,block", [
    ("kvquant:outliers=0.25,sinks=2", "stacked", 512),
    ("kvquant:bits=2,outliers=0.1,sinks=0", "unrolled", 7)])
def test_attention_matches_numpy_reference(spec, layout, block):
  """The model's dense K/V of each layer, keys un-rotated in numpy, written
  into the format (a prompt, then tokens one at a time as decode writes
  them): attention over fmt.sources (blocks of `block` slots: 7 makes the
  last block overlap) equals numpy's attention over the reference (sinks
  exact, keys quantized with the prompt's per-channel range, rotated after
  dequantization) within 1e-5. Row b's slots [p_b, p_b + 4) are its next
  tokens (the dense prefill holds them)."""
  S, T, steps = 24, 9, 4
  fmt = make_format(parse(spec).quantization, CFG, S)
  B, prompt_lengths = 2, np.array([9, 5])
  n = prompt_lengths + steps
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T + steps))
  kk, vv = dense_kv(tokens, n, S)
  q = np.random.default_rng(3).standard_normal((B, 1, CFG.num_heads, H)).astype(np.float32)
  for l in range(CFG.num_layers):
    k = np_rope(kk[l], np.arange(S), inverse=True).astype(np.float32)  # before RoPE
    v = vv[l]
    view = prefix(fmt, fresh_view(fmt, B, S, layout == "unrolled"), k[..., :T], v[:, :, :T],
                  prompt_lengths)
    for i in range(steps):
      slots = prompt_lengths + i
      view = token(fmt, view, k[np.arange(B), :, :, slots], v[np.arange(B), :, slots], slots)
    # The key range: the prompt's real tokens past the sinks, then (channels
    # still unset) each decode token past the sinks in turn.
    real = (np.arange(T) >= fmt.sinks)[None, :] & (np.arange(T)[None, :] < prompt_lengths[:, None])
    key_scale = np_key_scale(fmt, k[..., :T], real)
    for i in range(steps):
      slots = prompt_lengths + i
      new = np_key_scale(fmt, k[np.arange(B), :, :, slots][..., None],
                         (slots >= fmt.sinks)[:, None])
      key_scale = np.where(key_scale > 0, key_scale, new)
    np.testing.assert_array_equal(arr(view, "k", "scale"), key_scale)
    seen_k, seen_v = np_seen(fmt, k, v, key_scale)
    want = np_attention(q[:, 0], np_rope(seen_k, np.arange(S)), seen_v, n)
    out, n_sources = _attend(fmt, view.k, view.v, jnp.asarray(q), jnp.asarray(n), block)
    assert n_sources == (2 if fmt.sinks else 1)
    got = np.asarray(out)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    dense = np_attention(q[:, 0], kk[l], v, n)  # the quantization error, above fp32 noise
    assert 1e-5 < np.abs(got - dense).max() < 0.2


# ---- through the engine ------------------------------------------------------------------

B_E, T_E, CAP_E, LEN_E = 2, 12, 112, np.array([12, 7])  # shared: one compile per prefill kind
TOKENS_E = np.random.default_rng(4).integers(0, CFG.vocab_size, (B_E, T_E))


def np_layer0_kv(tokens):
  """Layer 0's keys (before RoPE) [B, K, H, T] and values [B, K, T, H] from
  the params, in numpy (float64)."""
  P = jax.tree.map(lambda x: np.asarray(x, np.float64), PARAMS)
  x = P["embed"][tokens]
  h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + CFG.rms_norm_eps)
  h = h * P["layers"]["attn_norm"][0]
  k = np.einsum("btd,dkh->bkht", h, P["layers"]["w_k"][0])
  v = np.einsum("btd,dkh->bkth", h, P["layers"]["w_v"][0])
  return k.astype(np.float32), v.astype(np.float32)


def np_chunked_key_scale(fmt, k, lengths, C):
  """The key scale after writing keys k [B, K, H, T] C tokens at a time: each
  chunk in turn sets the channels still unset (amax of its real tokens past
  the sinks)."""
  T = k.shape[3]
  scale = np.zeros(k.shape[:3] + (1,), np.float32)
  for start in range(0, T, C):
    slot = np.arange(start, min(start + C, T))
    real = (slot >= fmt.sinks)[None, :] & (slot[None, :] < lengths[:, None])
    scale = np.where(scale > 0, scale, np_key_scale(fmt, k[..., slot], real))
  return scale


def read_mask(side, lengths, S, lo=0):
  """The slots attention reads ([lo, the row's length)), shaped for a side's arrays."""
  m = (np.arange(S) >= lo)[None, :] & (np.arange(S)[None, :] < lengths[:, None])
  return m[:, None, None, :] if side == "k" else m[:, None, :, None]


@pytest.mark.parametrize("C", [1, 5])
def test_chunk_writes_equal_one_pass_writes_given_the_key_range(C):
  """Format level, on the same K/V (layer 0's, from numpy): a prompt written
  C tokens at a time (write_chunk, the last chunk shorter) holds, at every
  slot attention reads, bit for bit what write_prefix stores: values, value
  scales, outliers and sinks; and the key codes too once the key range is
  the same (write_prefix into a view whose key scale is preset to the
  chunked one). The key scale itself is the first chunk's calibration."""
  fmt = make_format(parse(SPEC).quantization, CFG, T_E)
  k, v = np_layer0_kv(TOKENS_E)
  view = fresh_view(fmt, B_E, T_E)
  for start in range(0, T_E, C):
    view = chunk(fmt, view, k[..., start:start + C], v[:, :, start:start + C], start, LEN_E)
  scale = np_chunked_key_scale(fmt, k, LEN_E, C)
  np.testing.assert_array_equal(arr(view, "k", "scale"), scale)
  one = prefix(fmt, fresh_view(fmt, B_E, T_E), k, v, LEN_E)
  assert not np.array_equal(arr(one, "k", "scale"), scale)  # the whole prompt's range
  preset = fresh_view(fmt, B_E, T_E).set("k", "scale", jnp.asarray(scale))
  preset = prefix(fmt, preset, k, v, LEN_E)
  for side in ("k", "v"):
    for name in ("codes", "outlier_values", "outlier_index") + (("scale",) if side == "v" else ()):
      # The quantized arrays are read at [sinks, length).
      mask = np.broadcast_to(read_mask(side, LEN_E, T_E, fmt.sinks), arr(view, side, name).shape)
      np.testing.assert_array_equal(arr(view, side, name)[mask], arr(preset, side, name)[mask])
      if side == "v" or name != "codes":  # independent of the key range
        np.testing.assert_array_equal(arr(view, side, name)[mask], arr(one, side, name)[mask])
    np.testing.assert_array_equal(arr(view, side, "sink"), arr(one, side, "sink"))


@pytest.mark.parametrize("chunk", [0, 4])
def test_chunked_prefill_writes_what_one_pass_writes(chunk):
  """Layer 0 (whose keys and values do not depend on the cache: later layers
  see the quantized earlier chunks, so their inputs differ by quantization
  error) after a prefill in chunks of 4 or in one pass: at every slot
  attention reads, values, outliers and sinks equal one pass's, and keys are
  the numpy reference's, up to fp32 noise (numpy computes K/V in float64: an
  entry may round to the next code when it sits within noise of a rounding
  boundary, so at most 1% of entries may differ, by at most one step). The
  key scale is the first write's: one pass calibrates on the whole prompt, a
  chunked prefill on its first chunk (a channel whose entries there are all
  outliers or zero: on the first chunk where one is not); later keys beyond
  that range are clipped, which no chunking can avoid without re-quantizing."""
  fmt = make_format(parse(SPEC).quantization, CFG, CAP_E)
  cache = engine.new_cache(CFG, PARAMS, B_E, CAP_E, kv_compression=SPEC)
  _, cache = engine.prefill(CFG, PARAMS, TOKENS_E, cache, lengths=LEN_E, chunk=chunk or None)
  view = View(cache.k, cache.v, 0)
  got_k, got_v = seen(fmt, view)
  k, v = np_layer0_kv(TOKENS_E)
  C = chunk or T_E
  scale = np_chunked_key_scale(fmt, k, LEN_E, C)
  np.testing.assert_allclose(arr(view, "k", "scale"), scale, rtol=1e-5)
  if chunk:
    real = (np.arange(C) >= 2)[None, :] & (np.arange(C)[None, :] < LEN_E[:, None])
    first = np_key_scale(fmt, k[..., :C], real)
    assert (first > 0).sum() > 0.5 * first.size  # mostly set by the first chunk
  want_k, want_v = np_seen(fmt, k, v, arr(view, "k", "scale"))
  read = np.arange(CAP_E)[None, :] < LEN_E[:, None]  # [B, S]
  for got, want, mask, step in ((got_k[..., :T_E], want_k, read[:, None, None, :T_E],
                                 arr(view, "k", "scale")),
                                (got_v[:, :, :T_E], want_v, read[:, None, :T_E, None],
                                 arr(view, "v", "scale")[:, :, :T_E])):
    mask = np.broadcast_to(mask, got.shape)
    diff = np.abs(got - want)[mask]
    close = diff <= 1e-5 * (1 + np.abs(want[mask]))
    assert close.mean() >= 0.99
    assert (diff <= (np.broadcast_to(step, got.shape)[mask] * 1.001 + 1e-5)).all()
  if chunk:  # values, outliers and sinks: what one pass wrote (one-pass cache, same tokens)
    one = engine.new_cache(CFG, PARAMS, B_E, CAP_E, kv_compression=SPEC)
    _, one = engine.prefill(CFG, PARAMS, TOKENS_E, one, lengths=LEN_E)
    one_view = View(one.k, one.v, 0)
    one_k, one_v = seen(fmt, one_view)
    mask = np.broadcast_to(read[:, None, :, None], got_v.shape)
    assert (np.abs(got_v - one_v)[mask] <= 1e-5).mean() >= 0.99
    for side in ("k", "v"):
      np.testing.assert_allclose(arr(view, side, "sink"), arr(one_view, side, "sink"),
                                 atol=1e-6, rtol=0)
    idx = arr(view, "k", "outlier_index")[..., :T_E]
    assert (idx == arr(one_view, "k", "outlier_index")[..., :T_E]).mean() >= 0.99


def test_engine_end_to_end():
  """A KVQuant cache through the engine: physical_bytes is the closed form
  exactly; a chunked prefill and 100 greedy decode steps (one compiled step)
  stay close to the dense model's logits on the same tokens (teacher-forced
  forward): observed max |diff| 0.012 over the 101 steps (0.0065 after the
  prefill) against a logit spread of 1.3 (the tiny random model; 2 of 8
  channels are outliers here), asserted < 0.05; generate picks the same
  greedy tokens."""
  steps = 100
  cache = engine.new_cache(CFG, PARAMS, B_E, CAP_E, kv_compression=SPEC)
  fmt = cache.format
  assert isinstance(fmt, KVQuant) and (fmt.bits, fmt.n_out, fmt.sinks) == (4, 2, 2)
  want_bytes = (CFG.num_layers * (CAP_E * B_E * fmt.bytes_per_token() + fmt.fixed_bytes(B_E))
                + 4 * B_E)
  assert cache.physical_bytes == want_bytes
  # Per token: 2 sides x 2 heads x (4 code bytes + 2 outliers x (4 + 1)) + 2 value scales x 4.
  assert fmt.bytes_per_token() == 2 * 2 * (4 + 2 * 5) + 2 * 4
  logits, cache = engine.prefill(CFG, PARAMS, TOKENS_E, cache, lengths=LEN_E, chunk=4)
  got, chosen = [np.asarray(logits)], []
  before = engine.decode_jit._cache_size()
  for _ in range(steps):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    chosen.append(np.asarray(tok))
    logits, cache = engine.decode_step(CFG, PARAMS, tok, cache)
    got.append(np.asarray(logits))
  assert engine.decode_jit._cache_size() - before <= 1
  np.testing.assert_array_equal(cache.lengths, LEN_E + steps)
  assert cache.physical_bytes == want_bytes
  seqs = np.zeros((B_E, CAP_E), np.int32)
  for b in range(B_E):
    seqs[b, :LEN_E[b] + steps] = np.concatenate([TOKENS_E[b, :LEN_E[b]],
                                                 np.stack(chosen)[:, b]])
  dense = np.asarray(jax.jit(lctx.forward, static_argnums=0)(CFG, PARAMS, jnp.asarray(seqs)))
  want = np.stack([dense[b, LEN_E[b] - 1:LEN_E[b] + steps] for b in range(B_E)], axis=1)
  diff = np.abs(np.stack(got) - want).max(axis=(1, 2))
  print(f"kvquant vs dense logits: max |diff| {diff.max():.4f} (prefill {diff[0]:.4f}), "
        f"logit spread {np.ptp(want):.3f}")
  assert np.isfinite(diff).all() and diff.max() < 0.05
  out = engine.generate(CFG, PARAMS, TOKENS_E, lengths=LEN_E, max_new_tokens=10,
                        capacity=CAP_E, prefill_chunk=4, kv_compression=SPEC)
  np.testing.assert_array_equal(np.asarray(out), np.stack(chosen[:10], axis=1))
  # All sinks: the dense cache, byte for byte (quant.make_format returns None).
  assert not engine.new_cache(CFG, PARAMS, 1, 4, kv_compression="kvquant:sinks=4").compressed


def test_decode_dequantizes_block_by_block_in_place():
  """A decode step's temporaries stay a few blocks (< 10% of the dense
  cache at 16384 slots; a full-precision copy of one layer's keys would be
  12.5%), and the cache is updated in place (donated: every array aliased)."""
  params = lctx.abstract_params(CFG)
  shape = lambda spec: jax.eval_shape(lambda: engine.new_cache(CFG, params, 2, 16384,
                                                               kv_compression=spec))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  cache = shape(SPEC)
  compiled = engine.decode_jit.lower(CFG, params, jax.ShapeDtypeStruct((2,), jnp.int32),
                                     cache).compile()
  mem = compiled.memory_analysis()
  assert mem.temp_size_in_bytes < 0.1 * nbytes(shape(""))
  assert mem.alias_size_in_bytes == nbytes(cache)
