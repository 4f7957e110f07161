"""Architectures beyond plain Llama: Qwen2's q/k/v biases, Qwen3's q/k norm,
Llama's attention_bias and an explicit head_dim (N * H != D), each against
transformers on tiny random checkpoints; and every config lctx refuses, by
the key that makes it refuse."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import importorskip

import lctx
from lctx import engine, sharding
from lctx.cache import abstract_cache
from lctx.checkpoint import hf_config_dict, load_hf_checkpoint, to_hf_state_dict
from lctx.config import MODEL_TYPES, ModelConfig
from lctx.cost import analytic as an
from lctx.model import transformer
from lctx.model.params import layer_shapes, param_logical_axes

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6)

# name -> (transformers config class, model class, extra config fields,
#          (qkv_bias, o_bias, qk_norm, head_dim) lctx must read)
HF_MODELS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, (True, False, False, 16)),
    "qwen3_head_dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32),
                       (False, False, True, 32)),
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, attention_bias=True),
                   (True, True, True, 16)),
    "llama_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=32),
                       (False, False, False, 32)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True),
                   (True, True, False, 16)),
}


def _hf_model(name, seed=0):
  torch, transformers = importorskip("torch"), importorskip("transformers")
  cfg_cls, model_cls, extra, _ = HF_MODELS[name]
  cfg = getattr(transformers, cfg_cls)(**TINY, **extra)
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():  # biases off zero and norms off one, so a wrong mapping shows
    for pname, p in model.named_parameters():
      if pname.endswith("bias"):
        p.copy_(0.5 * torch.randn_like(p))
      elif pname.endswith("norm.weight"):
        p.add_(0.3 * torch.randn_like(p))
  return model


def _logits(model, tokens):
  torch = importorskip("torch")
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_parity_with_transformers(name, tmp_path):
  """Load, forward, num_params, decode and export, against transformers' own model."""
  transformers = importorskip("transformers")
  model = _hf_model(name)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  config, params = load_hf_checkpoint(tmp_path / "hf")
  qkv_bias, o_bias, qk_norm, head_dim = HF_MODELS[name][3]
  assert (config.qkv_bias, config.o_bias, config.qk_norm, config.head_dim) == (
      qkv_bias, o_bias, qk_norm, head_dim)
  assert config.num_params == sum(p.numel() for p in model.parameters())
  assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params

  tokens = np.random.default_rng(0).integers(0, 256, size=(2, 13))
  ref = _logits(model, tokens)
  ours = np.asarray(lctx.forward(config, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

  # The cached path (prefill, then one decode step) in both layer layouts, for
  # the model with every optional leaf (the others share its code).
  for layout in (params, lctx.unstack_layers(params)) if name == "qwen3_bias" else ():
    cache = engine.new_cache(config, layout, 2, 16)
    last, cache = lctx.prefill(config, layout, tokens[:, :-1], cache)
    np.testing.assert_allclose(last, ref[:, -2], atol=1e-4, rtol=0)
    step, _ = lctx.decode_step(config, layout, tokens[:, -1], cache)
    np.testing.assert_allclose(step, ref[:, -1], atol=1e-4, rtol=0)

  # Export: lctx's params as an HF checkpoint that transformers reads back.
  out = tmp_path / "export"
  out.mkdir()
  import safetensors.numpy
  safetensors.numpy.save_file(to_hf_state_dict(config, lctx.unstack_layers(params)),
                              str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps(hf_config_dict(config)))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(reloaded).__name__ == HF_MODELS[name][1]
  np.testing.assert_allclose(_logits(reloaded, tokens), ref, atol=1e-5, rtol=0)
  again, params_again = load_hf_checkpoint(out)
  assert again.replace(name=config.name) == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again)):
    np.testing.assert_array_equal(a, b)


