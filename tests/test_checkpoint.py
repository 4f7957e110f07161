"""HF safetensors import (parity with transformers) and orbax save/restore."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import importorskip

import lctx
from lctx.checkpoint import load_hf_checkpoint, restore_params, save_params
from lctx.config import ModelConfig, RopeScaling
from lctx.model.params import abstract_params, unstack_layers
from lctx.model.transformer import forward

# Skipped when missing, except in CI (CI set), where the test extras are required.
torch = importorskip("torch")
transformers = importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _hf_model(seed=0, *, heads=8, kv_heads=2, tie=False, rope=None, theta=10000.0,
              dtype=torch.float32):
  rope_parameters = {"rope_type": "default", "rope_theta": theta, **(rope or {})}
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
      rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_parameters=rope_parameters)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # norms away from 1 so a wrong norm mapping shows
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  return model.to(dtype)


def _save(model, path, **kwargs):
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  return path


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
  """Tiny fp32 GQA checkpoint, sharded (index json) to exercise multi-file loads."""
  model = _hf_model(0)
  path = _save(model, tmp_path_factory.mktemp("gqa"), max_shard_size="50KB")
  return model, path


def _parity(model, path, T):
  config, params = load_hf_checkpoint(path)
  tokens = np.random.default_rng(0).integers(0, 256, size=(2, T))
  ours = np.asarray(forward(config, params, jnp.asarray(tokens)))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.float().numpy()
  assert ours.shape == ref.shape == (2, T, 256)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  return config, params, tokens, ref


# ---- parity with transformers ---------------------------------------------------------

def test_parity_gqa_sharded(gqa_dir):
  model, path = gqa_dir
  assert (path / "model.safetensors.index.json").is_file()
  assert len(list(path.glob("*.safetensors"))) > 1
  config, params, _, _ = _parity(model, path, 17)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 2, 8)
  assert params["embed"].dtype == jnp.float32 and "lm_head" in params


def test_parity_mha_tied(tmp_path):
  model = _hf_model(1, heads=4, kv_heads=4, tie=True)
  _save(model, tmp_path)
  config, params, _, _ = _parity(model, tmp_path, 17)
  assert config.tie_word_embeddings and "lm_head" not in params


def test_parity_llama3_rope(tmp_path):
  model = _hf_model(2, heads=4, kv_heads=2, rope=LLAMA3_ROPE, theta=50000.0)
  _save(model, tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  # transformers 5.x writes `rope_parameters` (theta inside); older versions
  # wrote top-level rope_theta + rope_scaling. Both must parse.
  assert "rope_parameters" in hf or "rope_scaling" in hf
  config, params, tokens, ref = _parity(model, tmp_path, 40)
  assert config.rope_theta == 50000.0
  assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
  # The scaling is active at these positions: without it the logits differ.
  plain = config.replace(rope_scaling=RopeScaling())
  off = np.asarray(forward(plain, params, jnp.asarray(tokens)))
  assert np.abs(off - ref).max() > 1e-3


def test_classic_rope_layout_parses_the_same(tmp_path):
  model = _hf_model(2, heads=4, kv_heads=2, rope=LLAMA3_ROPE, theta=50000.0)
  _save(model, tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  params = dict(hf.pop("rope_parameters", None) or {})
  classic = {**hf, "rope_theta": params.pop("rope_theta", hf.get("rope_theta")),
             "rope_scaling": {**(hf.get("rope_scaling") or {}), **params}}
  assert classic["rope_scaling"]["rope_type"] == "llama3"
  assert (ModelConfig.from_hf_dict(classic, name="x")
          == ModelConfig.from_hf_config(tmp_path, name="x"))
  # And the hand-written classic form of a Llama 3.1 config.
  handmade = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "rms_norm_eps",
                                 "max_position_embeddings", "tie_word_embeddings")}
  handmade.update(rope_theta=50000.0, rope_scaling=dict(LLAMA3_ROPE))
  assert (ModelConfig.from_hf_dict(handmade, name="x")
          == ModelConfig.from_hf_config(tmp_path, name="x"))


# ---- dtypes ---------------------------------------------------------------------------------

def _bits(x):
  return np.asarray(x).view(np.uint16)


def test_bf16_checkpoint_bitwise(tmp_path):
  model = _hf_model(3, dtype=torch.bfloat16)
  _save(model, tmp_path)
  config, params = load_hf_checkpoint(tmp_path, param_dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  sd = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        for k, v in model.state_dict().items()}
  D, N, K, H = 64, 8, 2, 8
  assert np.array_equal(_bits(params["embed"]), _bits(sd["model.embed_tokens.weight"]))
  assert np.array_equal(_bits(params["lm_head"]), _bits(sd["lm_head.weight"].T))
  assert np.array_equal(_bits(params["final_norm"]), _bits(sd["model.norm.weight"]))
  want = {"attn_norm": lambda p: sd[p + "input_layernorm.weight"],
          "w_q": lambda p: sd[p + "self_attn.q_proj.weight"].T.reshape(D, N, H),
          "w_k": lambda p: sd[p + "self_attn.k_proj.weight"].T.reshape(D, K, H),
          "w_v": lambda p: sd[p + "self_attn.v_proj.weight"].T.reshape(D, K, H),
          "w_o": lambda p: sd[p + "self_attn.o_proj.weight"].T.reshape(N, H, D),
          "mlp_norm": lambda p: sd[p + "post_attention_layernorm.weight"],
          "w_gate": lambda p: sd[p + "mlp.gate_proj.weight"].T,
          "w_up": lambda p: sd[p + "mlp.up_proj.weight"].T,
          "w_down": lambda p: sd[p + "mlp.down_proj.weight"].T}
  for leaf, get in want.items():
    for l in range(2):
      got = _bits(params["layers"][leaf][l])
      assert np.array_equal(got, _bits(get(f"model.layers.{l}."))), (leaf, l)
  # Default param dtype upcasts exactly.
  _, p32 = load_hf_checkpoint(tmp_path)
  assert p32["embed"].dtype == jnp.float32
  assert np.array_equal(np.asarray(p32["embed"]),
                        np.asarray(params["embed"]).astype(np.float32))


# ---- errors ---------------------------------------------------------------------------------

def _single_file_copy(src, dst, drop=(), add=None, rename=None):
  """Rewrites a (possibly sharded) checkpoint as one model.safetensors."""
  tensors = {}
  for f in sorted(src.glob("*.safetensors")):
    tensors.update(safetensors.numpy.load_file(f))
  for name in drop:
    del tensors[name]
  tensors.update(add or {})
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  safetensors.numpy.save_file(tensors, dst / "model.safetensors")
  return dst


def test_shape_mismatch_names_tensor(gqa_dir, tmp_path):
  _, src = gqa_dir
  shutil.copytree(src, tmp_path / "ck")
  cfg_path = tmp_path / "ck" / "config.json"
  hf = json.loads(cfg_path.read_text())
  hf["intermediate_size"] = 96
  cfg_path.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight") as e:
    load_hf_checkpoint(tmp_path / "ck")
  assert "(128, 64)" in str(e.value) and "(96, 64)" in str(e.value)


def test_missing_tensor(gqa_dir, tmp_path):
  _, src = gqa_dir
  ck = _single_file_copy(src, tmp_path / "ck", drop=["model.layers.1.self_attn.v_proj.weight"])
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
    load_hf_checkpoint(ck)
  # Untied model without its head.
  ck = _single_file_copy(src, tmp_path / "nohead", drop=["lm_head.weight"])
  with pytest.raises(ValueError, match=r"lm_head\.weight"):
    load_hf_checkpoint(ck)


def test_missing_tensor_in_shard_names_file(gqa_dir, tmp_path):
  _, src = gqa_dir
  shutil.copytree(src, tmp_path / "ck")
  index_path = tmp_path / "ck" / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  wrong = index["weight_map"]["model.embed_tokens.weight"]
  index["weight_map"]["model.norm.weight"] = wrong
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=rf"model\.norm\.weight.*{wrong}"):
    load_hf_checkpoint(tmp_path / "ck")


def test_extra_tensors(gqa_dir, tmp_path):
  _, src = gqa_dir
  harmless = {"model.rotary_emb.inv_freq": np.ones(4, np.float32)}
  ck = _single_file_copy(src, tmp_path / "ok", add=harmless)
  load_hf_checkpoint(ck)
  extra = {**harmless, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
  ck = _single_file_copy(src, tmp_path / "bad", add=extra)
  with pytest.raises(ValueError, match=r"q_proj\.bias"):
    load_hf_checkpoint(ck)


def test_tied_checkpoint_with_head_copy(gqa_dir, tmp_path):
  """A tied config with an lm_head.weight is accepted only if it equals the embedding."""
  _, src = gqa_dir
  embed = safetensors.numpy.load_file(
      src / json.loads((src / "model.safetensors.index.json").read_text())
      ["weight_map"]["model.embed_tokens.weight"])["model.embed_tokens.weight"]
  for name, head in (("same", embed), ("differs", embed + 1)):
    ck = _single_file_copy(src, tmp_path / name, drop=["lm_head.weight"],
                           add={"lm_head.weight": head})
    hf = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    if name == "same":
      config, params = load_hf_checkpoint(ck)
      assert config.tie_word_embeddings and "lm_head" not in params
    else:
      with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf_checkpoint(ck)


# ---- orbax ----------------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8)


def _random_params(config, seed):
  """Random params in the canonical layout (numpy: init_params compiles for seconds)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)),
                      abstract_params(config))


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(tmp_path, param_dtype):
  config = TINY.replace(param_dtype=param_dtype)
  params = _random_params(config, seed=1)
  save_params(tmp_path / "ck", params)
  _assert_bitwise(restore_params(tmp_path / "ck", config), params)
  _assert_bitwise(restore_params(tmp_path / "ck"), params)


