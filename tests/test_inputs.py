"""Inputs lctx used to mishandle silently or refuse wrongly: token ids and params
against the config (forward and the engine), ties at the sampling cutoff,
restoring a checkpoint on another topology, and one-line errors for bad files
and contexts too long to walk."""

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import importorskip

import lctx
from lctx import engine
from lctx.model import attention, transformer
from lctx.sampling import SamplingConfig, sample, truncate

CFG = lctx.ModelConfig.from_preset("tiny")
SMALL = lctx.ModelConfig.from_preset("small")
REPO = Path(__file__).resolve().parent.parent


def _random_params(config, seed=0):
  """Random params in the stacked layout, from numpy (no compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                      lctx.abstract_params(config))


PARAMS = _random_params(CFG)


# ---- 5. forward checks token ids and params ------------------------------------------------

def test_forward_is_the_checked_entry_point():
  assert lctx.forward is engine.forward
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
  want = np.asarray(transformer.forward(CFG, PARAMS, jnp.asarray(tokens, jnp.int32)))
  for params in (PARAMS, lctx.unstack_layers(PARAMS)):
    got = np.asarray(lctx.forward(CFG, params, tokens))
    assert got.shape == (2, 9, CFG.vocab_size) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # Under an outer jit the tokens are traced: shapes and params are still checked.
  jitted = jax.jit(lctx.forward, static_argnums=0)
  np.testing.assert_allclose(jitted(CFG, PARAMS, jnp.asarray(tokens)), want, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match=r"params\['embed'\] has shape"):
    jitted(SMALL, PARAMS, jnp.asarray(tokens))


@pytest.mark.parametrize("bad, low, high", [(CFG.vocab_size, 1, CFG.vocab_size), (-1, -1, 1),
                                            (2**32 + 3, 1, 2**32 + 3)])
def test_forward_rejects_ids_outside_the_vocabulary(bad, low, high):
  """Past the end gave NaN logits, below 0 another row's; int64 ids above 2^32
  are caught before a cast to int32 could wrap them into the vocabulary."""
  tokens = np.array([[1, bad]], np.int64)
  with pytest.raises(ValueError, match=rf"token ids in \[{low}, {high}\], outside the "
                                       rf"vocabulary \[0, {CFG.vocab_size}\)"):
    lctx.forward(CFG, PARAMS, tokens)


@pytest.mark.parametrize("tokens, found", [(np.array([[1.0, 2.0]]), r"float64\(1, 2\)"),
                                           (np.array([1, 2]), r"int64\(2,\)"),
                                           (np.array([[True]]), r"bool\(1, 1\)"),
                                           (np.zeros((1, 0), np.int32), "at least one token")])
def test_forward_rejects_float_bool_1d_and_empty_tokens(tokens, found):
  with pytest.raises(ValueError, match=found):
    lctx.forward(CFG, PARAMS, tokens)


def test_decode_step_rejects_float_tokens():
  cache = engine.new_cache(CFG, PARAMS, batch=1, capacity=8)
  _, cache = lctx.prefill(CFG, PARAMS, np.ones((1, 3), np.int32), cache)
  with pytest.raises(ValueError, match=r"integer array \[1\], got float32\(1,\)"):
    lctx.decode_step(CFG, PARAMS, jnp.array([1.7]), cache)


def _per_layer_mismatch():
  """tiny's params against tiny with a wider MLP: the first differing leaf in
  tree order is each layer's w_down."""
  wide = CFG.replace(intermediate_size=192)
  return wide, {
      "stacked": (PARAMS, r"params\['layers'\]\['w_down'\] has shape \(2, 128, 64\), "
                          r"expected \(2, 192, 64\)"),
      "unrolled": (lctx.unstack_layers(PARAMS), r"params\['layers'\]\[0\]\['w_down'\] has "
                                                r"shape \(128, 64\), expected \(192, 64\)")}


