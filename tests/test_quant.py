"""Quantized KV caches (lctx.cache.quant) through the whole model: what every
format must do, and the int8 / int4 absmax format itself. Per-format details
(KIVI's groups, FP8's scales, KVQuant's outliers) are in test_quant_*.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lctx
from lctx import engine
from lctx.cache.dense import cache_format
from lctx.cache.quant.absmax import Absmax
from lctx.model.params import unstack_layers
from tests import np_reference

CONFIG = lctx.ModelConfig.from_preset("tiny")  # fp32, head_dim 8, 2 KV heads, 2 layers
CONFIG16 = CONFIG.replace(head_dim=16)  # room for channel groups
PARAMS = lctx.init_params(CONFIG, 0)
# Every format, at a lossy setting; the names the other test files cover in depth.
SPECS = ["int8", "int4", "int8:scale=token", "int4:group=4", "fp8", "fp8:scale=head",
         "fp8:format=e5m2", "kivi:bits=2,group=4,residual=8", "kivi:bits=4,group=8,residual=0",
         "kvquant:bits=4,outliers=0.2,sinks=2", "kvquant:bits=8,outliers=0,sinks=0"]


def _prompts(B=2, T=21):
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, T))
  return tokens, np.array([T, 13][:B], np.int32)


# ---- no-op settings reproduce the dense cache bitwise -----------------------------------

@pytest.mark.parametrize("spec", ["", "kivi:residual=64,group=4", "kvquant:sinks=64"])
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_no_op_settings_reproduce_dense_bitwise(spec, layout):
  """A policy that keeps every slot of the cache in full precision (KIVI's
  residual or KVQuant's sinks covering the capacity) is the dense cache:
  same logits and tokens, bitwise."""
  params = PARAMS if layout == "stacked" else unstack_layers(PARAMS)
  tokens, lengths = _prompts()
  dense = engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=8,
                          capacity=64)
  got = engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=8, capacity=64,
                        kv_compression=spec)
  np.testing.assert_array_equal(got, dense)
  want_logits, _ = engine.prefill(CONFIG, params, tokens, engine.new_cache(
      CONFIG, params, 2, 64), lengths, chunk=8)
  cache = engine.new_cache(CONFIG, params, 2, 64, kv_compression=spec)
  assert not cache.compressed
  logits, cache = engine.prefill(CONFIG, params, tokens, cache, lengths, chunk=8)
  np.testing.assert_array_equal(logits, want_logits)


# ---- int8 / int4 absmax: the quantizer itself --------------------------------------------

@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([8, 4]), scale=st.sampled_from(["head", "token"]),
       group=st.sampled_from([0, 2, 4]), n=st.sampled_from([1, 3]), K=st.sampled_from([1, 2]),
       magnitude=st.sampled_from([0.0, 1e-6, 1.0, 300.0]), constant=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_absmax_error_is_at_most_half_a_step(bits, scale, group, n, K, magnitude, constant, seed):
  H = 8
  fmt = Absmax(K, H, "float32", bits=bits, group=group, scale=scale)
  rng = np.random.default_rng(seed)
  x = np.full((1, K, H, n), magnitude, np.float32) if constant else (
      rng.standard_normal((1, K, H, n)) * magnitude).astype(np.float32)
  for side, arr in (("k", x), ("v", x.transpose(0, 1, 3, 2))):
    entries = fmt.encode(side, jnp.asarray(arr))
    back = np.asarray(fmt.decode(side, entries))
    c = 2 if side == "k" else 3
    step = np.repeat(np.asarray(entries["scale"]), group or H, axis=c)
    assert np.all(np.abs(back - arr) <= step / 2 * (1 + 1e-6) + 1e-30)
    if constant or magnitude == 0:  # a constant group is exact (+-qmax codes)
      np.testing.assert_array_equal(back, arr)


def test_int4_packs_two_codes_per_byte():
  fmt = Absmax(2, 8, "float32", bits=4)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 8, 5)), jnp.float32)
  entries = fmt.encode("k", x)
  assert entries["codes"].dtype == jnp.uint8 and entries["codes"].shape == (3, 2, 4, 5)
  codes = np.asarray(fmt._unpack(entries["codes"], 2))  # the round trip of the packing
  scale = np.asarray(entries["scale"])
  want = np.clip(np.round(np.asarray(x) / scale), -7, 7)
  np.testing.assert_array_equal(codes, want)


# ---- every format: decode against numpy, one compile, in place, physical bytes ------------

def _np_view(spec):
  """The numpy quantize-dequantize of the absmax formats for np_reference."""
  p = lctx.cache.spec.parse(spec).quantization
  bits = 8 if p.name == "int8" else 4

  def view(l, k_pre, k_post, v, T0):
    rt = lambda x: np_reference.absmax_roundtrip(x, bits, p["group"], p["scale"] == "token")
    return rt(k_post), rt(v)
  return view


@pytest.mark.parametrize("spec", ["int8", "int4", "int8:scale=token", "int4:group=4"])
def test_absmax_decode_matches_numpy(spec):
  config = CONFIG16 if "group=4" in spec else CONFIG
  params = lctx.init_params(config, 3)
  tokens, _ = _prompts(1, 11)
  feed = [5, 77, 3, 200, 9]
  cache = engine.new_cache(config, params, 1, 32, kv_compression=spec)
  logits, cache = engine.prefill(config, params, tokens, cache)
  got = [np.asarray(logits[0])]
  for t in feed:
    logits, cache = engine.decode_step(config, params, jnp.array([t]), cache)
    got.append(np.asarray(logits[0]))
  want = np_reference.decode_logits(config, params, tokens[0], feed, _np_view(spec))
  np.testing.assert_allclose(np.stack(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_compiles_once_and_runs_near_dense(spec):
  """100 decode steps, one compile; logits near the dense cache's."""
  config = CONFIG16
  params = lctx.init_params(config, 0)
  tokens, lengths = _prompts()
  dense_logits, dense = engine.prefill(config, params, tokens,
                                       engine.new_cache(config, params, 2, 128), lengths)
  fed = [jnp.argmax(dense_logits, -1).astype(jnp.int32)]
  for _ in range(100):  # the dense run picks the tokens both caches are fed
    dense_logits, dense = engine.decode_step(config, params, fed[-1], dense)
    fed.append(jnp.argmax(dense_logits, -1).astype(jnp.int32))
  cache = engine.new_cache(config, params, 2, 128, kv_compression=spec)
  logits, cache = engine.prefill(config, params, tokens, cache, lengths, chunk=8)
  before = engine.decode_jit._cache_size()
  for token in fed[:-1]:
    logits, cache = engine.decode_step(config, params, token, cache)
  assert engine.decode_jit._cache_size() - before <= 1
  assert np.all(np.isfinite(np.asarray(logits)))
  # Lossy but close: 2-bit keys move logits most (measured: < 0.3 on this model).
  assert float(jnp.max(jnp.abs(logits - dense_logits))) < 0.5, spec


@pytest.mark.parametrize("spec", SPECS)
def test_physical_bytes_match_the_closed_form_and_the_compiled_arguments(spec):
  config = CONFIG16.replace(num_layers=3)
  B, S = 2, 1024
  params = jax.eval_shape(lambda: lctx.init_params(config, 0))
  cache = jax.eval_shape(lambda: engine.new_cache(config, params, B, S, kv_compression=spec))
  fmt = cache.format
  leaves = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  closed = config.num_layers * (S * B * fmt.bytes_per_token() + fmt.fixed_bytes(B)) + 4 * B
  assert leaves == closed
  compiled = engine.decode_jit.lower(config, params, jax.ShapeDtypeStruct((B,), jnp.int32),
                                     cache).compile()
  mem = compiled.memory_analysis()
  other = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) + 4 * B
  assert abs(mem.argument_size_in_bytes - other - leaves) <= 0.02 * leaves
  assert mem.alias_size_in_bytes == leaves  # donated: updated in place


