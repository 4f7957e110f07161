"""Cross-layer KV sharing (ModelConfig.kv_share_every, Brandon et al. 2024):
layers in groups of s, the group's first layer computes K/V into cache layer
l // s, the others attend it with their own queries. Checked against a
float64 numpy model written here from that definition (independent of
lctx.model), in both layer layouts, one-pass and chunked prefill, decode,
an int8 cache and a sequence-parallel mesh; plus the config, params, costs
and errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import ModelConfig, engine, sharding
from lctx.cost import analytic, metrics
from lctx.cost.hardware import load_hardware
from tests.np_reference import absmax_roundtrip, np_rms_norm, np_rope

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig.from_preset("tiny")  # D 64, 8 query / 2 KV heads, head_dim 8
CFG = TINY.replace(num_layers=4, kv_share_every=2)  # two groups of two layers
PARAMS = lctx.init_params(CFG, seed=1)
# Groups of three, with every optional K/V leaf (b_k, b_v, k_norm) and the q ones.
CFG3 = TINY.replace(num_layers=6, kv_share_every=3, qkv_bias=True, o_bias=True, qk_norm=True)
PARAMS3 = lctx.init_params(CFG3, seed=2)
LAYOUT = {"stacked": lambda p: p, "unrolled": lctx.unstack_layers}
forward = jax.jit(engine.forward, static_argnums=0)


# ---- the numpy model --------------------------------------------------------------------

def np_shared_kv(config, params, prompt, feed=(), kv_view=None):
  """Float64 logits of one row: ([T, V] every prompt position's, teacher-forced,
  [len(feed), V] each fed token's). Layer l = s g + j uses the K/V that layer
  s g computed from its own input with params["kv_layers"][g]; the prompt
  attends its own K/V at full precision, a fed token attends the group's
  history as kv_view(k_post, v) returns it (None: exact)."""
  s, L, eps, theta = (config.kv_share_every, config.num_layers, config.rms_norm_eps,
                      config.rope_theta)
  f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}
  P = f64({k: v for k, v in params.items() if k not in ("layers", "kv_layers")})
  layers = f64(params["layers"])
  kv_layers = f64(params["kv_layers"]) if s > 1 else None
  hist = {}  # group -> (k_post [n, K, H], v [n, K, H])
  tokens = list(prompt)

  def proj(h, w, b, norm):
    y = np.einsum("td,dkh->tkh", h, w) + (0 if b is None else b)
    return y if norm is None else np_rms_norm(y, norm, eps)

  def run(tok, start):
    x = P["embed"][np.asarray(tok)]
    n, pos = len(tok), np.arange(start, start + len(tok))
    for l in range(L):
      g, lp = l // s, {k: v[l] for k, v in layers.items()}
      h = np_rms_norm(x, lp["attn_norm"], eps)
      q = np_rope(proj(h, lp["w_q"], lp.get("b_q"), lp.get("q_norm")), pos, theta)
      if l % s == 0:  # the group's first layer: K/V from its own input
        kvp = {k: v[g] for k, v in kv_layers.items()} if s > 1 else lp
        k = np_rope(proj(h, kvp["w_k"], kvp.get("b_k"), kvp.get("k_norm")), pos, theta)
        v = proj(h, kvp["w_v"], kvp.get("b_v"), None)
        old = hist.get(g)
        hist[g] = (k, v) if old is None else (np.concatenate([old[0], k]),
                                              np.concatenate([old[1], v]))
        new = (k, v)
      if start == 0:  # prompt: its own K/V, causal
        kk, vv, visible = *new, np.tril(np.ones((n, n), bool))
      else:
        kk, vv = hist[g] if kv_view is None else kv_view(*hist[g])
        visible = np.ones((n, len(kk)), bool)
      G = config.num_heads // config.num_kv_heads
      kk, vv = np.repeat(kk, G, axis=1), np.repeat(vv, G, axis=1)
      sc = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(q.shape[-1])
      sc = np.where(visible[None], sc, -np.inf)
      p = np.exp(sc - sc.max(-1, keepdims=True))
      attn = np.einsum("nts,snh->tnh", p / p.sum(-1, keepdims=True), vv).reshape(n, -1)
      x = x + attn @ lp["w_o"].reshape(-1, x.shape[-1]) + lp.get("b_o", 0)
      h = np_rms_norm(x, lp["mlp_norm"], eps)
      gate = h @ lp["w_gate"]
      x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]
    h = np_rms_norm(x, P["final_norm"], eps)
    return h @ (P["embed"].T if config.tie_word_embeddings else P["lm_head"])

  prompt_logits = run(tokens, 0)
  steps = []
  for t in feed:
    steps.append(run([t], len(tokens))[-1])
    tokens.append(t)
  return prompt_logits, np.array(steps)


def _prompts(config, B=2, T=14):
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T))
  return tokens, np.array([T, 9][:B], np.int32)


FEED = [[5, 17], [200, 3], [9, 64]]  # three decode steps, one token per row


def _run(config, params, kv_compression="", chunk=None, capacity=32, plan=None):
  """prefill (lengths [14, 9]) then the FEED steps: (logits [B, 1 + steps, V], cache)."""
  tokens, lengths = _prompts(config)
  if plan is not None:
    params = engine.shard_params(params, plan)
  cache = engine.new_cache(config, params, 2, capacity, plan=plan, kv_compression=kv_compression)
  logits, cache = engine.prefill(config, params, tokens, cache, lengths, chunk=chunk, plan=plan)
  out = [np.asarray(logits)]
  for step in FEED:
    logits, cache = engine.decode_step(config, params, jnp.asarray(step), cache, plan=plan)
    out.append(np.asarray(logits))
  return np.stack(out, 1), cache


def _want(config, params, kv_view=None):
  tokens, lengths = _prompts(config)
  rows = []
  for b, n in enumerate(lengths):
    prompt_logits, steps = np_shared_kv(config, params, tokens[b, :n], [f[b] for f in FEED],
                                        kv_view)
    rows.append(np.concatenate([prompt_logits[-1:], steps]))
  return np.stack(rows)


# ---- the model against numpy ----------------------------------------------------------

@pytest.mark.parametrize("name,layout", [("s2", "stacked"), ("s2", "unrolled"),
                                         ("s3_extras", "stacked")])
def test_forward_prefill_decode_match_numpy(name, layout):
  """Teacher-forced forward, one-pass prefill + decode steps and chunked
  prefill (chunks of 4: three under the scan, a shorter last one) + decode.
  s3_extras: groups of three under the scan, with q/k/v/o biases and q/k norms."""
  config, stacked = (CFG, PARAMS) if name == "s2" else (CFG3, PARAMS3)
  params = LAYOUT[layout](stacked)
  if layout == "stacked":  # the unrolled forward runs the same loop as its prefill
    tokens, _ = _prompts(config)
    logits = np.asarray(forward(config, params, tokens))
    for b in range(2):
      np.testing.assert_allclose(logits[b], np_shared_kv(config, stacked, tokens[b])[0],
                                 atol=1e-5, rtol=0)
  got, cache = _run(config, params)
  np.testing.assert_allclose(got, _want(config, stacked), atol=1e-5, rtol=0)
  # The cache holds L / s layers; chunked prefill fills it as one pass does.
  layers = cache.k if layout == "unrolled" else list(cache.k)
  assert len(layers) == config.num_kv_layers
  chunked, chunked_cache = _run(config, params, chunk=4)
  np.testing.assert_allclose(chunked, got, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(chunked_cache), jax.tree.leaves(cache)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_int8_cache_matches_numpy(chunk):
  """The sharing layers read the int8 entries the group's first layer wrote:
  numpy quantizes each group's history the same way (per token and KV head)."""
  got, cache = _run(CFG, PARAMS, "int8", chunk=chunk)
  assert cache.k["codes"].shape[0] == CFG.num_kv_layers
  view = lambda k, v: (absmax_roundtrip(k, 8, 0), absmax_roundtrip(v, 8, 0))
  want = _want(CFG, PARAMS, view)
  if chunk:  # a later chunk attends the earlier ones through the int8 cache too
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)
  else:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_generate_equals_prefill_and_decode_steps():
  tokens, lengths = _prompts(CFG)
  out = np.asarray(engine.generate(CFG, lctx.unstack_layers(PARAMS), tokens, lengths=lengths,
                                   max_new_tokens=4))
  cache = engine.new_cache(CFG, PARAMS, 2, 32)
  logits, cache = engine.prefill(CFG, PARAMS, tokens, cache, lengths)
  want = []
  for _ in range(4):
    want.append(np.asarray(jnp.argmax(logits, -1)))
    logits, cache = engine.decode_step(CFG, PARAMS, jnp.asarray(want[-1], jnp.int32), cache)
  np.testing.assert_array_equal(out, np.stack(want, 1))


