"""Chunked prefill (lctx.model.transformer._chunked_prefill): C tokens at a
time through all layers equals the one-pass prefill, on one device and on
every mesh (seq meshes included), in one compiled program whose temporaries
are bounded by the chunk and whose FLOPs are the causal count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import engine, sharding
from lctx.model.params import unstack_layers

CONFIG = lctx.ModelConfig.from_preset("tiny")
T, CAPACITY = 37, 48  # a prompt length no chunk below divides
T_SEQ = 40  # seq meshes split the prompt: 8 divides it, the chunks below do not


def _prompts(B=3):
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, T))
  lengths = np.array([T, 20, 5, 33][:B], np.int32)
  return tokens, lengths


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                           jax.tree.leaves(b)))


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_chunked_equals_one_pass(layout):
  params = lctx.init_params(CONFIG, 0)
  params = params if layout == "stacked" else unstack_layers(params)
  tokens, lengths = _prompts()
  want_logits, want = engine.prefill(CONFIG, params, tokens,
                                     engine.new_cache(CONFIG, params, 3, CAPACITY), lengths)
  for chunk in (1, 3, 16, 64, T):
    logits, got = engine.prefill(CONFIG, params, tokens,
                                 engine.new_cache(CONFIG, params, 3, CAPACITY), lengths,
                                 chunk=chunk)
    assert float(jnp.max(jnp.abs(logits - want_logits))) < 1e-5, chunk
    np.testing.assert_array_equal(got.lengths, want.lengths)
    # Equal up to fp32 rounding: XLA:CPU's GEMMs over C rows and over T rows
    # block their sums differently (not bitwise, even at layer 0), and the
    # attention walks its keys in another order.
    assert _max_diff((got.k, got.v), (want.k, want.v)) < 1e-6, chunk


def test_generate_with_chunks_gives_the_same_tokens():
  params = lctx.init_params(CONFIG, 0)
  tokens, lengths = _prompts()
  want = engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=6)
  for chunk in (4, 0):
    got = engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=6,
                          prefill_chunk=chunk)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mesh", ["model:8", "data:2,model:4", "model:2", "seq:8",
                                  "data:2,seq:2,model:2", "seq:2"])
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_sharded_chunked_equals_unsharded(mesh, layout):
  """Chunks of 16 over a 40-token prompt (a last chunk of 8), and chunks of 8
  on the seq meshes too, where a chunk (16) spans several devices' cache
  slices (6 slots each on seq:8) and the prompt ends inside one."""
  params = lctx.init_params(CONFIG, 0)
  B = 4 if "data" in mesh else 2
  tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (B, T_SEQ))
  lengths = np.array([T_SEQ, 20, 5, 33][:B], np.int32)
  want_logits, want = engine.prefill(CONFIG, params, tokens,
                                     engine.new_cache(CONFIG, params, B, CAPACITY), lengths)
  plan = sharding.Plan(CONFIG, sharding.make_mesh(mesh))
  placed = engine.shard_params(params if layout == "stacked" else unstack_layers(params), plan)
  for chunk in (16, 8):
    logits, got = engine.prefill(CONFIG, placed, tokens,
                                 engine.new_cache(CONFIG, placed, B, CAPACITY, plan), lengths,
                                 plan=plan, chunk=chunk)
    assert float(jnp.max(jnp.abs(np.asarray(logits) - want_logits))) < 1e-5, chunk
    k, v = (np.asarray(x) if layout == "stacked" else np.stack(x) for x in (got.k, got.v))
    assert _max_diff((k, v), (want.k, want.v)) < 1e-6, chunk


def test_generate_with_chunks_on_a_seq_mesh():
  params = lctx.init_params(CONFIG, 0)
  tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, T_SEQ))
  lengths = np.array([T_SEQ, 13], np.int32)
  want = engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=8)
  plan = sharding.Plan(CONFIG, sharding.make_mesh("seq:4,model:2"))
  got = engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=8, plan=plan,
                        prefill_chunk=12, capacity=CAPACITY)
  np.testing.assert_array_equal(got, want)


def test_one_compile_serves_every_chunk():
  params = lctx.init_params(CONFIG, 0)
  tokens, lengths = _prompts()
  before = engine.prefill_jit._cache_size()  # pylint: disable=protected-access
  engine.prefill(CONFIG, params, tokens, engine.new_cache(CONFIG, params, 3, CAPACITY),
                 lengths, chunk=7)
  assert engine.prefill_jit._cache_size() == before + 1  # pylint: disable=protected-access
  # Its program holds the full-chunk body once (in a loop) and the 2-token tail once.
  text = engine.prefill_jit.lower(CONFIG, params, tokens, lengths,
                                  engine.new_cache(CONFIG, params, 3, CAPACITY),
                                  chunk=7).as_text()
  assert text.count("stablehlo.while") >= 1


def test_bad_chunks_are_refused_before_compiling():
  params = lctx.init_params(CONFIG, 0)
  tokens, lengths = _prompts()
  for chunk in (-1, True, 2.5, "8"):
    with pytest.raises(ValueError, match=r"prefill chunk=.*; allowed: None or an int >= 0"):
      engine.prefill(CONFIG, params, tokens, engine.new_cache(CONFIG, params, 3, CAPACITY),
                     lengths, chunk=chunk)
  plan = sharding.Plan(CONFIG, sharding.make_mesh("seq:4"))
  with pytest.raises(ValueError, match=r"prefill chunk=6 on a mesh with seq:4: allowed: 0 "
                                       r"\(one pass\) or a multiple of 4"):
    engine.prefill(CONFIG, engine.shard_params(params, plan), tokens[:1, :T_SEQ - 8],
                   engine.new_cache(CONFIG, params, 1, CAPACITY, plan), lengths[:1] - 8,
                   plan=plan, chunk=6)
  # numpy integers are ints (as max_new_tokens accepts them).
  logits, _ = engine.prefill(CONFIG, params, tokens, engine.new_cache(CONFIG, params, 3, CAPACITY),
                             lengths, chunk=np.int64(16))
  want, _ = engine.prefill(CONFIG, params, tokens, engine.new_cache(CONFIG, params, 3, CAPACITY),
                           lengths, chunk=16)
  np.testing.assert_array_equal(logits, want)
  with pytest.raises(ValueError, match="prefill chunk=-2"):
    engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=2, prefill_chunk=-2)


def test_chunked_prefill_temporaries_are_bounded_by_the_chunk():
  """The compiled chunked prefill's peak temporaries (lctx.cost.hlo) at T and
  4T agree within 10% for a fixed chunk (blocks are read from the cache in
  place), where the one-pass prefill's grow with the residual stream."""
  from lctx.cost import metrics
  config = lctx.ModelConfig.from_preset("small")
  for mesh in ("model:2", "seq:2"):
    temps = {(T, chunk): metrics.program_costs(config, mesh, T, 1, "prefill", None,
                                               chunk).temp_bytes
             for T in (2048, 8192) for chunk in (None, 512)}
    assert temps[(8192, 512)] == pytest.approx(temps[(2048, 512)], rel=0.10), mesh
    assert temps[(8192, None)] > 1.5 * temps[(2048, None)], mesh