def test_params_of_another_config_name_the_first_mismatching_leaf():
  def one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
      call()
    assert "\n" not in str(info.value) and str(info.value).startswith("params do not match")

  tokens = np.ones((1, 4), np.int32)
  one_line(lambda: lctx.forward(SMALL, PARAMS, tokens),
           r"config 'small': params\['embed'\] has shape \(256, 64\), expected \(32000, 768\)$")
  wide, cases = _per_layer_mismatch()
  for params, match in cases.values():
    one_line(lambda: lctx.forward(wide, params, tokens), match)
  one_line(lambda: lctx.forward(CFG.replace(num_layers=3), lctx.unstack_layers(PARAMS), tokens),
           r"params\['layers'\] holds 2 per-layer dicts, expected num_layers = 3")
  one_line(lambda: lctx.forward(CFG.replace(tie_word_embeddings=True), PARAMS, tokens),
           r"params\['lm_head'\] \(shape \(64, 256\)\) is not a parameter")
  untied = {k: v for k, v in PARAMS.items() if k != "lm_head"}
  one_line(lambda: lctx.forward(CFG, untied, tokens),
           r"params\['lm_head'\] is missing \(expected shape \(64, 256\)\)")


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_engine_steps_check_params_before_compiling(layout):
  wide, cases = _per_layer_mismatch()
  params, match = cases[layout]
  tokens = np.ones((1, 4), np.int32)
  cache = engine.new_cache(CFG, params, batch=1, capacity=8)
  compiled = (engine.prefill_jit._cache_size(), engine.decode_jit._cache_size(),
              engine._generate_jit._cache_size())
  with pytest.raises(ValueError, match=match):
    lctx.prefill(wide, params, tokens, cache)
  with pytest.raises(ValueError, match=match):
    lctx.decode_step(wide, params, np.ones((1,), np.int32), cache)
  with pytest.raises(ValueError, match=match):
    lctx.generate(wide, params, tokens, max_new_tokens=2)
  plan = lctx.sharding.Plan(wide, lctx.sharding.make_mesh("model:2"))
  with pytest.raises(ValueError, match=match):
    lctx.generate(wide, params, tokens, max_new_tokens=2, plan=plan)
  assert (engine.prefill_jit._cache_size(), engine.decode_jit._cache_size(),
          engine._generate_jit._cache_size()) == compiled
  assert not any(x.is_deleted() for x in jax.tree.leaves(cache))  # never donated


def test_params_check_is_cheap():
  params = lctx.unstack_layers(PARAMS)
  engine.check_params(CFG, params)
  start = time.perf_counter()
  for _ in range(100):
    engine.check_params(CFG, params)
  assert (time.perf_counter() - start) / 100 < 2e-3


# ---- 6. sampling: exactly k tokens, the smallest top-p prefix, ties by index --------------

def _drawn(probs, sampling, n=512):
  """The set of tokens drawn by n samples, each with its own key."""
  logits = jnp.log(jnp.asarray([probs], jnp.float32))
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.vmap(lambda k: sample(logits, k, sampling)[0])(keys)
  return set(np.asarray(draws).tolist())


@pytest.mark.parametrize("probs, sampling, want", [
    ([0.4, 0.3, 0.3], SamplingConfig(1.0, top_p=0.6), {0, 1}),
    ([0.3, 0.4, 0.3], SamplingConfig(1.0, top_p=0.6), {0, 1}),
    ([0.3, 0.3, 0.4], SamplingConfig(1.0, top_p=0.6), {0, 2}),
    ([0.3, 0.3, 0.4], SamplingConfig(0.5, top_p=0.5), {0, 2}),  # tempered: still tied
    ([0.4, 0.3, 0.3, 1e-9], SamplingConfig(1.0, top_k=2), {0, 1}),
    ([1e-9, 0.3, 0.4, 0.3], SamplingConfig(1.0, top_k=2), {1, 2}),
    ([0.25, 0.25, 0.25, 0.25], SamplingConfig(1.0, top_k=3), {0, 1, 2}),
    ([0.25, 0.25, 0.25, 0.25], SamplingConfig(1.0, top_p=0.5), {0, 1}),
    ([0.4, 0.3, 0.3, 1e-9], SamplingConfig(1.0, top_k=3, top_p=0.6), {0, 1}),
])
def test_ties_at_the_cutoff_break_by_token_index(probs, sampling, want):
  assert _drawn(probs, sampling) == want
  kept = np.isfinite(np.asarray(truncate(jnp.log(jnp.asarray([probs])), sampling)[0]))
  assert set(np.flatnonzero(kept).tolist()) == want


