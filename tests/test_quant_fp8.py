"""lctx.cache.quant.fp8: float8 KV cache with a scale fixed by the first write,
against a numpy float8 rounding written here (not ml_dtypes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import importorskip

import lctx
from lctx import ModelConfig, engine
from lctx.cache.quant import View
from lctx.cache.quant.fp8 import Fp8
from lctx.model import attention, transformer

hypothesis = importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

CFG = ModelConfig.from_preset("tiny")  # head_dim 8, 2 KV heads, 8 query heads, 2 layers, fp32


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
K, H = CFG.num_kv_heads, CFG.head_dim
# (mantissa bits, min normal exponent, max) of each format.
BITS = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}


def fmt_of(scale="tensor", format="e4m3", dtype="float32"):
  return Fp8(num_kv_heads=K, head_dim=H, dtype=dtype, scale=scale, format=format,
             spec=f"fp8:scale={scale},format={format}")


# ---- numpy reference ------------------------------------------------------------------

def np_fp8(y, format):
  """Round-to-nearest-even onto the float8 grid (y float32, already within
  +-max): the step is 2^(e - m) for |y| in [2^e, 2^(e+1)), e >= emin, and the
  subnormal step 2^(emin - m) below 2^emin."""
  m, emin, _ = BITS[format]
  y = np.asarray(y, np.float64)
  _, e = np.frexp(np.abs(y))  # |y| = f 2^e, f in [0.5, 1): floor(log2 |y|) = e - 1
  step = np.exp2(np.maximum(e - 1, emin) - m)
  return np.round(y / step) * step


def np_scale(x, real, per_head, format="e4m3"):
  """amax / fmax of x [B, K, ., .] over entries where real (broadcasting),
  float32, as amax * float32(1 / fmax)."""
  a = np.where(real, np.abs(x), 0).max(axis=(2, 3) if per_head else (1, 2, 3), keepdims=True)
  return a.astype(np.float32) * np.float32(1 / BITS[format][2])


def np_dequant(x, scale, format):
  """What the format reads back for x (float32) with that scale."""
  fmax = BITS[format][2]
  s = np.asarray(scale, np.float32)
  y = np.where(s > 0, x.astype(np.float32) / np.where(s > 0, s, 1).astype(np.float32), 0)
  codes = np_fp8(np.clip(y, -fmax, fmax).astype(np.float32), format).astype(np.float32)
  return codes * s


def np_attention(q, k, v, n):
  """q [B, N, H]; k [B, K, H, S], v [B, K, S, H] as attention sees them;
  row b reads slots [0, n[b]). float64 -> [B, N, H]."""
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

def fresh_view(fmt, B, S):
  """One layer's empty arrays as a View (stacked, one layer)."""
  k, v = fmt.init_layer(B, S)
  return View({n: a[None] for n, a in k.items()}, {n: a[None] for n, a in v.items()}, 0)


@functools.partial(jax.jit, static_argnums=0)
def _prefix(fmt, kd, vd, k, v, lengths):
  view = fmt.write_prefix(View(kd, vd, 0), k, v, lengths)
  return view.k, view.v


@functools.partial(jax.jit, static_argnums=0)
def _token(fmt, kd, vd, k, v, slots):
  view = fmt.write_token(View(kd, vd, 0), k, v, slots)
  return view.k, view.v


@functools.partial(jax.jit, static_argnums=0)
def _chunk(fmt, kd, vd, k, v, start, lengths):
  view = fmt.write_chunk(View(kd, vd, 0), k, v, start, lengths)
  return view.k, view.v


@functools.partial(jax.jit, static_argnums=(0, 3))
def _read(fmt, kd, vd, S):
  (src,) = fmt.sources(View(kd, vd, 0), S)
  return src.read(0, S)


def prefix(fmt, view, k, v, lengths):
  return View(*_prefix(fmt, view.k, view.v, jnp.asarray(k), jnp.asarray(v),
                       jnp.asarray(lengths, jnp.int32)), 0)


def token(fmt, view, k, v, slots):
  return View(*_token(fmt, view.k, view.v, jnp.asarray(k), jnp.asarray(v),
                      jnp.asarray(slots, jnp.int32)), 0)


def chunk(fmt, view, k, v, start, lengths):
  return View(*_chunk(fmt, view.k, view.v, jnp.asarray(k), jnp.asarray(v), jnp.int32(start),
                      jnp.asarray(lengths, jnp.int32)), 0)


