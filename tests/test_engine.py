"""Prefill, decode and generate against the teacher-forced forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import ModelConfig, SamplingConfig, engine
from lctx.sampling import sample

CFG = ModelConfig.from_preset("tiny")
PARAMS = lctx.init_params(CFG, seed=0)
LAYOUTS = {"stacked": PARAMS, "unrolled": lctx.unstack_layers(PARAMS)}
forward = jax.jit(lctx.forward, static_argnums=0)


def rollout(params, prompt, n, width=32):
  """Greedy continuation by re-running the full forward pass each step.

  The sequence is zero-padded to a fixed width (one compile); causality keeps
  the padding out of the logits read at the last real position.
  """
  seq, logits = list(prompt), []
  for _ in range(n):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(seq)] = seq
    last = forward(CFG, params, jnp.asarray(padded))[0, len(seq) - 1]
    logits.append(np.asarray(last))
    seq.append(int(np.argmax(last)))
  return seq[len(prompt):], np.stack(logits)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_and_decode_match_forward_rollout(layout):
  params = LAYOUTS[layout]
  prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, 11)
  want_tokens, want_logits = rollout(PARAMS, prompt, 8)
  cache = engine.new_cache(CFG, params, batch=1, capacity=32)
  logits, cache = lctx.prefill(CFG, params, prompt[None], cache)
  got_tokens, got_logits = [], []
  for _ in range(8):
    got_logits.append(np.asarray(logits[0]))
    got_tokens.append(int(np.argmax(logits[0])))
    logits, cache = lctx.decode_step(CFG, params, jnp.asarray([got_tokens[-1]]), cache)
  assert got_tokens == want_tokens
  np.testing.assert_allclose(np.stack(got_logits), want_logits, atol=1e-5, rtol=0)
  assert int(cache.lengths[0]) == 11 + 8


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_per_row_lengths(layout):
  rng = np.random.default_rng(1)
  lengths = [13, 4, 9]
  tokens = rng.integers(0, CFG.vocab_size, (3, 13))
  out = lctx.generate(CFG, LAYOUTS[layout], tokens, lengths=lengths, max_new_tokens=7)
  assert out.shape == (3, 7) and out.dtype == jnp.int32
  for row, n in enumerate(lengths):
    want, _ = rollout(PARAMS, tokens[row, :n], 7)
    assert list(np.asarray(out[row])) == want


def test_prefill_block_size_does_not_change_results():
  tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 45))
  a = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=4, block=512)
  b = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=4, block=16)
  np.testing.assert_array_equal(a, b)


def test_sampling_is_seeded_and_top_k1_is_greedy():
  tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 6))
  greedy = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=5)
  k1 = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=5,
                     sampling=SamplingConfig(temperature=1.0, top_k=1), key=jax.random.key(0))
  np.testing.assert_array_equal(greedy, k1)
  hot = SamplingConfig(temperature=2.0)
  a = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=8, sampling=hot, key=jax.random.key(1))
  b = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=8, sampling=hot, key=jax.random.key(1))
  c = lctx.generate(CFG, PARAMS, tokens, max_new_tokens=8, sampling=hot, key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("sampling", [SamplingConfig(0.7), SamplingConfig(1.0, top_k=3),
                                      SamplingConfig(1.0, top_p=0.6),
                                      SamplingConfig(1.5, top_k=4, top_p=0.8)])
def test_sampling_distribution_matches_numpy(sampling):
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
  z = logits / sampling.temperature
  order = np.argsort(-z)
  keep = np.zeros_like(z, bool)
  keep[order[:sampling.top_k or len(z)]] = True
  probs = np.where(keep, np.exp(z - z.max()), 0)
  probs /= probs.sum()
  if sampling.top_p < 1:  # smallest sorted prefix reaching top_p
    mass, nucleus = 0.0, np.zeros_like(keep)
    for i in np.argsort(-probs):
      if mass >= sampling.top_p:
        break
      nucleus[i], mass = True, mass + probs[i]
    probs = np.where(nucleus, probs, 0)
    probs /= probs.sum()
  n = 40000
  draws = sample(jnp.tile(jnp.asarray(logits), (n, 1)), jax.random.key(0), sampling)
  freq = np.bincount(np.asarray(draws), minlength=len(z)) / n
  np.testing.assert_allclose(freq, probs, atol=0.01)


def test_capacity_errors():
  tokens = np.zeros((1, 10), np.int32)
  with pytest.raises(ValueError, match="capacity"):
    lctx.generate(CFG, PARAMS, tokens, max_new_tokens=6, capacity=14)
  lctx.generate(CFG, PARAMS, tokens, max_new_tokens=5, capacity=14)  # needs exactly 14
  cache = engine.new_cache(CFG, PARAMS, batch=1, capacity=11)
  _, cache = lctx.prefill(CFG, PARAMS, tokens, cache)
  _, cache = lctx.decode_step(CFG, PARAMS, jnp.zeros(1, jnp.int32), cache)
  with pytest.raises(ValueError, match="full"):
    lctx.decode_step(CFG, PARAMS, jnp.zeros(1, jnp.int32), cache)
  with pytest.raises(ValueError, match="capacity"):
    lctx.prefill(CFG, PARAMS, tokens, engine.new_cache(CFG, PARAMS, 1, 8))


def test_bad_arguments():
  with pytest.raises(ValueError, match="lengths"):
    lctx.generate(CFG, PARAMS, np.zeros((2, 5), np.int32), lengths=[5, 6], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    lctx.generate(CFG, PARAMS, np.zeros((1, 5), np.int32), max_new_tokens=0)
  with pytest.raises(ValueError, match="key"):
    lctx.generate(CFG, PARAMS, np.zeros((1, 5), np.int32), max_new_tokens=2,
                  sampling=SamplingConfig(temperature=1.0))
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    lctx.generate(CFG, PARAMS, np.zeros((5,), np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match="vocabulary"):
    lctx.generate(CFG, PARAMS, np.full((1, 5), CFG.vocab_size, np.int32), max_new_tokens=2)
  cache = engine.new_cache(CFG, PARAMS, batch=1, capacity=8)
  _, cache = lctx.prefill(CFG, PARAMS, np.ones((1, 3), np.int32), cache)
  with pytest.raises(ValueError, match="vocabulary"):
    lctx.decode_step(CFG, PARAMS, jnp.array([-1]), cache)
  with pytest.raises(ValueError, match="one per cache row"):
    lctx.decode_step(CFG, PARAMS, jnp.array([1, 2]), cache)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_compiles_once(layout):
  params = LAYOUTS[layout]
  cache = engine.new_cache(CFG, params, batch=2, capacity=64)
  _, cache = lctx.prefill(CFG, params, np.ones((2, 5), np.int32), cache)
  before = engine.decode_jit._cache_size()
  token = jnp.zeros(2, jnp.int32)
  for _ in range(12):
    logits, cache = lctx.decode_step(CFG, params, token, cache)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
  assert engine.decode_jit._cache_size() - before <= 1
  assert int(cache.lengths[0]) == 17


def test_decode_updates_cache_in_place():
  """With the cache donated, the step's temporaries are a small fraction of it."""
  cfg = CFG.replace(hidden_size=256, head_dim=32, num_layers=4, intermediate_size=256)
  params = jax.eval_shape(lctx.unstack_layers, lctx.abstract_params(cfg))
  cache = jax.eval_shape(lambda: engine.new_cache(cfg, params, batch=4, capacity=8192))
  compiled = engine.decode_jit.lower(cfg, params, jax.ShapeDtypeStruct((4,), jnp.int32),
                                     cache).compile()
  mem = compiled.memory_analysis()
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  assert mem.alias_size_in_bytes == cache_bytes  # every cache buffer is reused for the output
  assert mem.temp_size_in_bytes < 0.05 * cache_bytes