def test_sequence_parallel_mesh_equals_unsharded():
  """seq:2 splits the cache's slots and the prompt; model:2 the heads; the
  sharing layers attend without writing, inside the same shard_map."""
  plan = sharding.Plan(CFG, sharding.make_mesh("seq:2,model:2"))
  want = _want(CFG, PARAMS)
  for chunk in (None, 4):
    got, cache = _run(CFG, PARAMS, chunk=chunk, plan=plan)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert cache.k.shape[0] == CFG.num_kv_layers


# ---- kv_share_every = 1 is the model as it was ---------------------------------------------

def test_share_one_keeps_the_layout_and_the_numbers():
  """s = 1 has no kv_layers and every layer's w_k / w_v (the layout without
  sharing), a cache of L layers, and equals the shared-KV numpy model at
  s = 1 (every layer its own group). (Bitwise equality with lctx before
  kv_share_every existed, params, logits and caches in both layouts, dense
  and int8, one pass and chunked, was checked once when it was added.)"""
  config = TINY.replace(num_layers=4)
  assert config.kv_share_every == 1 and config == TINY.replace(num_layers=4, kv_share_every=1)
  params = lctx.init_params(config, seed=1)
  assert set(params) == {"embed", "final_norm", "lm_head", "layers"}
  assert params["layers"]["w_k"].shape == (4, 64, 2, 8)
  got, cache = _run(config, params)
  assert cache.k.shape[0] == 4
  np.testing.assert_allclose(got, _want(config, params), atol=1e-5, rtol=0)