def read(fmt, view):
  k, v = _read(fmt, view.k, view.v, view.size("v", "codes"))
  return np.array(k), np.array(v)


def scales(view):
  return np.asarray(view.get("k", "scale")), np.asarray(view.get("v", "scale"))


# ---- format-level tests -----------------------------------------------------------------

@pytest.mark.parametrize("format", ["e4m3", "e5m2"])
def test_saturation(format):
  """A decode token 10x the prompt's amax saturates at +-fmax * scale: never NaN or inf."""
  fmt, fmax = fmt_of("tensor", format), BITS[format][2]
  rng = np.random.default_rng(0)
  B, T, S = 2, 6, 8
  k = rng.standard_normal((B, K, H, T)).astype(np.float32)
  v = rng.standard_normal((B, K, T, H)).astype(np.float32)
  view = prefix(fmt, fresh_view(fmt, B, S), k, v, [T, T])
  ks, vs = scales(view)
  big_k = 10 * np.abs(k).max() * np.sign(rng.standard_normal((B, K, H))).astype(np.float32)
  big_v = -10 * np.abs(v).max() * np.ones((B, K, H), np.float32)
  view = token(fmt, view, big_k, big_v, [T, T])
  rk, rv = read(fmt, view)
  assert np.isfinite(rk).all() and np.isfinite(rv).all()
  np.testing.assert_array_equal(rk[..., T], np.sign(big_k) * np.float32(fmax) * ks[:, :, 0])
  np.testing.assert_array_equal(rv[:, :, T], np.broadcast_to(-np.float32(fmax) * vs[:, :, 0],
                                                             (B, K, H)))
  np.testing.assert_array_equal(scales(view)[0], ks)  # unchanged by the token
  # The prompt's amax itself maps to +-fmax exactly (up to the scale's rounding).
  np.testing.assert_allclose(np.abs(rk[..., :T]).max(axis=(1, 2, 3)),
                             np.abs(k).max(axis=(1, 2, 3)), rtol=3e-7)


@pytest.mark.parametrize("per_head", [False, True])
def test_scale_set_by_the_prompt_and_kept(per_head):
  fmt = fmt_of("head" if per_head else "tensor")
  rng = np.random.default_rng(1)
  B, T, S = 3, 7, 12
  lengths = np.array([7, 3, 5])
  k = rng.standard_normal((B, K, H, T)).astype(np.float32) * np.array([1, 5])[None, :, None, None]
  v = rng.standard_normal((B, K, T, H)).astype(np.float32)
  real = np.arange(T)[None, :] < lengths[:, None]
  k[~np.broadcast_to(real[:, None, None], k.shape)] = 1e4  # padding: never in the amax
  v[~np.broadcast_to(real[:, None, :, None], v.shape)] = -1e4
  view = prefix(fmt, fresh_view(fmt, B, S), k, v, lengths)
  ks, vs = scales(view)
  assert ks.shape == vs.shape == ((B, K, 1, 1) if per_head else (B, 1, 1, 1))
  np.testing.assert_array_equal(ks, np_scale(k, real[:, None, None], per_head))
  np.testing.assert_array_equal(vs, np_scale(v, real[:, None, :, None], per_head))
  for i in range(3):  # decode never moves the scale, whatever it writes
    view = token(fmt, view, 100 * rng.standard_normal((B, K, H)).astype(np.float32),
                 np.zeros((B, K, H), np.float32), lengths + i)
  np.testing.assert_array_equal(scales(view)[0], ks)
  np.testing.assert_array_equal(scales(view)[1], vs)


