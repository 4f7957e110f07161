"""lctx.mha_to_gqa: mean-pooled KV heads (GQA paper, sec. 2.2), against numpy
and against the source model; the --convert_kv_heads / --kv_heads flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from tests.test_experiments import finish  # waits, kills on timeout
from lctx import ModelConfig, engine
from lctx.convert import gqa_config

REPO = Path(__file__).resolve().parent.parent
POOLED = ("w_k", "w_v", "b_k", "b_v")


def tiny(num_heads=4, num_kv_heads=4, **kw):
  """A small model: MHA by default; with q/k/v biases and Qwen3's q/k norm."""
  return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8,
                     qkv_bias=True, qk_norm=True, name="mini", **kw)


def make_params(config, seed=0):
  """Random params in numpy (lctx.init_params is slow to start per config):
  weights normal(0, 0.1), norm weights near 1, in config.param_dtype."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    x = rng.standard_normal(s.shape).astype(np.float32)
    x = 1 + 0.1 * x if path[-1].key.endswith("norm") else 0.1 * x
    return jnp.asarray(x).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, lctx.abstract_params(config))


forward = jax.jit(lctx.forward, static_argnums=0)


def layouts(params):
  return {"stacked": params, "unrolled": lctx.unstack_layers(params)}


def layer_leaves(params):
  """{name: [L, ...] numpy array} whatever the layout."""
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return {k: np.stack([np.asarray(w[k]) for w in layers]) for k in layers[0]}
  return {k: np.asarray(v) for k, v in layers.items()}


def group_means(x, groups):
  """Independent reference: x [L, ..., K, H] -> the float32 mean of each run
  of K / groups contiguous heads, [L, ..., groups, H]."""
  x = np.asarray(x, np.float32)
  r = x.shape[-2] // groups
  return np.stack([x[..., j * r:(j + 1) * r, :].mean(axis=-2) for j in range(groups)], axis=-2)


def tiled(config, params, groups):
  """The params with the K/V heads of each future group made identical (the
  group's first head repeated), so pooling them changes nothing."""
  r = config.num_kv_heads // groups
  layers = dict(params["layers"])
  for k in POOLED:
    if k in layers:
      layers[k] = jnp.repeat(layers[k][..., ::r, :], r, axis=-2)
  return {**params, "layers": layers}


# ---- the conversion ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
@pytest.mark.parametrize("config", [tiny(), ModelConfig.from_preset("tiny")], ids=["mha", "gqa"])
def test_same_kv_heads_is_the_identity(config, layout):
  params = layouts(make_params(config, 1))[layout]
  new_config, new_params = lctx.mha_to_gqa(config, params, config.num_kv_heads)
  assert new_config is config and new_params is params
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    assert a is b


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("source, groups", [((4, 4), 2), ((4, 4), 1), ((8, 4), 2)],
                         ids=["mha4to2", "mha4to1", "gqa4to2"])
def test_pooled_heads_are_the_group_means(source, groups, dtype, layout):
  config = tiny(*source, param_dtype=dtype)
  params = layouts(make_params(config, 2))[layout]
  new_config, new_params = lctx.mha_to_gqa(config, params, groups)
  assert new_config == config.replace(num_kv_heads=groups, name=f"mini-kv{groups}")
  assert engine.layers_stacked(new_params) == (layout == "stacked")
  engine.check_params(new_config, new_params)
  before, after = layer_leaves(params), layer_leaves(new_params)
  for k in POOLED:
    assert after[k].dtype == before[k].dtype == jnp.dtype(dtype)
    assert after[k].shape[-2] == groups
    tol = 1e-6 if dtype == "float32" else 2.0 ** -8  # one bf16 rounding of the f32 mean
    np.testing.assert_allclose(after[k].astype(np.float32), group_means(before[k], groups),
                               rtol=tol, atol=1e-8)
  for k in set(before) - set(POOLED):  # w_q, w_o, norms (k_norm [H] too), the MLP
    np.testing.assert_array_equal(after[k], before[k])
  for k in ("embed", "final_norm", "lm_head"):
    assert new_params[k] is params[k]
  if layout == "stacked":
    assert new_params["layers"]["k_norm"] is params["layers"]["k_norm"]


def test_pooling_runs_in_float32():
  """bf16 heads 1, 1 + 2^-7, 1 + 2^-7, 1 + 2^-7: their mean 1 + 3 * 2^-9 rounds
  to 1 + 2^-7 in bf16; summed in bf16, every partial sum ties and rounds to
  even (2, 3, 4), and the mean would come out 1."""
  config = tiny(4, 4, param_dtype="bfloat16")
  params = make_params(config)
  w = np.ones(params["layers"]["w_k"].shape, np.float32)
  w[..., 1:, :] = 1 + 2.0 ** -7
  params["layers"]["w_k"] = jnp.asarray(w, jnp.bfloat16)
  _, new = lctx.mha_to_gqa(config, params, 1)
  assert new["layers"]["w_k"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new["layers"]["w_k"], np.float32), 1 + 2.0 ** -7)