@pytest.mark.parametrize("spec", SPECS)
def test_decode_temporaries_stay_under_5_percent_of_the_dense_cache(spec):
  """Dequantization runs block by block inside the attention read: never a
  full-precision copy of a layer."""
  config = CONFIG.replace(hidden_size=256, head_dim=32, num_layers=4, intermediate_size=256)
  params = jax.eval_shape(lctx.unstack_layers, lctx.abstract_params(config))
  dense = jax.eval_shape(lambda: engine.new_cache(config, params, batch=4, capacity=16384))
  cache = jax.eval_shape(lambda: engine.new_cache(config, params, batch=4, capacity=16384,
                                                  kv_compression=spec))
  compiled = engine.decode_jit.lower(config, params, jax.ShapeDtypeStruct((4,), jnp.int32),
                                     cache).compile()
  dense_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(dense))
  assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * dense_bytes


def test_bad_specs_fail_before_compiling():
  with pytest.raises(ValueError, match="int9"):
    engine.new_cache(CONFIG, PARAMS, 1, 16, kv_compression="int9")
  with pytest.raises(ValueError, match="group"):
    engine.new_cache(CONFIG, PARAMS, 1, 16, kv_compression="int8:group=3")
  with pytest.raises(ValueError, match="multiple of 4"):
    engine.new_cache(CONFIG, PARAMS, 1, 18, kv_compression="kivi:group=4,residual=8")
  with pytest.raises(ValueError, match="group"):
    engine.generate(CONFIG, PARAMS, np.ones((1, 4), np.int32), max_new_tokens=2,
                    kv_compression="int4:group=3")
  assert cache_format(CONFIG, "") is None