def test_zero_prompt_leaves_the_scale_unset():
  fmt = fmt_of("head")
  B, T, S = 2, 4, 8
  k = np.zeros((B, K, H, T), np.float32)
  v = np.zeros((B, K, T, H), np.float32)
  k[1, 1, :, 3] = 7.0  # row 1's padding (length 3): ignored
  view = prefix(fmt, fresh_view(fmt, B, S), k, v, [4, 3])
  assert not scales(view)[0].any() and not scales(view)[1].any()
  rk, rv = read(fmt, view)
  assert not rk.any() and not rv.any()
  # A later nonzero write sets it: KV head 0 of row 0 only (head 1 stays unset).
  new_k = np.zeros((B, K, H), np.float32)
  new_k[0, 0, 2] = -3.0
  view = token(fmt, view, new_k, np.zeros((B, K, H), np.float32), [4, 3])
  ks = scales(view)[0][:, :, 0, 0]
  np.testing.assert_array_equal(ks, [[np.float32(3.0) * np.float32(1 / 448), 0], [0, 0]])
  rk, _ = read(fmt, view)
  np.testing.assert_allclose(rk[0, 0, 2, 4], -3.0, rtol=2e-7)
  rk[0, 0, 2, 4] = 0
  assert not rk.any()
  # Through a chunk: row 1's scale is set by the chunk's real tokens only.
  chunk_k = np.full((B, K, H, 2), 2.0, np.float32)
  chunk_k[1, :, :, 1] = 50.0  # row 1's slot 5 is padding (length 5)
  view = chunk(fmt, view, chunk_k, np.ones((B, K, 2, H), np.float32), 4, [6, 5])
  ks, vs = scales(view)
  r = np.float32(1 / 448)
  np.testing.assert_array_equal(ks[:, :, 0, 0], [[3 * r, 2 * r], [2 * r, 2 * r]])
  np.testing.assert_array_equal(vs[:, :, 0, 0], np.full((2, 2), r))


@pytest.mark.parametrize("format", ["e4m3", "e5m2"])
def test_round_trip_error_bound(format):
  """Round to nearest with m mantissa bits: |y - fp8(y)| <= 2^-(m+1) |y| for a
  normal y (the step is 2^(e-m) for |y| in [2^e, 2^(e+1)), half of it is
  <= 2^-(m+1) |y|): 2^-4 for e4m3, 2^-3 for e5m2; the float32 division and
  product by the scale add at most 2^-23 relative. Below the smallest normal
  2^emin the error is at most half the subnormal step, 2^(emin-m-1) * scale.
  The bound is attained (sup over x of the error relative to x is u / (1 + u),
  u = 2^-(m+1), at x just above 2^e (1 + u)), so e5m2's error is twice
  e4m3's; the codes equal the numpy reference bit for bit."""
  m, emin, fmax = BITS[format]
  fmt = fmt_of("tensor", format)
  rng = np.random.default_rng(2)
  B, T = 1, 512
  mag = np.exp(rng.uniform(np.log(fmax) - 20, np.log(fmax), (B, K, H, T)))
  k = (mag * np.sign(rng.standard_normal(mag.shape))).astype(np.float32)
  k[0, 0, 0, 0] = fmax  # the amax: scale 1 (exactly representable)
  v = np.swapaxes(k, 2, 3).copy()
  view = prefix(fmt, fresh_view(fmt, B, T), k, v, [T])
  assert scales(view)[0].item() == 1.0
  codes = np.asarray(view.get("k", "codes"))  # float8 bit patterns, one byte each
  assert codes.dtype == np.uint8
  np.testing.assert_array_equal(codes.view(fmt.code_dtype).astype(np.float64), np_fp8(k, format))
  rk, rv = read(fmt, view)
  np.testing.assert_array_equal(rk, np_dequant(k, 1.0, format))
  np.testing.assert_array_equal(rv, np.swapaxes(rk, 2, 3))
  normal = np.abs(k) >= 2.0 ** emin
  rel = np.abs(rk - k)[normal] / np.abs(k)[normal]
  u = 2.0 ** -(m + 1)
  assert rel.max() <= u + 2.0 ** -23
  assert rel.max() > 0.99 * u / (1 + u)
  assert (np.abs(rk - k)[~normal] <= 2.0 ** (emin - m - 1)).all()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.data())