def test_truncation_matches_transformers_without_ties():
  torch = importorskip("torch")
  importorskip("transformers")
  from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
  logits = np.random.default_rng(0).normal(size=(16, 50)).astype(np.float32) * 2
  for sampling, warper in [(SamplingConfig(1.0, top_k=1), TopKLogitsWarper(1)),
                           (SamplingConfig(1.0, top_k=7), TopKLogitsWarper(7)),
                           (SamplingConfig(1.0, top_p=0.3), TopPLogitsWarper(0.3)),
                           (SamplingConfig(1.0, top_p=0.9), TopPLogitsWarper(0.9))]:
    ours = np.isfinite(np.asarray(truncate(jnp.asarray(logits), sampling)))
    theirs = np.isfinite(warper(None, torch.as_tensor(logits)).numpy())
    np.testing.assert_array_equal(ours, theirs)
  # A tie at the top-p cutoff: both keep the smallest prefix (2 tokens), while
  # transformers breaks the tie towards the higher index.
  tied = np.log(np.array([[0.4, 0.3, 0.3]], np.float32))
  theirs = np.isfinite(TopPLogitsWarper(0.6)(None, torch.as_tensor(tied)).numpy())
  ours = np.isfinite(np.asarray(truncate(jnp.asarray(tied), SamplingConfig(1.0, top_p=0.6))))
  assert ours.sum() == theirs.sum() == 2 and ours.tolist() == [[True, True, False]]


def test_top_p_keeps_the_smallest_prefix_reaching_it():
  probs = [0.5, 0.2, 0.2, 0.1]
  assert _drawn(probs, SamplingConfig(1.0, top_p=0.45)) == {0}
  assert _drawn(probs, SamplingConfig(1.0, top_p=0.55)) == {0, 1}
  assert _drawn(probs, SamplingConfig(1.0, top_p=0.85)) == {0, 1, 2}
  assert _drawn(probs, SamplingConfig(1.0, top_p=0.95)) == {0, 1, 2, 3}


# ---- 7. restore on another topology ---------------------------------------------------------

RESTORE_IN_ONE_DEVICE = textwrap.dedent("""
    import sys
    import jax, numpy as np, lctx
    assert jax.device_count() == 1, jax.devices()
    cfg = lctx.ModelConfig.from_preset("tiny")
    for path in sys.argv[1:]:
      want = np.load(path + ".npz")
      got = lctx.restore_params(path, cfg)
      for k, x in jax.tree_util.tree_leaves_with_path(got):
        assert x.sharding.device_set == {jax.devices()[0]}, x.sharding
        assert x.dtype == want[jax.tree_util.keystr(k)].dtype
        assert np.array_equal(np.asarray(x), want[jax.tree_util.keystr(k)]), k
      print("restored", path)
""")


def _host_leaves(params):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(params)}


def _assert_bitwise(params, want):
  got = _host_leaves(params)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_restore_on_another_topology(tmp_path):
  params = _random_params(CFG, seed=5)
  want = _host_leaves(params)
  saved = []
  for mesh in ("model:8", "seq:2,model:4"):
    plan = lctx.sharding.Plan(CFG, lctx.sharding.make_mesh(mesh))
    placed = engine.shard_params(params, plan)
    assert len(jax.tree.leaves(placed)[0].sharding.device_set) == 8
    path = lctx.save_params(tmp_path / mesh.replace(":", "").replace(",", "_"), placed)
    np.savez(str(path) + ".npz", **want)
    saved.append(str(path))

    for kwargs in ({"config": CFG}, {}):  # one device: the default one
      restored = lctx.restore_params(path, **kwargs)
      for x in jax.tree.leaves(restored):
        assert isinstance(x.sharding, jax.sharding.SingleDeviceSharding)
        assert x.sharding.device_set == {jax.devices()[0]}
      _assert_bitwise(restored, want)

    target = lctx.sharding.Plan(CFG, lctx.sharding.make_mesh("data:2,model:4"))
    for kwargs in ({"config": CFG}, {}):  # the plan's config by default
      restored = lctx.restore_params(path, plan=target, **kwargs)
      shardings = target.param_shardings(lctx.abstract_params(CFG))
      for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding == s
      _assert_bitwise(restored, want)
    with pytest.raises(ValueError, match="plan was made for model 'tiny'"):
      lctx.restore_params(path, SMALL, plan=target)

  # A fresh process with one device (no forced device count).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", RESTORE_IN_ONE_DEVICE, *saved], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("restored") == 2


# ---- 9. one-line errors naming the input ----------------------------------------------------