def test_new_leaves_in_both_layouts_and_abstract_params():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, o_bias=True,
                    qk_norm=True)
  shapes = layer_shapes(cfg)
  assert (shapes["b_q"], shapes["b_k"], shapes["b_v"], shapes["b_o"], shapes["q_norm"],
          shapes["k_norm"]) == ((4, 16), (2, 16), (2, 16), (32,), (16,), (16,))
  assert shapes["w_q"] == (32, 4, 16) and shapes["w_o"] == (4, 16, 32)
  abstract = lctx.abstract_params(cfg)
  assert {k: v.shape[1:] for k, v in abstract["layers"].items()} == shapes
  params = lctx.init_params(cfg, seed=0)
  assert np.all(np.asarray(params["layers"]["q_norm"]) == 1)
  assert np.abs(np.asarray(params["layers"]["b_q"])).max() > 0
  unrolled = lctx.unstack_layers(params)
  assert set(unrolled["layers"][1]) == set(shapes)
  axes = param_logical_axes(cfg)["layers"]
  assert axes["b_q"] == ("layers", "heads", "head_dim")
  assert axes["b_k"] == axes["b_v"] == ("layers", "kv_heads", "head_dim")
  assert axes["b_o"] == ("layers", "embed")
  assert axes["q_norm"] == axes["k_norm"] == ("layers", "head_dim")
  # A plain Llama config has none of them.
  plain = cfg.replace(qkv_bias=False, o_bias=False, qk_norm=False)
  assert set(layer_shapes(plain)) == {"attn_norm", "w_q", "w_k", "w_v", "w_o", "mlp_norm",
                                      "w_gate", "w_up", "w_down"}
  assert set(param_logical_axes(plain)["layers"]) == set(layer_shapes(plain))
  assert cfg.num_params - plain.num_params == 2 * (4 * 16 + 2 * 2 * 16 + 32 + 2 * 16)
  # Biases and norm weights are elementwise work: no FLOPs in the closed form.
  assert an.prefill_flops(cfg, 100) == an.prefill_flops(plain, 100)
  assert an.weight_bytes(cfg) - an.weight_bytes(plain) == 4 * (cfg.num_params - plain.num_params)


QWEN3_TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=8, num_kv_heads=2, head_dim=16, qkv_bias=True, o_bias=True,
                         qk_norm=True, name="qwen3-tiny")