def test_orbax_unrolled_saves_stacked(tmp_path, monkeypatch):
  config = TINY.replace(tie_word_embeddings=True)
  params = _random_params(config, seed=2)
  monkeypatch.chdir(tmp_path)  # relative paths are resolved
  save_params("ck", unstack_layers(params))
  _assert_bitwise(restore_params(tmp_path / "ck", config), params)


def test_orbax_overwrite_and_mismatch(tmp_path):
  params = _random_params(TINY, seed=3)
  save_params(tmp_path / "ck", params)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_params(tmp_path / "ck", params)
  other = _random_params(TINY, seed=4)
  save_params(tmp_path / "ck", other, overwrite=True)
  _assert_bitwise(restore_params(tmp_path / "ck", TINY), other)
  with pytest.raises(ValueError, match="float32"):  # no silent cast
    restore_params(tmp_path / "ck", TINY.replace(param_dtype="bfloat16"))
  with pytest.raises(ValueError, match="w_gate"):
    restore_params(tmp_path / "ck", TINY.replace(intermediate_size=64))


def test_export_to_hf_round_trips(tmp_path):
  """to_hf_state_dict + hf_config_dict is the inverse of load_hf_checkpoint."""
  from safetensors.numpy import save_file
  from lctx.checkpoint import hf_config_dict, to_hf_state_dict
  for name, overrides in (("tiny", {}), ("tiny", dict(tie_word_embeddings=True))):
    cfg = ModelConfig.from_preset(name, **overrides)
    params = lctx.init_params(cfg, seed=3)
    out = tmp_path / f"{name}{len(overrides)}"
    out.mkdir()
    save_file(to_hf_state_dict(cfg, lctx.unstack_layers(params)), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    loaded_cfg, loaded = load_hf_checkpoint(out)
    assert loaded_cfg.replace(name=cfg.name) == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
      np.testing.assert_array_equal(a, b)