def test_encode_decode_property(data):
  """Any shape, any scale of values (zeros and constants included): every
  element comes back within max(2^-(m+1) |x|, 2^(emin-m-1) scale) (and the
  float32 noise of dividing and multiplying by the scale); all-zero rows stay
  exactly zero with their scale unset; codes match the numpy reference."""
  format = data.draw(st.sampled_from(["e4m3", "e5m2"]))
  per_head = data.draw(st.booleans())
  fmt = fmt_of("head" if per_head else "tensor", format)
  m, emin, fmax = BITS[format]
  B, T = data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 8]))
  kind = data.draw(st.sampled_from(["normal", "zeros", "constant", "wide"]))
  log_scale = data.draw(st.floats(-30, 30))
  seed = data.draw(st.integers(0, 2 ** 16))
  rng = np.random.default_rng(seed)
  shape = (B, K, H, T)
  if kind == "zeros":
    k = np.zeros(shape)
  elif kind == "constant":
    k = np.full(shape, data.draw(st.sampled_from([-1.0, 1.0, 3.3])))
  elif kind == "wide":  # magnitudes over 30 octaves: the subnormal range too
    k = rng.standard_normal(shape) * np.exp2(rng.uniform(-30, 0, shape))
  else:
    k = rng.standard_normal(shape)
  k = (k * np.exp(log_scale)).astype(np.float32)
  v = np.swapaxes(k, 2, 3) * np.float32(-1)
  lengths = rng.integers(1, T + 1, B)
  real = np.arange(T)[None, :] < lengths[:, None]
  view = prefix(fmt, fresh_view(fmt, B, T), k, v, lengths)
  ks, vs = scales(view)
  np.testing.assert_array_equal(ks, np_scale(k, real[:, None, None], per_head, format))
  np.testing.assert_array_equal(vs, ks)
  rk, rv = read(fmt, view)
  np.testing.assert_array_equal(rk, np_dequant(k, ks, format))
  np.testing.assert_array_equal(rv, -np.swapaxes(rk, 2, 3))
  assert np.isfinite(rk).all()
  r = np.broadcast_to(real[:, None, None], shape)
  bound = np.maximum(2.0 ** -(m + 1) * np.abs(k), 2.0 ** (emin - m - 1) * ks)
  err = np.abs(rk.astype(np.float64) - k)
  assert (err[r] <= (bound * (1 + 2.0 ** -20) + 2.0 ** -21 * np.abs(k))[r]).all()
  if kind == "zeros":
    assert not rk.any() and not ks.any()
  if kind == "constant":  # the amax maps to fmax: only the scale's float32 rounding remains
    assert (err[r] <= 2.0 ** -22 * np.abs(k)[r]).all()


# ---- against the model's dense K/V ------------------------------------------------------

def dense_kv(tokens, lengths, capacity):
  """The dense cache of a prefill: k [L, B, K, H, S] (RoPE applied), v [L, B, K, S, H]."""
  cache = engine.new_cache(CFG, PARAMS, tokens.shape[0], capacity, kv_compression="")
  _, cache = engine.prefill(CFG, PARAMS, tokens, cache, lengths=lengths)
  return np.asarray(cache.k), np.asarray(cache.v)


@functools.partial(jax.jit, static_argnums=0)
def _attend(fmt, kd, vd, q, n):
  sources = fmt.sources(View(kd, vd, 0), n, transformer._rotate(CFG))
  part = attention.attend(q, [attention.SourceSegment(src, 512, 1.0) for src in sources])
  return attention.finalize(part, jnp.float32)


@pytest.mark.parametrize("spec,layout", [(("tensor", "e4m3"), "stacked"),
                                         (("head", "e5m2"), "unrolled")])