# ---- params, cache and config ---------------------------------------------------------

def test_params_layout_and_count():
  shapes = jax.tree.map(lambda x: x.shape, PARAMS)
  assert "w_k" not in shapes["layers"] and "w_v" not in shapes["layers"]
  assert shapes["kv_layers"] == {"w_k": (2, 64, 2, 8), "w_v": (2, 64, 2, 8)}
  assert shapes["layers"]["w_q"] == (4, 64, 8, 8)
  assert set(PARAMS3["kv_layers"]) == {"w_k", "w_v", "b_k", "b_v", "k_norm"}
  assert jax.tree.map(lambda x: x.shape, lctx.abstract_params(CFG)) == shapes
  for config, params in ((CFG, PARAMS), (CFG3, PARAMS3)):
    D, K, H, L, s = (config.hidden_size, config.num_kv_heads, config.head_dim,
                     config.num_layers, config.kv_share_every)
    assert config.num_params == sum(x.size for x in jax.tree.leaves(params))
    unshared = config.replace(kv_share_every=1)
    kv = 2 * D * K * H + (2 * K * H if config.qkv_bias else 0) + (H if config.qk_norm else 0)
    assert unshared.num_params - config.num_params == (L - L // s) * kv
    assert config.param_bytes() == 4 * config.num_params
    assert config.kv_bytes_per_token() == unshared.kv_bytes_per_token() // s
    assert analytic.kv_bytes_per_token(config, "float32") == config.kv_bytes_per_token()
    # Both layouts pass the shape check; the wrong count of kv_layers does not.
    engine.check_params(config, params)
    engine.check_params(config, lctx.unstack_layers(params))
  assert lctx.stack_layers(lctx.unstack_layers(PARAMS)).keys() == PARAMS.keys()
  bad = lctx.unstack_layers(PARAMS)
  with pytest.raises(ValueError, match=r"kv_layers'\] holds 1 per-layer dicts, expected "
                                       r"num_kv_layers = 2"):
    engine.check_params(CFG, {**bad, "kv_layers": bad["kv_layers"][:1]})
  with pytest.raises(ValueError, match=r"kv_layers.*is missing"):
    engine.check_params(CFG, {k: v for k, v in PARAMS.items() if k != "kv_layers"})
  with pytest.raises(ValueError, match=r"kv_layers.*not a parameter"):
    engine.check_params(CFG.replace(kv_share_every=1),
                        {**lctx.init_params(CFG.replace(kv_share_every=1)),
                         "kv_layers": PARAMS["kv_layers"]})


def test_cache_shapes_follow_the_kv_layers():
  for stacked in (True, False):
    for spec in ("", "int8"):
      cache = lctx.cache.abstract_cache(CFG3, 2, 16, stacked=stacked, kv_compression=spec)
      for leaf in jax.tree.leaves((cache.k, cache.v)):
        assert leaf.shape[0] == 2  # 6 layers / 3
      if not stacked:
        assert all(len(x) == 2 for x in jax.tree.leaves(
            (cache.k, cache.v), is_leaf=lambda x: isinstance(x, tuple)))
  dense = lctx.cache.abstract_cache(CFG, 1, 100)
  assert sum(x.size * 4 for x in jax.tree.leaves(metrics.cache_arrays(dense))) == \
      100 * CFG.kv_bytes_per_token()
  # The closed form of a compressed cache counts L / s layers too.
  half = metrics.kv_token_bytes(CFG, "int8", 64, "float32")
  assert half * 2 == pytest.approx(metrics.kv_token_bytes(CFG.replace(kv_share_every=1), "int8",
                                                          64, "float32"))


def test_config_round_trip_through_config_json(tmp_path):
  from lctx.checkpoint import hf_config_dict
  for config in (CFG, CFG3, TINY):
    hf = hf_config_dict(config)
    assert ("kv_share_every" in hf) == (config.kv_share_every > 1)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    back = ModelConfig.from_hf_config(tmp_path / "config.json", name=config.name)
    assert back == config
  # Without model_type a config is read as llama; kv_share_every is an lctx key it accepts.
  hf = {k: v for k, v in hf_config_dict(CFG).items() if k not in ("model_type", "architectures")}
  assert ModelConfig.from_hf_dict(hf).kv_share_every == 2


@pytest.mark.parametrize("value", [0, 3, -2, 2.0, True, "2", None])
def test_bad_values_name_the_field_and_the_allowed_values(value):
  with pytest.raises(ValueError, match=r"kv_share_every.*allowed: \[1, 2, 4\]"):
    TINY.replace(num_layers=4, kv_share_every=value)
  from lctx.checkpoint import hf_config_dict
  hf = {**hf_config_dict(TINY.replace(num_layers=4)), "kv_share_every": value}
  with pytest.raises(ValueError, match=r"config field kv_share_every=.*\(ModelConfig."
                                       r"kv_share_every\).*\[1, 2, 4\]"):
    ModelConfig.from_hf_dict(hf)


def test_eviction_with_sharing_is_an_error_before_compiling():
  tokens, _ = _prompts(CFG)
  with pytest.raises(ValueError, match="eviction selects tokens per layer.*kv_share_every=1"):
    engine.new_cache(CFG, PARAMS, 2, 32, kv_compression="streaming_llm:sinks=4,budget=8")
  with pytest.raises(ValueError, match="eviction selects tokens per layer"):
    engine.generate(CFG, PARAMS, tokens, max_new_tokens=2, kv_compression="snapkv:ratio=0.5")
  with pytest.raises(ValueError, match="eviction selects tokens per layer"):
    metrics.kv_token_bytes(CFG, "snapkv:ratio=0.5", 64)


def test_hf_import_and_export_refuse_sharing(tmp_path):
  from lctx.checkpoint import hf_config_dict, params_from_tensors, to_hf_state_dict
  with pytest.raises(ValueError, match="kv_share_every=2.*K/V projections in every layer"):
    to_hf_state_dict(CFG, PARAMS)

  class Tensors:  # never reached: the config is refused first
    def names(self):
      raise AssertionError

  with pytest.raises(ValueError, match="cannot import HF/GGUF weights.*kv_share_every=2"):
    params_from_tensors(CFG, Tensors())
  (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CFG)))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="kv_share_every=2"):
    lctx.load_hf_checkpoint(tmp_path)


