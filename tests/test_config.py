import json
import os

import pytest

from lctx import ModelConfig
from lctx.config import RopeScaling, list_presets

PRESETS = ["tiny", "small", "llama-2-7b", "llama-3.1-8b", "mistral-7b", "yi-6b", "yi-34b",
           "llama-3.1-70b", "llama-3.2-1b", "qwen2.5-7b", "qwen3-4b", "mistral-small-24b"]


def test_all_presets_present_and_valid():
  assert set(PRESETS) <= set(list_presets())
  for name in PRESETS:
    ModelConfig.from_preset(name)


def test_presets_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert ModelConfig.from_preset("tiny").num_heads == 8


@pytest.mark.parametrize("name,expected", [
    # Published parameter counts of the real checkpoints.
    ("llama-2-7b", 6_738_415_616),
    ("llama-3.1-8b", 8_030_261_248),
    ("llama-3.1-70b", 70_553_706_496),
    ("llama-3.2-1b", 1_235_814_400),  # tied embeddings: one 128256 x 2048 table
    # FRAMEWORK.md: 60 layers x 557,856,768 + 2 x 64000 x 7168 + final norm.
    ("yi-34b", 60 * 557_856_768 + 2 * 64000 * 7168 + 7168),
])
def test_parameter_counts(name, expected):
  assert ModelConfig.from_preset(name).num_params == expected


def test_small_is_about_100m():
  assert 90e6 < ModelConfig.from_preset("small").num_params < 130e6


def test_kv_bytes_per_token():
  yi = ModelConfig.from_preset("yi-34b")
  assert yi.kv_bytes_per_token("bfloat16") == 2 * 60 * 8 * 128 * 2 == 245_760  # T1
  mha = yi.replace(num_kv_heads=56)
  assert mha.kv_bytes_per_token("bfloat16") == 1_720_320  # T15
  assert yi.kv_bytes_per_token("float32") == 2 * 245_760


def test_tiny_shape():
  tiny = ModelConfig.from_preset("tiny")
  assert (tiny.num_heads, tiny.num_kv_heads, tiny.group_size) == (8, 2, 4)


def test_llama3_rope_parsed_from_preset():
  rs = ModelConfig.from_preset("llama-3.1-8b").rope_scaling
  assert rs == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  small = ModelConfig.from_preset("llama-3.2-1b")
  assert small.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
  assert (small.head_dim, small.rope_theta, small.max_position_embeddings) == (64, 500000.0, 131072)


def _write(tmp_path, cfg):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(cfg))
  return path


BASE = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)


def test_rope_parameters_layout_equals_classic_layout(tmp_path):
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64)
  classic = dict(BASE, rope_theta=5e5, rope_scaling=dict(scaling, rope_type="llama3"))
  new = dict(BASE, rope_parameters=dict(scaling, rope_type="llama3", rope_theta=5e5))
  a = ModelConfig.from_hf_dict(classic)
  b = ModelConfig.from_hf_dict(new)
  assert a == b and a.rope_theta == 5e5 and a.rope_scaling.rope_type == "llama3"
  # An old-style "type" key works as well, and a directory holding config.json too.
  _write(tmp_path, dict(BASE, rope_scaling=dict(type="linear", factor=2.0)))
  assert ModelConfig.from_hf_config(tmp_path).rope_scaling == RopeScaling("linear", 2.0)


@pytest.mark.parametrize("change,words", [
    (dict(num_attention_heads=4, num_key_value_heads=3), ["num_heads", "num_kv_heads", "[1, 2, 4]"]),
    (dict(head_dim=7), ["head_dim", "even"]),  # head_dim != hidden / heads is fine (see
    (dict(num_key_value_heads=0), ["num_key_value_heads", "positive"]),  # test_architectures)
    (dict(intermediate_size=0), ["intermediate_size", "positive"]),
    (dict(num_hidden_layers=-1), ["num_layers", "positive"]),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), ["yarn", "llama3", "linear"]),
    (dict(rms_norm_eps=0.0), ["rms_norm_eps"]),
    (dict(mlp_bias=True), ["mlp_bias"]),  # attention_bias is modelled now
    (dict(hidden_act="gelu"), ["hidden_act", "silu"]),
    (dict(sliding_window=4096), ["sliding_window"]),
])
def test_invalid_configs_raise(change, words):
  with pytest.raises(ValueError) as err:
    ModelConfig.from_hf_dict(dict(BASE, **change))
  for word in words:
    assert word in str(err.value)


def test_missing_field_and_unknown_names():
  with pytest.raises(ValueError, match="num_hidden_layers"):
    ModelConfig.from_hf_dict({k: v for k, v in BASE.items() if k != "num_hidden_layers"})
  with pytest.raises(ValueError, match="yi-34b"):  # lists the valid presets
    ModelConfig.from_preset("nope")
  with pytest.raises(ValueError, match="dtype"):
    ModelConfig.from_preset("tiny", dtype="float64")
  with pytest.raises(ValueError, match="presets"):
    ModelConfig.resolve("not-a-preset-or-path")


def test_config_is_hashable_and_frozen():
  cfg = ModelConfig.from_preset("tiny")
  assert hash(cfg) == hash(ModelConfig.from_preset("tiny"))
  with pytest.raises(Exception):
    cfg.num_layers = 3