@pytest.mark.skipif("kv_share_every" not in ModelConfig.__dataclass_fields__,
                    reason="no cross-layer KV sharing in this lctx")
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_cross_layer_kv_sharing_pools_kv_layers(layout):
  """Under kv_share_every, w_k/w_v/b_k/b_v live in params["kv_layers"]."""
  config = tiny(4, 4, kv_share_every=2)
  params = layouts(make_params(config, 6))[layout]
  new_config, new_params = lctx.mha_to_gqa(config, params, 2)
  engine.check_params(new_config, new_params)
  kv = layer_leaves({"layers": params["kv_layers"]})
  got = layer_leaves({"layers": new_params["kv_layers"]})
  for k in POOLED:
    np.testing.assert_allclose(got[k], group_means(kv[k], 2), rtol=1e-6, atol=1e-8)


TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


ROUNDING = 1e-5  # float32 logits of order 1: a few ulps of accumulated rounding


@pytest.mark.parametrize("source, groups", [((4, 4), 2), ((4, 4), 1), ((8, 4), 2)],
                         ids=["mha4to2", "mha4to1", "gqa4to2"])
def test_identical_heads_convert_to_the_same_model(source, groups):
  """A model whose heads within each group are identical computes the same
  logits with one head per group: query head n must read the pooled head
  n // (N / K'), the group its source head n // (N / K) went to. Equal to
  float32 rounding, not bitwise: the two programs contract different head
  counts, and XLA:CPU's dot kernels may sum them in a different order (on
  one CPU bitwise, on another 1e-6 apart); a wrong grouping is off by far
  more (test_a_permuted_grouping_would_differ)."""
  config = tiny(*source)
  params = tiled(config, make_params(config, 3), groups)
  new_config, new_params = lctx.mha_to_gqa(config, params, groups)
  np.testing.assert_allclose(forward(new_config, new_params, TOKENS),
                             forward(config, params, TOKENS), rtol=0, atol=ROUNDING)


def test_identical_heads_generate_the_same_tokens():
  """The same through lctx.generate (prefill, then decode steps over the
  smaller cache), unrolled layers."""
  config = tiny(4, 4)
  params = lctx.unstack_layers(tiled(config, make_params(config, 3), 2))
  new_config, new_params = lctx.mha_to_gqa(config, params, 2)
  assert not engine.layers_stacked(new_params)
  got = lctx.generate(new_config, new_params, TOKENS, max_new_tokens=6)
  assert got.shape == (2, 6)
  np.testing.assert_array_equal(got, lctx.generate(config, params, TOKENS, max_new_tokens=6))