def test_donated_cache_is_consumed():
  cache = engine.new_cache(CFG, PARAMS, batch=1, capacity=16)
  _, new = lctx.prefill(CFG, PARAMS, np.ones((1, 4), np.int32), cache)
  assert cache.k.is_deleted() and not new.k.is_deleted()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_stops_each_row_at_eos_and_pads(layout):
  """A row that emits an EOS id keeps it, then holds pad; other rows go on as
  without EOS. The EOS ids are picked from the free run so that rows end at
  different steps, and one row never ends."""
  tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (4, 6))
  free = np.asarray(lctx.generate(CFG, LAYOUTS[layout], tokens, max_new_tokens=12))
  eos = (int(free[0, 2]), int(free[1, 6]))
  ends = [next((i for i, t in enumerate(row) if t in eos), None) for row in free]
  assert ends == [2, 6, None, None]  # rows end at different steps; two never do
  out = np.asarray(lctx.generate(CFG, LAYOUTS[layout], tokens, max_new_tokens=12,
                                 eos_token_id=eos, pad_token_id=7))
  for row, end in enumerate(ends):
    if end is None:
      np.testing.assert_array_equal(out[row], free[row])
    else:
      np.testing.assert_array_equal(out[row, :end + 1], free[row, :end + 1])
      assert (out[row, end + 1:] == 7).all(), (row, out[row])
  # pad defaults to the first EOS id; an EOS id outside the vocabulary is refused.
  default = np.asarray(lctx.generate(CFG, PARAMS, tokens[:1], max_new_tokens=12,
                                     eos_token_id=eos[0]))
  assert (default[0, 3:] == eos[0]).all()
  with pytest.raises(ValueError, match=r"eos_token_id must be integer token id\(s\) in \[0, 256\)"):
    lctx.generate(CFG, PARAMS, tokens, max_new_tokens=2, eos_token_id=CFG.vocab_size)
  with pytest.raises(ValueError, match="pad_token_id is only used with eos_token_id"):
    lctx.generate(CFG, PARAMS, tokens, max_new_tokens=2, pad_token_id=0)


def test_generate_with_eos_on_a_mesh_equals_one_device():
  plan = lctx.sharding.Plan(CFG, lctx.sharding.make_mesh("data:2,model:2"))
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (4, 8))
  free = np.asarray(lctx.generate(CFG, PARAMS, tokens, max_new_tokens=10))
  eos = int(free[2, 4])
  want = np.asarray(lctx.generate(CFG, PARAMS, tokens, max_new_tokens=10, eos_token_id=eos))
  got = np.asarray(lctx.generate(CFG, PARAMS, tokens, max_new_tokens=10, eos_token_id=eos,
                                 plan=plan))
  np.testing.assert_array_equal(got, want)
  assert (want[2, 5:] == eos).all()


def test_eos_token_id_forms():
  from lctx.engine import _stop_ids
  for form in (2, np.int64(2), np.array(2), jnp.int32(2), [2], np.array([2]), (2,)):
    assert _stop_ids(CFG, form, None) == ((2,), 2), form
  assert _stop_ids(CFG, (), None) is None  # no EOS ids: nothing to stop at
  for bad in (True, 1.5, [2, None], CFG.vocab_size, -1):
    with pytest.raises(ValueError, match="eos_token_id must be integer token id"):
      _stop_ids(CFG, bad, None)
  with pytest.raises(ValueError, match="pad_token_id must be integer token id"):
    _stop_ids(CFG, 2, False)
  with pytest.raises(ValueError, match="right-pad shorter prompts and pass their lengths"):
    lctx.generate(CFG, PARAMS, [[1, 2], [3]], max_new_tokens=2)
