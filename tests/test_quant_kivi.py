"""lctx.cache.quant.kivi: KIVI's 2/4/8-bit asymmetric KV cache against a
numpy reference, at the format level (random keys and values, bitwise) and
through the model (prefill, chunked prefill, decode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import lctx
from lctx import engine
from lctx.cache.quant.base import View
from lctx.cache.quant.kivi import Kivi, dequantize, pack, quantize, unpack
from lctx.model import attention

# ---- the numpy reference ------------------------------------------------------------


def np_quantize(x, bits):
  """x [..., G] fp32 -> (codes [..., G] uint8, scale [...], zero [...]) fp32:
  zero = min, scale = (max - zero) * fp32(1 / (2^bits - 1)), code = round((x - zero) / scale)."""
  x = np.asarray(x, np.float32)
  qmax = np.float32(2 ** bits - 1)
  zero = x.min(-1)
  scale = ((x.max(-1) - zero) * np.float32(1 / qmax)).astype(np.float32)
  codes = np.round((x - zero[..., None]) / np.where(scale > 0, scale, 1)[..., None])
  return np.clip(codes, 0, qmax).astype(np.uint8), scale, zero


def np_dequantize(codes, scale, zero):
  return zero[..., None] + codes.astype(np.float32) * scale[..., None]


def np_unpack(packed, bits, axis):
  if bits == 8:
    return packed
  return np.concatenate([(packed >> (p * bits)) & (2 ** bits - 1) for p in range(8 // bits)],
                        axis=axis)


def nq(n, group, residual):
  return group * (max(n - residual, 0) // group)


def np_kivi_kv(k, v, n, count, bits, group, residual):
  """What KIVI attention sees of one row holding `count` tokens, of which it
  reads the first n: k [K, H, >= count], v [K, >= count, H] (the row's exact
  keys and values) -> k [K, H, n], v [K, n, H] with tokens [0, nq(count))
  quantized (keys per channel over groups of `group` tokens, values per token
  over groups of `group` channels), the rest exact."""
  k, v = np.array(k[:, :, :count], np.float32), np.array(v[:, :count], np.float32)
  K, H, _ = k.shape
  q = nq(count, group, residual)
  for g in range(0, q, group):
    k[:, :, g:g + group] = np_dequantize(*np_quantize(k[:, :, g:g + group], bits))
  vq = v[:, :q].reshape(K, q, H // group, group)
  v[:, :q] = np_dequantize(*np_quantize(vq, bits)).reshape(K, q, H)
  return k[:, :, :n], v[:, :n]


def np_attention(q, k, v):
  """q [N, H] (one query position), k [K, H, n], v [K, n, H] -> [N, H] fp32."""
  N, H = q.shape
  K = k.shape[0]
  out = np.zeros((N, H), np.float64)
  for h in range(N):
    s = q[h].astype(np.float64) @ k[h // (N // K)].astype(np.float64) / np.sqrt(H)
    p = np.exp(s - s.max())
    out[h] = (p / p.sum()) @ v[h // (N // K)]
  return out


def layer_np(side, l=0):
  """Layer l of every array of a cache side (stacked or tuple layout) as numpy."""
  return {name: np.asarray(x[l]) for name, x in side.items()}


def check_state(fmt, kd, vd, keys, values, counts, l=0):
  """The cache holds, for each row b, tokens [0, counts[b]) of keys [B, K, H, *]
  and values [B, K, *, H]: the quantized groups bitwise as the numpy
  reference quantizes them, the ring tokens exactly."""
  G, R, W, bits = fmt.group, fmt.residual, fmt.window, fmt.bits
  kl, vl = layer_np(kd, l), layer_np(vd, l)
  for b, n in enumerate(counts):
    assert kl["count"][b, 0, 0, 0] == n
    q = nq(n, G, R)
    kc, ks, kz = np_quantize(keys[b, :, :, :q].reshape(*keys.shape[1:3], q // G, G), bits)
    np.testing.assert_array_equal(np_unpack(kl["codes"][b], bits, 1)[:, :, :q],
                                  kc.reshape(*keys.shape[1:3], q))
    np.testing.assert_array_equal(kl["scale"][b, :, :, :q // G], ks)
    np.testing.assert_array_equal(kl["zero"][b, :, :, :q // G], kz)
    H = values.shape[-1]
    vc, vs, vz = np_quantize(values[b, :, :q].reshape(values.shape[1], q, H // G, G), bits)
    np.testing.assert_array_equal(np_unpack(vl["codes"][b], bits, 2)[:, :q],
                                  vc.reshape(values.shape[1], q, H))
    np.testing.assert_array_equal(vl["scale"][b, :, :q], vs)
    np.testing.assert_array_equal(vl["zero"][b, :, :q], vz)
    for t in range(q, n):
      np.testing.assert_array_equal(kl["residual"][b, :, :, t % W], keys[b, :, :, t])
      np.testing.assert_array_equal(vl["residual"][b, :, t % W], values[b, :, t])


# ---- 1. quantization of one group ---------------------------------------------------

_quant_jit = jax.jit(lambda x, bits, dtype: (lambda c, s, z: (c, s, z, dequantize(c, s, z)))(
    *quantize(x, bits, dtype)), static_argnums=(1, 2))


def _groups(draw, rows, group):
  """Groups with zeros, constants, tiny and large magnitudes (no subnormals:
  the CPU flushes them to zero)."""
  magnitude = st.one_of(st.just(0.0), st.floats(2.0 ** -20, 2.0 ** 14, width=32))
  element = st.builds(lambda m, s: m * s, magnitude, st.sampled_from([-1.0, 1.0]))
  kind = draw(st.sampled_from(["any", "constant", "zeros", "two"]))
  if kind == "any":
    return draw(hnp.arrays(np.float32, (rows, group), elements=element))
  if kind == "two":  # two values only: codes at both ends of the range
    a, b = draw(element), draw(element)
    mask = draw(hnp.arrays(np.bool_, (rows, group)))
    return np.where(mask, np.float32(a), np.float32(b))
  c = 0.0 if kind == "zeros" else draw(element)
  return np.full((rows, group), c, np.float32)


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), dtype=st.sampled_from(["float32", "bfloat16"]),
       data=st.data())
def test_group_reconstructs_within_half_a_step(bits, dtype, data):
  x = _groups(data.draw, 3, 8)  # three groups of 8 (one shape: one compile per bits, dtype)
  x = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))  # representable in dtype
  codes, scale, zero, back = (np.asarray(a) for a in _quant_jit(jnp.asarray(x), bits, dtype))
  assert scale.dtype == zero.dtype == jnp.dtype(dtype)
  assert codes.dtype == np.uint8 and codes.max() <= 2 ** bits - 1
  scale, zero = scale.astype(np.float32), zero.astype(np.float32)
  assert (zero <= x.min(-1)).all()  # the zero point is rounded down
  eps = 2.0 ** -21 * (np.abs(zero) + np.abs(x).max(-1)) + 1e-30  # fp32 rounding of x - z, z + c s
  err = np.abs(back - x)
  assert (err <= scale[:, None] / 2 + eps[:, None]).all(), (err, scale)
  const = x.min(-1) == x.max(-1)
  np.testing.assert_array_equal(back[const], x[const])  # constant groups: exact
  assert (scale[const] == 0).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, (2, 3, 16, 5)).astype(np.uint8)
  for axis in (2, 3) if bits == 8 else (2,):
    packed = pack(jnp.asarray(codes), bits, axis)
    assert packed.shape[axis] == codes.shape[axis] * bits // 8
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits, axis)), codes)
    np.testing.assert_array_equal(np_unpack(np.asarray(packed), bits, axis), codes)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match="group"):
    Kivi(num_kv_heads=2, head_dim=16, dtype="float32", bits=2, group=3, residual=3)
  with pytest.raises(ValueError, match="bits"):
    Kivi(num_kv_heads=2, head_dim=16, dtype="float32", bits=3, group=4, residual=4)
  with pytest.raises(ValueError, match="multiple of 4"):
    Kivi(num_kv_heads=2, head_dim=6, dtype="float32", bits=2, group=2, residual=2)


# ---- format level: random keys and values, bitwise ----------------------------------

FMT = Kivi(num_kv_heads=2, head_dim=16, dtype="float32", spec="kivi:group=4,residual=8",
           bits=2, group=4, residual=8)
FMTS = {"b2g4r8": FMT,
        # no residual: a token may be flushed by the step that writes it
        "b4g8r0": Kivi(num_kv_heads=2, head_dim=16, dtype="float32", bits=4, group=8, residual=0)}
F_B, F_S, F_T, F_N = 4, 64, 29, 4  # rows, capacity, prompt, query heads
F_LENGTHS = np.array([29, 17, 6, 0])


def _empty(fmt, batch, capacity):  # the per-layer (tuple) layout, one layer
  k, v = fmt.init_layer(batch, capacity)
  return {n: (a,) for n, a in k.items()}, {n: (a,) for n, a in v.items()}


def _kv(seed):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(F_B, 2, 16, F_S)).astype(np.float32)
  values = rng.normal(size=(F_B, 2, F_S, 16)).astype(np.float32)
  keys[:, :, 3, 8:16] = 0.5  # a constant key group (one channel, tokens 8..15)
  values[:, :, 9, :8] = -2.0  # a constant value group
  return keys, values


def _sides(view):
  return view.k, view.v


@jax.jit(static_argnums=0)
def _prefix(fmt, kd, vd, k, v, n):
  return _sides(fmt.write_prefix(View(kd, vd, 0), k, v, n))


@jax.jit(static_argnums=0)
def _chunk(fmt, kd, vd, k, v, start, n):
  return _sides(fmt.write_chunk(View(kd, vd, 0), k, v, start, n))


@jax.jit(static_argnums=0)
def _token(fmt, kd, vd, k, v, slots):
  return _sides(fmt.write_token(View(kd, vd, 0), k, v, slots))


@jax.jit(static_argnums=0)
def _attend(fmt, kd, vd, q, n):
  segments = [attention.SourceSegment(src, 512, 1.0)
              for src in fmt.sources(View(kd, vd, 0), n)]
  return attention.finalize(attention.attend(q, segments), jnp.float32)


def _check_attention(fmt, kd, vd, keys, values, counts, n, seed):
  """attend over sources(view, n) == the numpy reference over each row's
  tokens [0, min(n, count)), those below nq(count) quantized."""
  q = np.random.default_rng(seed).normal(size=(F_B, 1, F_N, 16)).astype(np.float32)
  got = np.asarray(_attend(fmt, kd, vd, jnp.asarray(q), jnp.asarray(n, jnp.int32)))
  for b, c in enumerate(counts):
    m = min(int(np.broadcast_to(n, (F_B,))[b]), int(c))
    if m == 0:
      continue
    k, v = np_kivi_kv(keys[b], values[b], m, int(c), fmt.bits, fmt.group, fmt.residual)
    np.testing.assert_allclose(got[b, 0], np_attention(q[b, 0], k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,chunk", [("b2g4r8", 1), ("b2g4r8", 3), ("b2g4r8", 13),
                                        ("b4g8r0", 5)])
def test_write_chunk_matches_one_pass_bitwise(name, chunk):
  """Chunks of any size (not multiples of G, longer than the ring, starting
  off group boundaries) leave the read slots bitwise as the one-pass write
  and the numpy reference; after each chunk the queries' view of tokens
  [0, start) is the reference's (quantized below nq(count), else exact)."""
  fmt = FMTS[name]
  keys, values = _kv(0)
  k, v = keys[..., :F_T], values[:, :, :F_T]
  kd, vd = _prefix(fmt, *_empty(fmt, F_B, F_S), k, v, F_LENGTHS)
  check_state(fmt, kd, vd, keys, values, F_LENGTHS)
  kc, vc = _empty(fmt, F_B, F_S)
  for start in range(0, F_T, chunk):
    C = min(chunk, F_T - start)
    kc, vc = _chunk(fmt, kc, vc, k[..., start:start + C], v[:, :, start:start + C], start,
                    F_LENGTHS)
    counts = np.minimum(F_LENGTHS, start + C)
    if start and chunk > 1:  # what the chunk's queries read of the cache
      _check_attention(fmt, kc, vc, keys, values, counts, start, start)
  check_state(fmt, kc, vc, keys, values, F_LENGTHS)