def test_a_permuted_grouping_would_differ():
  """The check above can fail: pooling non-contiguous heads (0 with 2, 1 with
  3) of a contiguously tiled model changes the logits."""
  config = tiny(4, 4)
  params = tiled(config, make_params(config, 3), 2)
  perm = np.array([0, 2, 1, 3])
  layers = {k: (v[..., perm, :] if k in POOLED else v) for k, v in params["layers"].items()}
  new_config, new_params = lctx.mha_to_gqa(config, {**params, "layers": layers}, 2)
  diff = np.abs(forward(new_config, new_params, TOKENS) - forward(config, params, TOKENS))
  assert diff.max() > 1000 * ROUNDING


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_converted_model_has_a_smaller_cache(layout):
  config = tiny(4, 4)
  params = layouts(make_params(config, 4))[layout]

  def kv_bytes(cfg, p):
    cache = engine.new_cache(cfg, p, batch=2, capacity=32)
    assert cache.stacked == (layout == "stacked")
    return cache.physical_bytes - cache.lengths.size * cache.lengths.dtype.itemsize

  for groups in (2, 1):
    new_config, new_params = lctx.mha_to_gqa(config, params, groups)
    assert kv_bytes(config, params) == (config.num_heads // groups) * kv_bytes(new_config,
                                                                               new_params)
    assert config.kv_bytes_per_token() == (4 // groups) * new_config.kv_bytes_per_token()


def test_gqa_source_pooled_further():
  config = ModelConfig.from_preset("tiny")  # N = 8, K = 2
  params = make_params(config, 5)
  new_config, new_params = lctx.mha_to_gqa(config, params, 1)
  assert (new_config.num_heads, new_config.num_kv_heads, new_config.name) == (8, 1, "tiny-kv1")
  for k in ("w_k", "w_v"):
    np.testing.assert_allclose(np.asarray(new_params["layers"][k]),
                               group_means(params["layers"][k], 1), rtol=1e-6, atol=1e-8)
  engine.check_params(new_config, new_params)


@pytest.mark.parametrize("value, message", [
    (0, "num_kv_heads must be a positive integer"),
    (-2, "num_kv_heads must be a positive integer"),
    (1.0, "num_kv_heads must be a positive integer"),
    (True, "num_kv_heads must be a positive integer"),
    ("2", "num_kv_heads must be a positive integer"),
    (3, "num_kv_heads=3 does not divide"),
    (8, "num_kv_heads=8 does not divide"),  # divides N = 8, but heads are never split
    (4, "num_kv_heads=4 does not divide"),
])
def test_bad_num_kv_heads(value, message):
  config = ModelConfig.from_preset("tiny")  # N = 8, K = 2
  with pytest.raises(ValueError, match=message) as e:
    lctx.mha_to_gqa(config, None, value)  # checked before the params are touched
  assert "allowed: [1, 2]" in str(e.value)


def test_bad_config_or_params():
  config = tiny(4, 4)
  with pytest.raises(ValueError, match="config must be an lctx.ModelConfig"):
    lctx.mha_to_gqa({"num_key_value_heads": 4}, {}, 2)
  other = make_params(tiny(4, 2))  # already 2 KV heads: not this config's
  with pytest.raises(ValueError, match="params do not match config 'mini'.*expected"):
    lctx.mha_to_gqa(config, other, 2)
  assert gqa_config(config, 4) is config


# ---- the entry points -------------------------------------------------------------------

def _start(module, *args):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # the entry point end to end (subprocess); -m slow runs it
def test_generate_convert_kv_heads(tmp_path):
  from experiments.generate import make_prompt
  out = tmp_path / "out.json"
  run = _start("experiments.generate", "--convert_kv_heads=1", "--prompt_len=5",
               "--max_new_tokens=4", f"--json_out={out}")
  bad = _start("experiments.generate", "--convert_kv_heads=4")
  config = ModelConfig.from_preset("tiny")
  new_config, params = lctx.mha_to_gqa(config, lctx.init_params(config, 0), 1)
  want = lctx.generate(new_config, params, make_prompt(config.vocab_size, 1, 5, 0),
                       max_new_tokens=4, key=jax.random.key(0))
  rc, stdout, stderr = finish(bad)
  assert rc == 2 and stdout == ""  # refused before anything printed, loaded or compiled
  assert stderr.strip().splitlines()[-1].startswith("error: --convert_kv_heads=4: ")
  assert "allowed: [1, 2]" in stderr
  rc, stdout, stderr = finish(run)
  assert rc == 0, stderr[-3000:]
  assert ("converted: KV heads N/K = 8/2 -> 1 (mean-pooled, not uptrained): dense KV cache "
          "256 -> 128 bytes/token") in stdout
  assert "model tiny-kv1:" in stdout and " K=1 " in stdout
  result = json.loads(out.read_text())
  assert result["tokens"] == np.asarray(want).tolist()
  assert result["model"] == "tiny-kv1" and result["flags"]["convert_kv_heads"] == 1


def test_peak_analysis_kv_heads(tmp_path):
  """--kv_heads=1 on tiny (K = 2): half its KV bytes per user, closed form and HLO."""
  common = ["--model=tiny", "--contexts=256", "--num_devices=1"]
  run = _start("experiments.peak_analysis", *common, "--kv_heads=1",
               f"--json_out={tmp_path / 'rows.json'}")
  rc, _, stderr = finish(_start("experiments.peak_analysis", *common, "--kv_heads=3"))
  assert rc == 2 and "error: --kv_heads=3: " in stderr and "allowed: [1, 2]" in stderr
  rc, stdout, stderr = finish(run)
  assert rc == 0, stderr[-3000:]
  assert "model tiny-kv1 " in stdout
  rows = {r["source"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
  source = ModelConfig.from_preset("tiny").kv_bytes_per_token("bfloat16") * 256  # 128 B/token
  for r in rows.values():
    assert r["model"] == "tiny-kv1"
    assert r["kv_bytes_per_user_total"] == pytest.approx(source / 2, rel=1e-9)