def test_orbax_round_trip(tmp_path):
  path = lctx.save_params(tmp_path / "ckpt", lctx.unstack_layers(PARAMS))
  back = lctx.restore_params(path, CFG)
  assert jax.tree.structure(back) == jax.tree.structure(PARAMS)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="kv_layers"):
    lctx.restore_params(path, CFG.replace(kv_share_every=1))


# ---- costs ---------------------------------------------------------------------------

def test_analytic_costs():
  """Capacity and swap bytes and the K/V projections' FLOPs / s; a decode
  step still reads each cache layer once per layer of its group."""
  yi = ModelConfig.from_preset("yi-34b")  # 60 layers
  shared = yi.replace(kv_share_every=2)
  T = 50_000
  assert analytic.kv_bytes_per_user(shared, T, "bfloat16") * 2 == \
      analytic.kv_bytes_per_user(yi, T, "bfloat16")
  assert analytic.context_switch_seconds(shared, T, 25e9, "bfloat16") * 2 == \
      pytest.approx(analytic.context_switch_seconds(yi, T, 25e9, "bfloat16"))
  D, K, H = yi.hidden_size, yi.num_kv_heads, yi.head_dim
  assert analytic.layer_matmul_params(yi) - analytic.layer_matmul_params(shared) == 30 * 2 * D * K * H
  assert (analytic.prefill_flops(yi, T) - analytic.prefill_flops(shared, T)
          == 2 * 30 * 2 * D * K * H * T)  # attention's FLOPs are unchanged
  # Decode reads the same KV bytes (L layers' reads), fewer weight bytes.
  kv_read = lambda c: (analytic.decode_step_bytes(c, 1, T, "bfloat16")
                       - analytic.weight_bytes(c, "bfloat16") + (c.vocab_size - 1) * D * 2)
  assert kv_read(shared) == pytest.approx(kv_read(yi))
  assert analytic.kv_reads(shared) == 2 and analytic.kv_reads(yi) == 1
  hw = load_hardware("a100-80g-sxm")
  assert analytic.concurrency(shared, T, hw, 8, "bfloat16").users > \
      analytic.concurrency(yi, T, hw, 8, "bfloat16").users