def test_compressed_caches_refuse_seq_meshes():
  from lctx import sharding
  plan = sharding.Plan(CONFIG, sharding.make_mesh("seq:2"))
  with pytest.raises(ValueError, match="seq"):
    engine.new_cache(CONFIG, PARAMS, 1, 16, plan=plan, kv_compression="int8")


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_sharded_quantized_decode_equals_unsharded(spec):
  from lctx import sharding
  config = CONFIG.replace(num_heads=8, num_kv_heads=4)
  params = lctx.init_params(config, 0)
  tokens, lengths = _prompts(2, 16)
  want = engine.generate(config, params, tokens, lengths=lengths, max_new_tokens=6,
                         capacity=32, kv_compression=spec)
  plan = sharding.Plan(config, sharding.make_mesh("data:2,model:4"))
  got = engine.generate(config, params, tokens, lengths=lengths, max_new_tokens=6, capacity=32,
                        kv_compression=spec, plan=plan)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_readme_bytes_per_token_table_matches_the_code():
  """The README's yi-34b table: every row's bytes per token (all layers,
  capacity 131072, bf16) and ratio to bf16 are what the formats compute."""
  from pathlib import Path
  from lctx.cost import metrics
  text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = text.split("### KV-cache compression: quantization")[1].split("\n### ")[0]
  rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
  assert len(rows) >= 8
  yi = lctx.ModelConfig.from_preset("yi-34b")
  dense = yi.replace(dtype="bfloat16").kv_bytes_per_token()
  for cells in rows:
    spec = cells[0].strip().strip("`")
    got = metrics.kv_token_bytes(yi, "" if spec == "dense" else spec, 131072, "bfloat16")
    got = dense if got is None else got
    assert cells[3].strip() == f"{got:,.1f}", spec
    assert cells[4].strip() == f"{got / dense:.3f}", spec


def test_generate_rounds_its_default_capacity_to_the_format():
  """generate's default capacity (T + max_new_tokens = 17) rounds up to the
  KIVI group; a residual covering that capacity is the dense cache."""
  tokens, _ = _prompts(2, 12)
  lengths = np.array([12, 7], np.int32)
  spec = "kivi:bits=2,group=4,residual=8"
  got = engine.generate(CONFIG, PARAMS, tokens, lengths=lengths, max_new_tokens=5,
                        kv_compression=spec)
  want = engine.generate(CONFIG, PARAMS, tokens, lengths=lengths, max_new_tokens=5, capacity=20,
                         kv_compression=spec)
  np.testing.assert_array_equal(got, want)
  dense = engine.generate(CONFIG, PARAMS, tokens, lengths=lengths, max_new_tokens=5)
  np.testing.assert_array_equal(engine.generate(
      CONFIG, PARAMS, tokens, lengths=lengths, max_new_tokens=5, capacity=17,
      kv_compression="kivi:group=4"), dense)


@pytest.mark.parametrize("spec", ["int8", "kivi:bits=2,group=4,residual=8", "int8:scale=token"])
def test_context_switch_moves_the_physical_bytes(spec):
  """The compiled swap (one user's cache out to pinned host memory, another's
  in) moves the cache's physical bytes: on model:2, each device its half of
  the arrays split over the 2 KV heads and the whole of the replicated ones."""
  from lctx.cache.dense import abstract_cache
  from lctx.cost import metrics
  cache = abstract_cache(CONFIG, 1, 1024, kv_compression=spec)
  leaves = jax.tree.leaves((cache.k, cache.v))
  nbytes = lambda x: x.size * x.dtype.itemsize
  assert metrics.swap_costs(CONFIG, "model:1", 1024, spec).host_transfer_bytes == 2 * sum(
      nbytes(x) for x in leaves)
  per_device = sum(nbytes(x) / (2 if x.shape[2] == CONFIG.num_kv_heads else 1) for x in leaves)
  assert metrics.swap_costs(CONFIG, "model:2", 1024, spec).host_transfer_bytes == 2 * per_device