def _causal_prefill_flops(config, T) -> float:
  """2 x params-in-matmuls per token, plus attention's QK^T and PV over the
  causal pairs T (T + 1) / 2 (numpy-free closed form, lctx.cost.analytic's
  'exact' convention)."""
  from lctx.cost import analytic
  return analytic.prefill_flops(config, T, "exact")


@pytest.mark.parametrize("mesh,T,chunk", [("model:2", 8192, 1024), ("model:2", 6000, 1024),
                                          ("model:1", 4096, 512)])
def test_chunked_prefill_flops_are_the_causal_count(mesh, T, chunk):
  """No attention over empty or masked cache blocks is charged: the walker's
  FLOPs of the chunked program (its cache loops at their declared trip
  counts) are within 5% of the causal closed form, and within 2% of the
  one-pass program's (which pads the prompt to whole 512-token blocks: 6000
  tokens walk 6144)."""
  from lctx.cost import metrics
  config = lctx.ModelConfig.from_preset("small")
  g = metrics.num_devices(mesh)
  want = _causal_prefill_flops(config, T) / g
  chunked = metrics.program_costs(config, mesh, T, 1, "prefill", None, chunk)
  one_pass = metrics.program_costs(config, mesh, T, 1, "prefill")
  assert chunked.unknown_trip_counts == 0
  assert chunked.flops == pytest.approx(want, rel=0.05)
  assert chunked.flops == pytest.approx(one_pass.flops, rel=0.02)


def test_declared_trip_counts():
  """chunk_trips: cache blocks per layer before each chunk (the mean over the
  scanned chunks, then the last chunk's), and on seq meshes the most any
  device runs."""
  from lctx.model import transformer
  # Chunks at 0, 1024, ..., 7168 over blocks of 512: 0, 2, ..., 14 blocks; no tail.
  assert transformer.chunk_trips(8192, 1024, 8192) == (7.0, 16)
  # 6000 = 5 x 1024 + 880: chunks at 0..4096 (0, 2, 4, 6, 8), the tail at 5120 (10).
  assert transformer.chunk_trips(6000, 1024, 6000) == (4.0, 10)
  # seq:4 over 8192 slots: 2048 per device, so at most 4 blocks on any device.
  assert transformer.chunk_trips(8192, 1024, 8192, seq=4) == (sum(
      min(i * 1024, 2048) // 512 for i in range(8)) / 8, 4)
