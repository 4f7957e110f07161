"""Chunked prefill (lctx.model.transformer._chunked_prefill, issue 12's first
part): C tokens at a time through all layers equals the one-pass prefill, on
one device and on meshes without a seq axis, in one compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import engine, sharding
from lctx.model.params import unstack_layers

CONFIG = lctx.ModelConfig.from_preset("tiny")
T, CAPACITY = 37, 48  # a prompt length no chunk below divides


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


@pytest.mark.parametrize("mesh", ["model:8", "data:2,model:4", "model:2"])
def test_sharded_chunked_equals_unsharded(mesh):
  params = lctx.init_params(CONFIG, 0)
  tokens, lengths = _prompts(B=2 if "data" not in mesh else 4)
  B = tokens.shape[0]
  want_logits, want = engine.prefill(CONFIG, params, tokens,
                                     engine.new_cache(CONFIG, params, B, CAPACITY), lengths)
  plan = sharding.Plan(CONFIG, sharding.make_mesh(mesh))
  placed = engine.shard_params(params, plan)
  logits, got = engine.prefill(CONFIG, placed, tokens,
                               engine.new_cache(CONFIG, placed, B, CAPACITY, plan), lengths,
                               plan=plan, chunk=5)
  assert float(jnp.max(jnp.abs(np.asarray(logits) - want_logits))) < 1e-5
  assert _max_diff((np.asarray(got.k), np.asarray(got.v)), (want.k, want.v)) < 1e-6


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
  plan = sharding.Plan(CONFIG, sharding.make_mesh("seq:2"))
  with pytest.raises(ValueError, match="chunked prefill on a mesh with a seq axis"):
    engine.prefill(CONFIG, engine.shard_params(params, plan), tokens[:1],
                   engine.new_cache(CONFIG, params, 1, CAPACITY, plan), lengths[:1], plan=plan,
                   chunk=8)
  with pytest.raises(ValueError, match="prefill chunk=-2"):
    engine.generate(CONFIG, params, tokens, lengths=lengths, max_new_tokens=2, prefill_chunk=-2)


def test_chunked_prefill_temporaries_grow_by_one_layers_cache_only():
  """The compiled chunked prefill's peak temporaries (lctx.cost.hlo) from T to
  4T grow by one layer's K/V for the added slots (the transposed copy each
  chunk attends over; issue 12 removes it), where the one-pass prefill's
  grow with the whole residual stream."""
  from lctx.cost import metrics
  config = lctx.ModelConfig.from_preset("small")
  temps = {(T, chunk): metrics.program_costs(config, "model:2", T, 1, "prefill", None,
                                             chunk).temp_bytes
           for T in (2048, 8192) for chunk in (None, 512)}
  # K and V of one layer for 6144 more slots, per device (model:2 splits the KV heads).
  layer_kv = 2 * 6144 * config.num_kv_heads // 2 * config.head_dim * 4
  assert temps[(8192, 512)] - temps[(2048, 512)] == pytest.approx(layer_kv, rel=0.10)
  assert temps[(8192, None)] - temps[(2048, None)] > 10 * layer_kv