def test_compiled_costs_of_a_shared_model():
  """The compiled programs' cache is L / s layers; the decode step's bytes
  still read every layer's (shared) cache."""
  config = ModelConfig.from_preset("small")
  shared = config.replace(kv_share_every=2)
  hw = load_hardware("a100-80g-sxm")
  rows = {c.kv_share_every: metrics.from_hlo(c, hw, "model:1", 4096, 1, prefill_chunk=0)
          for c in (config, shared)}
  assert rows[2].kv_bytes_per_user_total * 2 == rows[1].kv_bytes_per_user_total
  assert rows[2].weight_bytes_per_device < rows[1].weight_bytes_per_device
  assert rows[2].prefill_flops_per_device < rows[1].prefill_flops_per_device
  assert rows[2].context_switch_s == pytest.approx(rows[1].context_switch_s / 2, rel=0.01)
  # KV read per step: the decode bytes beyond the weights are within a few % of s = 1's.
  kv = {s: r.decode_bytes_per_device - r.weight_bytes_per_device for s, r in rows.items()}
  assert kv[2] == pytest.approx(kv[1], rel=0.1)


def test_peak_analysis_runs_on_a_config_json(tmp_path):
  from lctx.checkpoint import hf_config_dict
  path = tmp_path / "config.json"
  path.write_text(json.dumps(hf_config_dict(ModelConfig.from_preset("small").replace(
      kv_share_every=2))))
  out = tmp_path / "rows.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.peak_analysis", f"--model={path}",
                         "--contexts=4096", "--num_devices=1", f"--json_out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  by = {r["source"]: r for r in rows}
  small = ModelConfig.from_preset("small")
  assert by["analytic"]["kv_bytes_per_user_total"] == 4096 * small.kv_bytes_per_token(
      "bfloat16") / 2
  assert by["hlo"]["kv_bytes_per_user_total"] == by["analytic"]["kv_bytes_per_user_total"]