def test_attention_matches_numpy_reference(spec, layout):
  """The model's dense K/V of each layer written into the format (a prompt,
  then tokens one at a time as decode writes them): attention over
  fmt.sources equals numpy's attention over the reference dequantization
  within 1e-5. The dense prefill holds the later tokens too: row b's slots
  [p_b, p_b + 4) are its next tokens."""
  fmt = fmt_of(*spec)
  B, T, S, steps = 2, 9, 24, 4
  prompt_lengths = np.array([9, 5])
  n = prompt_lengths + steps
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T + steps))
  kk, vv = dense_kv(tokens, n, S)
  q = np.random.default_rng(3).standard_normal((B, 1, CFG.num_heads, H)).astype(np.float32)
  for l in range(CFG.num_layers):
    k, v = kk[l], vv[l]
    view = fresh_view(fmt, B, S)
    if layout == "unrolled":  # one layer as a tuple of arrays, not a stacked array
      view = View({n: (a[0],) for n, a in view.k.items()}, {n: (a[0],) for n, a in view.v.items()},
                  0)
    view = prefix(fmt, view, k[..., :T], v[:, :, :T], prompt_lengths)
    for i in range(steps):
      slots = prompt_lengths + i
      view = token(fmt, view, k[np.arange(B), :, :, slots], v[np.arange(B), :, slots], slots)
    # The reference: scales from each row's real prompt tokens, every slot dequantized.
    real = np.arange(T)[None, :] < prompt_lengths[:, None]
    per_head = spec[0] == "head"
    ks = np_scale(k[..., :T], real[:, None, None], per_head, spec[1])
    vs = np_scale(v[:, :, :T], real[:, None, :, None], per_head, spec[1])
    np.testing.assert_array_equal(scales(view)[0], ks)
    np.testing.assert_array_equal(scales(view)[1], vs)
    want = np_attention(q[:, 0], np_dequant(k, ks, spec[1]), np_dequant(v, vs, spec[1]), n)
    got = np.asarray(_attend(fmt, view.k, view.v, jnp.asarray(q), jnp.asarray(n)))[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The dense attention differs by the quantization error, well above fp32 noise.
    dense = np_attention(q[:, 0], k, v, n)
    assert 1e-5 < np.abs(got - dense).max() < 0.1


# ---- through the engine ------------------------------------------------------------------

def test_engine_end_to_end():
  """An fp8 cache through the engine: physical_bytes is the closed form,
  exactly (L (capacity B bytes_per_token + fixed_bytes(B)) + the lengths);
  a chunked prefill and 100 greedy decode steps (one compiled step) stay
  close to the dense model's logits on the same tokens (teacher-forced
  forward): observed max |diff| 0.047 over the 101 steps (0.028 after the
  prefill) against a logit spread of 1.3 (the tiny random model), asserted
  < 0.1; generate picks the same greedy tokens."""
  B, T, capacity, steps = 2, 11, 112, 100
  spec = "fp8:scale=head"
  lengths = np.array([11, 6])
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (B, T))
  cache = engine.new_cache(CFG, PARAMS, B, capacity, kv_compression=spec)
  fmt = cache.format
  assert isinstance(fmt, Fp8) and fmt.scale == "head" and fmt.format == "e4m3"
  want_bytes = CFG.num_layers * (capacity * B * fmt.bytes_per_token() + fmt.fixed_bytes(B)) + B * 4
  assert cache.physical_bytes == want_bytes
  assert fmt.bytes_per_token() == 2 * K * H and fmt.fixed_bytes(B) == 2 * B * K * 4
  logits, cache = engine.prefill(CFG, PARAMS, tokens, cache, lengths=lengths, chunk=4)
  got, chosen = [np.asarray(logits)], []
  before = engine.decode_jit._cache_size()
  for _ in range(steps):
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    chosen.append(np.asarray(token))
    logits, cache = engine.decode_step(CFG, PARAMS, token, cache)
    got.append(np.asarray(logits))
  assert engine.decode_jit._cache_size() - before <= 1
  np.testing.assert_array_equal(cache.lengths, lengths + steps)
  assert cache.physical_bytes == want_bytes
  # The dense model's logits at the same positions, teacher-forced.
  seqs = np.zeros((B, capacity), np.int32)
  for b in range(B):
    seqs[b, :lengths[b] + steps] = np.concatenate([tokens[b, :lengths[b]],
                                                   np.stack(chosen)[:, b]])
  dense = np.asarray(jax.jit(lctx.forward, static_argnums=0)(CFG, PARAMS, jnp.asarray(seqs)))
  want = np.stack([dense[b, lengths[b] - 1:lengths[b] + steps] for b in range(B)], axis=1)
  diff = np.abs(np.stack(got) - want).max(axis=(1, 2))
  print(f"fp8 vs dense logits: max |diff| {diff.max():.4f} (prefill {diff[0]:.4f}), "
        f"logit spread {np.ptp(want):.3f}")
  assert np.isfinite(diff).all() and diff.max() < 0.1
  # generate (the token loop in one jit) picks the same greedy tokens.
  out = engine.generate(CFG, PARAMS, tokens, lengths=lengths, max_new_tokens=10,
                        capacity=capacity, prefill_chunk=4, kv_compression=spec)
  np.testing.assert_array_equal(np.asarray(out), np.stack(chosen[:10], axis=1))


def test_decode_dequantizes_block_by_block_in_place():
  """A decode step's temporaries stay a few blocks (< 10% of the dense
  cache at 16384 slots; a full-precision copy of one layer's keys would be
  12.5%), and the cache is updated in place (donated: every array aliased)."""
  params = lctx.abstract_params(CFG)
  shape = lambda spec: jax.eval_shape(lambda: engine.new_cache(CFG, params, 2, 16384,
                                                               kv_compression=spec))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  cache = shape("fp8")
  compiled = engine.decode_jit.lower(CFG, params, jax.ShapeDtypeStruct((2,), jnp.int32),
                                     cache).compile()
  mem = compiled.memory_analysis()
  assert mem.temp_size_in_bytes < 0.1 * nbytes(shape(""))
  assert mem.alias_size_in_bytes == nbytes(cache)