@pytest.mark.parametrize("name", FMTS)
def test_write_token_appends_groups_and_attention_matches_reference(name):
  """Decode steps: each flushes at most one group per row, the groups flushed
  before are bitwise unchanged, the ring holds the rest exactly, and
  attention over the sources matches the numpy reference."""
  fmt = FMTS[name]
  G, R = fmt.group, fmt.residual
  keys, values = _kv(1)
  kd, vd = _prefix(fmt, *_empty(fmt, F_B, F_S), keys[..., :F_T], values[:, :, :F_T], F_LENGTHS)
  counts = F_LENGTHS.copy()
  rows = np.arange(F_B)
  prev = None
  for step in range(22):
    k_tok = keys[rows, :, :, counts]  # [B, K, H]
    v_tok = values[rows, :, counts]
    kd, vd = _token(fmt, kd, vd, k_tok, v_tok, jnp.asarray(counts, jnp.int32))
    counts = counts + 1
    check_state(fmt, kd, vd, keys, values, counts)
    now = layer_np(kd), layer_np(vd)
    if prev is not None:
      for b, n in enumerate(counts - 1):
        q = nq(n, G, R)
        assert nq(n + 1, G, R) - q in (0, G)
        np.testing.assert_array_equal(now[0]["codes"][b, ..., :q], prev[0]["codes"][b, ..., :q])
        np.testing.assert_array_equal(now[0]["scale"][b, ..., :q // G],
                                      prev[0]["scale"][b, ..., :q // G])
        np.testing.assert_array_equal(now[1]["codes"][b, :, :q], prev[1]["codes"][b, :, :q])
        np.testing.assert_array_equal(now[1]["zero"][b, :, :q], prev[1]["zero"][b, :, :q])
    prev = now
    if step % 7 == 0:
      _check_attention(fmt, kd, vd, keys, values, counts, jnp.asarray(counts), 100 + step)
  _check_attention(fmt, kd, vd, keys, values, counts, 9, 7)  # fewer tokens than held


def test_quantized_read_of_unaligned_blocks():
  """read(lo, n) of the quantized source for blocks not aligned to groups
  (SourceSegment's are, when G divides the block) equals the aligned read."""
  keys, values = _kv(2)
  kd, vd = _prefix(FMT, *_empty(FMT, F_B, F_S), keys[..., :F_T], values[:, :, :F_T], F_LENGTHS)
  read = jax.jit(lambda kd, vd, lo, n: FMT.sources(View(kd, vd, 0), F_T)[0].read(lo, n),
                 static_argnums=3)
  k_all, v_all = (np.asarray(a) for a in read(kd, vd, 0, F_S))
  for lo, n in [(1, 6), (5, 3), (58, 5), (63, 1)]:
    k, v = read(kd, vd, lo, n)
    np.testing.assert_array_equal(np.asarray(k), k_all[..., lo:lo + n])
    np.testing.assert_array_equal(np.asarray(v), v_all[:, :, lo:lo + n])


def test_bytes_match_arrays():
  for bits, group, residual, dtype in [(2, 4, 8, "float32"), (4, 8, 0, "bfloat16"),
                                       (8, 16, 32, "float16")]:
    fmt = Kivi(num_kv_heads=2, head_dim=16, dtype=dtype, bits=bits, group=group,
               residual=residual)
    for batch, capacity in [(1, 64), (3, 128)]:
      k, v = jax.eval_shape(lambda: fmt.init_layer(batch, capacity))
      got = sum(a.size * a.dtype.itemsize for a in (*k.values(), *v.values()))
      assert got == capacity * batch * fmt.bytes_per_token() + fmt.fixed_bytes(batch)


# ---- through the model ---------------------------------------------------------------

CFG = lctx.ModelConfig.from_preset("tiny").replace(head_dim=16)  # 2 layers, 2 KV heads, fp32
PARAMS = lctx.init_params(CFG, seed=0)
SPEC = "kivi:bits=2,group=4,residual=8"
G, R, W, BITS = 4, 8, 12, 2
B, CAP, T, STEPS = 2, 128, 21, 14
LENGTHS = np.array([21, 13])


@pytest.fixture(scope="module")
def runs():
  """The same tokens (prompt, then forced decode tokens) through a dense and
  a KIVI cache; the KIVI cache's arrays after prefill and after each step."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (B, T))
  forced = rng.integers(0, CFG.vocab_size, (STEPS, B)).astype(np.int32)
  dense = engine.new_cache(CFG, PARAMS, B, CAP, kv_compression="")
  _, dense = engine.prefill(CFG, PARAMS, tokens, dense, LENGTHS)
  cache = engine.new_cache(CFG, PARAMS, B, CAP, kv_compression=SPEC)
  assert isinstance(cache.format, Kivi)
  _, cache = engine.prefill(CFG, PARAMS, tokens, cache, LENGTHS)
  snaps = [jax.device_get((cache.k, cache.v))]
  for t in forced:
    _, dense = engine.decode_step(CFG, PARAMS, jnp.asarray(t), dense)
    _, cache = engine.decode_step(CFG, PARAMS, jnp.asarray(t), cache)
    snaps.append(jax.device_get((cache.k, cache.v)))
  return dict(tokens=tokens, dense_k=np.asarray(dense.k), dense_v=np.asarray(dense.v),
              cache=cache, snaps=snaps)


def _counts(step):
  return LENGTHS + step


def test_residual_tokens_are_exact(runs):
  """The ring holds tokens [nq(n), n) at full precision: bitwise the dense
  run's at layer 0 (same tokens, same K/V); at every layer, a token's ring
  entry never changes from its write to its flush."""
  dk, dv = runs["dense_k"], runs["dense_v"]
  first_seen = {}
  for step, (k, v) in enumerate(runs["snaps"]):
    for b, n in enumerate(_counts(step)):
      assert k["count"][0, b, 0, 0, 0] == n and k["count"][1, b, 0, 0, 0] == n
      ring = range(nq(n, G, R), n)
      assert R <= len(ring) < R + G
      for t in ring:
        np.testing.assert_array_equal(k["residual"][0, b, :, :, t % W], dk[0, b, :, :, t])
        np.testing.assert_array_equal(v["residual"][0, b, :, t % W], dv[0, b, :, t])
        entry = (k["residual"][:, b, :, :, t % W], v["residual"][:, b, :, t % W])
        seen = first_seen.setdefault((b, t), entry)
        np.testing.assert_array_equal(entry[0], seen[0])
        np.testing.assert_array_equal(entry[1], seen[1])


def test_groups_appended_in_order_never_rewritten(runs):
  """Each decode step flushes at most the next group; earlier groups' codes,
  scales and zeros are bitwise unchanged; a flushed group is the numpy
  reference's quantization of its exact tokens (the ring's, every layer;
  the dense run's at layer 0)."""
  dk, dv = runs["dense_k"], runs["dense_v"]
  snaps = runs["snaps"]
  flushed = 0
  for step in range(1, len(snaps)):
    (k0, v0), (k1, v1) = snaps[step - 1], snaps[step]
    for b, n in enumerate(_counts(step)):
      q0, q1 = nq(n - 1, G, R), nq(n, G, R)
      assert q1 - q0 in (0, G)
      for name in ("codes", "scale", "zero"):
        lim = q0 if name == "codes" else q0 // G
        np.testing.assert_array_equal(k1[name][:, b, ..., :lim], k0[name][:, b, ..., :lim])
        np.testing.assert_array_equal(v1[name][:, b, :, :q0], v0[name][:, b, :, :q0])
      if q1 == q0:
        continue
      flushed += 1
      g = q0 // G
      slots = np.arange(q0, q1) % W  # still in the ring: the slots are reused next
      for l in range(CFG.num_layers):
        ring_k = k1["residual"][l, b][:, :, slots]  # [K, H, G]
        ring_v = v1["residual"][l, b][:, slots]  # [K, G, H]
        kc, ks, kz = np_quantize(ring_k, BITS)
        np.testing.assert_array_equal(np_unpack(k1["codes"][l, b], BITS, 1)[:, :, q0:q1], kc)
        np.testing.assert_array_equal(k1["scale"][l, b, :, :, g], ks)
        np.testing.assert_array_equal(k1["zero"][l, b, :, :, g], kz)
        vc, vs, vz = np_quantize(ring_v.reshape(2, G, 16 // G, G), BITS)
        np.testing.assert_array_equal(np_unpack(v1["codes"][l, b], BITS, 2)[:, q0:q1],
                                      vc.reshape(2, G, 16))
        np.testing.assert_array_equal(v1["scale"][l, b, :, q0:q1], vs)
        np.testing.assert_array_equal(v1["zero"][l, b, :, q0:q1], vz)
      np.testing.assert_array_equal(k1["residual"][0, b][:, :, slots], dk[0, b, :, :, q0:q1])
      np.testing.assert_array_equal(v1["residual"][0, b][:, slots], dv[0, b, :, q0:q1])
  assert flushed >= 2 * STEPS // G - 2


def _dequantized(k, v, l, b, n):
  """Slots [0, nq(n)) of a snapshot dequantized in numpy: keys [K, H, q], values [K, q, H],
  and the scales per element."""
  q = nq(n, G, R)
  kc = np_unpack(k["codes"][l, b], BITS, 1)[:, :, :q]
  ks = np.repeat(k["scale"][l, b, :, :, :q // G], G, -1)
  kz = np.repeat(k["zero"][l, b, :, :, :q // G], G, -1)
  vc = np_unpack(v["codes"][l, b], BITS, 2)[:, :q]
  vs = np.repeat(v["scale"][l, b, :, :q], G, -1)
  vz = np.repeat(v["zero"][l, b, :, :q], G, -1)
  return kz + kc * ks, ks, vz + vc * vs, vs


@pytest.mark.parametrize("chunk", [7])  # T = 3 chunks: one chunk body to compile
def test_chunked_prefill_matches_one_pass(runs, chunk):
  """Chunked prefill (chunks not multiples of G, starting off group
  boundaries, per-row lengths that differ; more sizes at the format level,
  test_write_chunk_matches_one_pass_bitwise) leaves layer 0 as a
  one-pass prefill does, up to the model's fp32 rounding of K/V (~1e-6):
  same counts, ring contents within 1e-5, scales and zeros within 1e-5, each
  dequantized element within one step of the one-pass one and within half a
  step of the dense run's K/V, and almost all codes equal. (Deeper layers'
  K/V differ by the quantization error itself: a chunk's queries read the
  earlier chunks' flushed groups quantized, the one-pass prompt reads itself
  at full precision; test_write_chunk_matches_one_pass_bitwise covers the
  format's chunked writes for any K/V.)"""
  cache = engine.new_cache(CFG, PARAMS, B, CAP, kv_compression=SPEC)
  _, cache = engine.prefill(CFG, PARAMS, runs["tokens"], cache, LENGTHS, chunk=chunk)
  k1, v1 = jax.device_get((cache.k, cache.v))
  k0, v0 = runs["snaps"][0]
  dk, dv = runs["dense_k"], runs["dense_v"]
  np.testing.assert_array_equal(k1["count"], k0["count"])
  same = total = 0
  l = 0
  for b, n in enumerate(LENGTHS):
    q = nq(n, G, R)
    slots = np.arange(q, n) % W
    np.testing.assert_allclose(k1["residual"][l, b][:, :, slots],
                               k0["residual"][l, b][:, :, slots], atol=1e-5, rtol=0)
    np.testing.assert_allclose(v1["residual"][l, b][:, slots], v0["residual"][l, b][:, slots],
                               atol=1e-5, rtol=0)
    ka, ks_a, va, vs_a = _dequantized(k1, v1, l, b, n)
    kb, ks_b, vb, vs_b = _dequantized(k0, v0, l, b, n)
    np.testing.assert_allclose(ks_a, ks_b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(vs_a, vs_b, atol=1e-5, rtol=0)
    assert (np.abs(ka - kb) <= np.maximum(ks_a, ks_b) + 1e-5).all()
    assert (np.abs(va - vb) <= np.maximum(vs_a, vs_b) + 1e-5).all()
    assert (np.abs(ka - dk[0, b, :, :, :q]) <= ks_a / 2 + 1e-5).all()
    assert (np.abs(va - dv[0, b, :, :q]) <= vs_a / 2 + 1e-5).all()
    same += (ka == kb).sum() + (va == vb).sum()
    total += ka.size + va.size
  assert total > 0 and same >= 0.98 * total


def test_attention_over_model_cache_matches_numpy_reference(runs):
  """Layer 0 of the model's cache after prefill and decode: attention over
  fmt.sources (what decode reads, and a shorter prefix as a chunk reads it)
  equals numpy attention over the reference's dequantized prefix + exact
  residual, built from the dense run's K/V."""
  cache, dk, dv = runs["cache"], runs["dense_k"], runs["dense_v"]
  fmt = cache.format
  N = CFG.num_heads
  q = np.random.default_rng(5).normal(size=(B, 1, N, 16)).astype(np.float32)
  counts = _counts(STEPS)

  @jax.jit
  def run(k, v, q, n):
    segments = [attention.SourceSegment(src, 512, 1.0) for src in fmt.sources(View(k, v, 0), n)]
    return attention.finalize(attention.attend(q, segments), jnp.float32)

  for n in (counts, counts - 5, np.array([7, 3])):
    got = np.asarray(run(cache.k, cache.v, jnp.asarray(q), jnp.asarray(n, jnp.int32)))
    for b in range(B):
      k, v = np_kivi_kv(dk[0, b], dv[0, b], n[b], counts[b], BITS, G, R)
      np.testing.assert_allclose(got[b, 0], np_attention(q[b, 0], k, v), atol=1e-5, rtol=0)


def test_kivi_decode_compiles_once(runs):
  cache = engine.new_cache(CFG, PARAMS, B, CAP, kv_compression=SPEC)
  logits, cache = engine.prefill(CFG, PARAMS, runs["tokens"], cache, LENGTHS)
  before = engine.decode_jit._cache_size()
  token = jnp.argmax(logits, -1).astype(jnp.int32)
  for _ in range(100):
    logits, cache = engine.decode_step(CFG, PARAMS, token, cache)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
  assert engine.decode_jit._cache_size() - before <= 1
  np.testing.assert_array_equal(np.asarray(cache.lengths), LENGTHS + 100)
  assert np.isfinite(np.asarray(logits)).all()


def test_physical_bytes(runs):
  cache = runs["cache"]
  fmt = cache.format
  want = CFG.num_layers * (CAP * fmt.bytes_per_token() * B + fmt.fixed_bytes(B)) + B * 4
  assert cache.physical_bytes == want
  # 2 bits per element plus 4 scale/zero numbers of 4 bytes per 4 elements... of K and V
  K, H = CFG.num_kv_heads, CFG.head_dim
  assert fmt.bytes_per_token() == 2 * K * H * 2 / 8 + 4 * K * H / G * 4