def test_sharded_equals_unsharded_qwen3_like():
  """Biases sharded with their heads, norms replicated; N * H = 128 != D = 64."""
  cfg = QWEN3_TINY
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        lctx.abstract_params(cfg))
  params["layers"]["q_norm"] = 1 + params["layers"]["q_norm"]
  params["layers"]["k_norm"] = 1 + params["layers"]["k_norm"]
  plan = sharding.Plan(cfg, sharding.make_mesh("model:8"))
  # Both layouts get the new leaves' layouts: b_q one query head per device,
  # b_k / b_v one KV head (K = 2: each on 4 devices), b_o and the norms whole.
  for layout in (params, lctx.unstack_layers(params)):
    sharded = engine.shard_params(layout, plan)
    layer = sharded["layers"] if layout is params else sharded["layers"][1]
    lead = (cfg.num_layers,) if layout is params else ()
    per_device = {k: layer[k].sharding.shard_shape(layer[k].shape) for k in
                  ("b_q", "b_k", "b_v", "b_o", "q_norm", "k_norm")}
    assert per_device == {"b_q": (*lead, 1, 16), "b_k": (*lead, 1, 16), "b_v": (*lead, 1, 16),
                          "b_o": (*lead, 64), "q_norm": (*lead, 16), "k_norm": (*lead, 16)}
  tokens = rng.integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  lengths = np.array([8, 5])
  want, cache = lctx.prefill(cfg, params, tokens, engine.new_cache(cfg, params, 2, 16),
                             lengths=lengths)
  sharded = engine.shard_params(params, plan)
  got, sharded_cache = lctx.prefill(cfg, sharded, tokens,
                                    engine.new_cache(cfg, sharded, 2, 16, plan=plan),
                                    lengths=lengths, plan=plan)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  token = jnp.argmax(want, -1).astype(jnp.int32)
  want, _ = lctx.decode_step(cfg, params, token, cache)
  got, _ = lctx.decode_step(cfg, sharded, token, sharded_cache, plan=plan)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_compiled_prefill_costs_for_qwen3_head_dim():
  """Compile-only: qwen3-4b (head_dim 128, N * H = 4096 != D = 2560, q/k norm)."""
  from lctx.cost import metrics
  from lctx.model.transformer import PREFILL_BLOCK
  cfg = ModelConfig.from_preset("qwen3-4b", param_dtype="bfloat16", dtype="bfloat16")
  assert cfg.num_heads * cfg.head_dim != cfg.hidden_size
  T = 4096
  costs = metrics.program_costs(cfg, "model:1", T, 1, "prefill")
  nb = -(-T // PREFILL_BLOCK)  # the blocked kernel's surplus over the causal pairs
  surplus = (4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
             * (PREFILL_BLOCK ** 2 * nb * (nb + 1) // 2 - T * (T + 1) // 2))
  exact = an.prefill_flops(cfg, T)
  assert exact < costs.flops
  assert exact + surplus == pytest.approx(costs.flops, rel=0.015)
  # Every weight is read at least once.
  assert costs.bytes_ideal > cfg.param_bytes()


# ---- configs: what is accepted ------------------------------------------------------------

DROP = object()  # a field to leave out of the config


def _cfg(**fields):
  return {k: v for k, v in {**TINY, **fields}.items() if v is not DROP}


MISTRAL_SMALL_24B = dict(model_type="mistral", vocab_size=131072, hidden_size=5120,
                         intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rope_theta=1e8,
                         sliding_window=None, rms_norm_eps=1e-5)


def test_head_dim_not_hidden_over_heads_is_accepted():
  llama = ModelConfig.from_hf_dict(_cfg(num_attention_heads=4, head_dim=32))
  assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 32)
  small = ModelConfig.from_hf_dict(MISTRAL_SMALL_24B)
  assert small.kv_bytes_per_token("bfloat16") == 2 * 40 * 8 * 128 * 2 == 163_840
  assert an.kv_bytes_per_token(small, "bfloat16") == 163_840
  assert small.num_params == 23_572_403_200  # published: 23.6B
  assert ModelConfig.from_preset("mistral-small-24b") == small.replace(
      name="mistral-small-24b", max_position_embeddings=32768)
  nemo = ModelConfig.from_hf_dict(dict(MISTRAL_SMALL_24B, intermediate_size=14336,
                                       vocab_size=131072, rope_theta=1e6))
  assert nemo.head_dim * nemo.num_heads == 4096 != nemo.hidden_size
  # The layers' matrices count N * H, not D.
  D, N, K, H, F = 5120, 32, 8, 128, 32768
  assert an.layer_matmul_params(small) == 40 * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
  # Compile-only decode step from abstract shapes: the w_o reshape takes N * H != D.
  params, cache = lctx.abstract_params(small), abstract_cache(small, 1, 64)
  out = jax.eval_shape(lambda p, c: transformer.decode(
      small, p, jnp.zeros((1,), jnp.int32), c), params, cache)
  assert out[0].shape == (1, 131072)


@pytest.mark.parametrize("preset,params,flags", [
    ("qwen3-4b", 4_022_468_096, (False, False, True)),  # published: 4.02B (tied)
    ("qwen2.5-7b", 7_615_616_512, (True, False, False)),  # published: 7.61B
    ("mistral-small-24b", 23_572_403_200, (False, False, False)),
])
def test_presets(preset, params, flags):
  cfg = ModelConfig.from_preset(preset)
  assert cfg.num_params == params
  assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == flags


def test_model_type_features_and_defaults():
  qwen2 = ModelConfig.from_hf_dict(_cfg(model_type="qwen2", sliding_window=131072,
                                        use_sliding_window=False, max_window_layers=28))
  assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
  qwen3 = ModelConfig.from_hf_dict({k: v for k, v in _cfg(model_type="qwen3").items()})
  assert (qwen3.qkv_bias, qwen3.o_bias, qwen3.qk_norm) == (False, False, True)
  assert qwen3.head_dim == 128  # Qwen3Config's default, not hidden / heads
  assert ModelConfig.from_hf_dict(_cfg(model_type="qwen3", attention_bias=True)).o_bias
  llama = ModelConfig.from_hf_dict(_cfg(model_type="llama", attention_bias=True))
  assert (llama.qkv_bias, llama.o_bias, llama.qk_norm) == (True, True, False)
  mistral = ModelConfig.from_hf_dict(_cfg(model_type="mistral", sliding_window=None))
  assert (mistral.qkv_bias, mistral.o_bias, mistral.head_dim) == (False, False, 16)
  internlm = ModelConfig.from_hf_dict(_cfg(model_type="internlm", num_key_value_heads=4,
                                           rotary={"type": "origin", "base": 50000}))
  assert (internlm.qkv_bias, internlm.o_bias, internlm.rope_theta) == (True, True, 50000.0)
  assert not ModelConfig.from_hf_dict(_cfg(model_type="internlm", bias=False,
                                           num_key_value_heads=4,
                                           rotary={"type": "origin"})).qkv_bias
  # Absent fields take transformers' defaults; null means absent where HF reads it so.
  bare = {k: v for k, v in TINY.items() if k not in ("rms_norm_eps", "num_key_value_heads",
                                                     "max_position_embeddings")}
  plain = ModelConfig.from_hf_dict(bare)
  assert (plain.rms_norm_eps, plain.num_kv_heads, plain.max_position_embeddings) == (1e-6, 4,
                                                                                     2048)
  assert ModelConfig.from_hf_dict(dict(bare, num_key_value_heads=None)).num_kv_heads == 4
  assert ModelConfig.from_hf_dict(dict(bare, model_type="qwen2", num_key_value_heads=2)
                                 ).max_position_embeddings == 32768
  # An absent num_key_value_heads is transformers' default for the type: N for
  # llama (above), 8 for mistral, 32 for qwen2 and qwen3 (an error when it does
  # not divide the heads), never silently MHA.
  wide = dict(bare, num_attention_heads=64, hidden_size=1024)
  assert ModelConfig.from_hf_dict(dict(wide, model_type="mistral", sliding_window=None)
                                 ).num_kv_heads == 8
  assert ModelConfig.from_hf_dict(dict(wide, model_type="qwen2")).num_kv_heads == 32
  with pytest.raises(ValueError, match="no num_key_value_heads; transformers' default for qwen3 "
                                       "is 32, which does not divide num_attention_heads"):
    ModelConfig.from_hf_dict(dict(bare, model_type="qwen3"))


def test_rope_parameters_and_rope_scaling_must_agree():
  both = _cfg(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              rope_scaling={"rope_type": "linear", "factor": 4.0})
  with pytest.raises(ValueError, match="rope_parameters=.* and rope_scaling=.* disagree"):
    ModelConfig.from_hf_dict(both)
  same = _cfg(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
              rope_scaling={"rope_type": "linear", "factor": 4.0})
  assert ModelConfig.from_hf_dict(same).rope_scaling.factor == 4.0
  # Neutral values of unmodelled keys are accepted.
  ModelConfig.from_hf_dict(_cfg(model_type="llama", partial_rotary_factor=1.0, logit_scale=None,
                                mlp_bias=False, use_qk_norm=False, num_local_experts=None))


def test_mixtral_sized_config_is_refused_not_counted_dense():
  mixtral = _cfg(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                 sliding_window=None, rope_theta=1e6)
  for cfg in (mixtral, {k: v for k, v in mixtral.items() if k != "model_type"},
              dict(mixtral, model_type="llama")):
    with pytest.raises(ValueError) as err:
      ModelConfig.from_hf_dict(cfg)
    assert "num_local_experts=8" in str(err.value) and "num_experts_per_tok=2" in str(err.value)
    assert "mixture of experts" in str(err.value)
  with pytest.raises(ValueError, match=r"model_type='mixtral'"):
    ModelConfig.from_hf_dict(mixtral)


@pytest.mark.parametrize("change,words", [
    # DeepSeek-MoE-16B
    (dict(model_type="deepseek", n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
          moe_intermediate_size=1408, first_k_dense_replace=1, moe_layer_freq=1),
     ["model_type='deepseek'", "n_routed_experts=64", "n_shared_experts=2",
      "moe_intermediate_size=1408", *MODEL_TYPES]),
    # Command-R (Cohere): LayerNorm, parallel block, logit_scale, tied by default
    (dict(model_type="cohere", layer_norm_eps=1e-5, rms_norm_eps=DROP, logit_scale=0.0625,
          use_qk_norm=False),
     ["model_type='cohere'", "logit_scale=0.0625", "layer_norm_eps", "LayerNorm"]),
    (dict(logit_scale=0.0625), ["logit_scale"]),
    (dict(model_type="llama", use_qk_norm=True), ["use_qk_norm"]),
    (dict(model_type="llama", parallel_attn=True), ["parallel_attn"]),
    (dict(model_type="llama", use_parallel_residual=True), ["use_parallel_residual"]),
    (dict(model_type="llama", layer_norm_eps=1e-5, rms_norm_eps=None), ["rms_norm_eps"]),
    (dict(rms_norm_eps=DROP, layer_norm_eps=1e-5), ["layer_norm_eps", "RMSNorm"]),
    # MiniCPM
    (dict(model_type="minicpm", scale_emb=12, scale_depth=1.4, dim_model_base=256),
     ["model_type='minicpm'", "scale_emb=12", "scale_depth=1.4", "dim_model_base=256"]),
    (dict(model_type="llama", scale_depth=1.4), ["scale_depth"]),
    (dict(model_type="llama", partial_rotary_factor=0.5), ["partial_rotary_factor=0.5"]),
    (dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.25}),
     ["partial_rotary_factor=0.25"]),
    (dict(num_key_value_heads=0), ["num_key_value_heads=0", "positive", "[1, 2, 4]"]),
    (dict(num_key_value_heads=-2), ["num_key_value_heads=-2"]),
    (dict(num_key_value_heads=2.0), ["num_key_value_heads=2.0"]),
    (dict(model_type="gpt2"), ["model_type='gpt2'", *MODEL_TYPES]),
    (dict(model_type="Yi"), ["model_type='Yi'", "ln1"]),
    (dict(model_type="internlm2"), ["model_type='internlm2'"]),
    (dict(some_new_scale=2.0), ["some_new_scale", "model_type"]),
    (dict(architectures=["MixtralForCausalLM"]), ["architectures", "MixtralForCausalLM"]),
    (dict(model_type="mistral"), ["sliding_window", "4096"]),
    (dict(model_type="mistral", sliding_window=4096), ["sliding_window=4096"]),
    (dict(model_type="qwen2", sliding_window=4096, use_sliding_window=True), ["sliding_window"]),
    (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]),
     ["layer_types", "sliding_attention"]),
    (dict(model_type="qwen2", attention_bias=True), ["attention_bias", "qwen2"]),
    (dict(model_type="mistral", sliding_window=None, attention_bias=True), ["attention_bias"]),
    (dict(model_type="llama", bias=True), ["bias=true", "internlm"]),
    (dict(model_type="llama", mlp_bias=True), ["mlp_bias"]),
    (dict(model_type="internlm", num_key_value_heads=4), ["rotary", "dynamic", "origin"]),
    (dict(model_type="internlm", num_key_value_heads=4, rotary={"type": "dynamic", "base": 1e4}),
     ["rotary"]),
    (dict(model_type="internlm", num_key_value_heads=4, rotary={"type": "origin"},
          rope_theta=1e4), ["rope_theta", "rotary"]),
    (dict(model_type="internlm", rotary={"type": "origin"}), ["num_key_value_heads"]),
    (dict(model_type="qwen3", head_dim=None), ["head_dim=None"]),
    (dict(head_dim=0), ["head_dim=0"]),
    (dict(head_dim=7), ["head_dim", "even"]),
    (dict(tie_word_embeddings="yes"), ["tie_word_embeddings"]),
    (dict(rms_norm_eps=None), ["rms_norm_eps=None"]),
    (dict(max_position_embeddings=4096.0), ["max_position_embeddings"]),
    (dict(model_type="llama", quantization_config={"quant_method": "awq"}),
     ["quantization_config"]),
    (dict(model_type="qwen2", use_mrope=True), ["use_mrope"]),
    (dict(model_type="llama", final_logit_softcapping=30.0), ["final_logit_softcapping"]),
])
def test_refused_configs_name_the_key(change, words):
  with pytest.raises(ValueError) as err:
    ModelConfig.from_hf_dict(_cfg(**change))
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def test_every_config_path_refuses(tmp_path):
  """from_hf_config and resolve (hence peak_analysis, shard_sweep, bench_decode
  and generate) refuse what from_hf_dict refuses."""
  path = tmp_path / "config.json"
  path.write_text(json.dumps(_cfg(model_type="mixtral", num_local_experts=8,
                                  num_experts_per_tok=2, sliding_window=None)))
  for read in (ModelConfig.from_hf_config, lambda p: ModelConfig.resolve(str(p))):
    for p in (path, tmp_path):
      with pytest.raises(ValueError, match="num_local_experts"):
        read(p)