def _hf_dir(path, config=CFG, shard=False):
  """An HF-layout checkpoint of random tiny weights (safetensors, no torch)."""
  from safetensors.numpy import save_file
  from lctx.checkpoint import hf_config_dict, to_hf_state_dict
  path.mkdir()
  (path / "config.json").write_text(json.dumps(hf_config_dict(config)))
  tensors = to_hf_state_dict(config, _random_params(config, seed=7))
  if not shard:
    save_file(tensors, str(path / "model.safetensors"))
    return path / "model.safetensors"
  names = sorted(tensors)
  files = {"model-00001-of-00002.safetensors": names[:5],
           "model-00002-of-00002.safetensors": names[5:]}
  for file, part in files.items():
    save_file({n: tensors[n] for n in part}, str(path / file))
  (path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: f for f, part in files.items() for n in part}}))
  return path / "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_safetensors_names_the_file(tmp_path, shard, keep):
  file = _hf_dir(tmp_path / "hf", shard=shard)
  data = file.read_bytes()
  file.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
  with pytest.raises(ValueError, match="not a readable safetensors file") as info:
    lctx.load_hf_checkpoint(tmp_path / "hf")
  assert str(file) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_index_names_the_file(tmp_path):
  _hf_dir(tmp_path / "hf", shard=True)
  index = tmp_path / "hf" / "model.safetensors.index.json"
  index.write_text('{"weight_map": ')
  with pytest.raises(ValueError, match=f"{index}: not a readable safetensors index"):
    lctx.load_hf_checkpoint(tmp_path / "hf")


def test_restore_params_refuses_what_is_not_an_orbax_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty is not an orbax lctx checkpoint \(written by "
                                       r"lctx.save_params\): no _METADATA file; found \[\]"):
    lctx.restore_params(tmp_path / "empty", CFG)
  _hf_dir(tmp_path / "hf")
  for kwargs in ({"config": CFG}, {}):
    with pytest.raises(ValueError, match=r"hf is a Hugging Face checkpoint directory, not an "
                                         r"orbax lctx checkpoint .*lctx.load_hf_checkpoint"):
      lctx.restore_params(tmp_path / "hf", **kwargs)
  with pytest.raises(ValueError, match="is a file, not an orbax lctx checkpoint"):
    lctx.restore_params(tmp_path / "hf" / "config.json", CFG)
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    lctx.restore_params(tmp_path / "missing", CFG)
  # overwrite=True replaces an orbax checkpoint or an empty directory, never an HF one.
  with pytest.raises(FileExistsError, match="is not an orbax checkpoint"):
    lctx.save_params(tmp_path / "hf", PARAMS, overwrite=True)
  assert (tmp_path / "hf" / "model.safetensors").is_file()
  lctx.save_params(tmp_path / "empty", PARAMS, overwrite=True)
  _assert_bitwise(lctx.restore_params(tmp_path / "empty", CFG), _host_leaves(PARAMS))


def test_huge_context_fails_early_without_host_memory():
  """At 1e9 tokens the old kernel built np.tril_indices over 1.9e6 blocks (3.47
  TiB on the host); now the pair count alone is checked against the scan's
  int32 trip count, in well under a second."""
  from lctx.cost import metrics
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(ValueError, match=r"1,907,349,609,375 block pairs, more than a scan's "
                                         r"int32 trip count allows .* block of at least 15264"):
      metrics.program_costs(CFG, "model:1", 10**9, 1, "prefill")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert time.perf_counter() - start < 10 and peak < 100 * 2**20
  suggested = attention._min_block(10**9, 10**9, True)
  assert attention._block_pairs(10**9, 10**9, suggested, True) <= attention._MAX_TRIP_COUNT
  assert attention._block_pairs(10**9, 10**9, suggested - 8, True) > attention._MAX_TRIP_COUNT


def test_long_context_attention_lowers_without_t_squared_host_memory():
  """2^24 tokens: 32768 blocks of 512, 536,887,296 pairs walked by one scan
  whose indices live in its carry (an index table would be 4 GiB on the host)."""
  T, block = 2**24, 512
  q = jax.ShapeDtypeStruct((1, T, 8, 16), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.bfloat16)
  tracemalloc.start()
  try:
    lowered = jax.jit(attention.causal_attention, static_argnums=3).lower(q, kv, kv, block)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 100 * 2**20
  nb = T // block
  assert f"{nb * (nb + 1) // 2}" in lowered.as_text()  # the scan's trip count


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_sampling_temperature_must_be_finite(temperature):
  with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
    lctx.SamplingConfig(temperature=temperature)
