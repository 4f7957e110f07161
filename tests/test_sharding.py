"""Sharded execution on 8 fake CPU devices equals the unsharded model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import engine, sharding
from lctx.cache import abstract_cache

CFG = lctx.ModelConfig.from_preset("tiny")  # N=8, K=2: model:8 exercises the beyond-K path
PARAMS = lctx.init_params(CFG, seed=0)
MESHES = ["model:8", "data:2,model:4", "seq:8", "data:2,seq:2,model:2"]
B, T, NEW, CAPACITY = 4, 16, 6, 24


def plan_for(spec, config=CFG):
  return sharding.Plan(config, sharding.make_mesh(spec))


def test_parse_mesh_spec():
  assert sharding.parse_mesh_spec("data:2,model:4") == {"data": 2, "seq": 1, "model": 4}
  assert sharding.parse_mesh_spec("seq:8") == {"data": 1, "seq": 8, "model": 1}
  for bad, word in (("tensor:2", "allowed"), ("model:0", "positive"), ("model:2,model:2", "twice"),
                    ("model", "positive")):
    with pytest.raises(ValueError, match=word):
      sharding.parse_mesh_spec(bad)


def test_mesh_larger_than_devices():
  with pytest.raises(ValueError, match="needs 16 devices but only 8"):
    sharding.make_mesh("data:2,model:8")


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_sharded_equals_unsharded(spec, layout):
  params = PARAMS if layout == "stacked" else lctx.unstack_layers(PARAMS)
  plan = plan_for(spec)
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  lengths = np.array([16, 9, 12, 5])

  want_logits, cache = lctx.prefill(CFG, params, tokens, engine.new_cache(CFG, params, B, CAPACITY),
                                    lengths=lengths)
  sharded_params = engine.shard_params(params, plan)
  sharded_cache = engine.new_cache(CFG, sharded_params, B, CAPACITY, plan=plan)
  in_sharding = jax.tree.map(lambda x: x.sharding, sharded_cache)
  got_logits, sharded_cache = lctx.prefill(CFG, sharded_params, tokens, sharded_cache,
                                           lengths=lengths, plan=plan)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  for _ in range(3):
    token = jnp.argmax(want_logits, -1).astype(jnp.int32)
    want_logits, cache = lctx.decode_step(CFG, params, token, cache)
    got_logits, sharded_cache = lctx.decode_step(CFG, sharded_params, token, sharded_cache,
                                                 plan=plan)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  # One cache layout from allocation through prefill and decode: no resharding.
  assert jax.tree.map(lambda x: x.sharding, sharded_cache) == in_sharding

  want = lctx.generate(CFG, params, tokens, lengths=lengths, max_new_tokens=NEW, capacity=CAPACITY)
  got = lctx.generate(CFG, params, tokens, lengths=lengths, max_new_tokens=NEW, capacity=CAPACITY,
                      plan=plan)
  np.testing.assert_array_equal(got, want)


def test_kv_heads_replicated_beyond_k_and_sharded_up_to_k():
  assert not plan_for("model:8").kv_heads_sharded  # K = 2 < 8
  cache = engine.new_cache(CFG, PARAMS, B, CAPACITY, plan=plan_for("model:8"))
  assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, None, None, None, None)
  two = plan_for("model:2")
  assert two.kv_heads_sharded
  cache = engine.new_cache(CFG, PARAMS, B, CAPACITY, plan=two)
  assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None, None)


def _collectives(hlo: str) -> list[tuple[str, str]]:
  return re.findall(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                    r"collective-permute)(?:-start)?\(", hlo)


def test_tensor_parallel_decode_collectives():
  """Megatron: one all-reduce of the [B, 1, D] activations after attention and
  one after the MLP, per layer, plus one for the embedding lookup in the
  vocab-sharded table; no all-gather (of parameters or anything else)."""
  cfg = CFG.replace(num_kv_heads=8)
  plan = plan_for("model:8", cfg)
  params = jax.eval_shape(lctx.unstack_layers, lctx.abstract_params(cfg))
  cache = abstract_cache(cfg, B, 64, stacked=False)
  step = engine.sharded_step("decode", plan, params, cache)
  hlo = step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32), cache).compile().as_text()
  found = _collectives(hlo)
  assert not [c for c in found if c[1] == "all-gather"], found
  activation_reduces = [c for c in found
                        if c[1] == "all-reduce" and c[0].startswith(f"f32[{B},1,{cfg.hidden_size}]")]
  assert len(activation_reduces) == 2 * cfg.num_layers + 1, found


def test_tensor_parallel_parameter_bytes_per_device():
  """yi-34b on model:8 from abstract shapes: each device holds about 1/8 of the weights."""
  cfg = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
  plan = plan_for("model:8", cfg)
  params = lctx.abstract_params(cfg)
  cache = abstract_cache(cfg, 1, 1024)
  step = engine.sharded_step("decode", plan, params, cache)
  mem = step.lower(params, jax.ShapeDtypeStruct((1,), jnp.int32), cache).compile().memory_analysis()
  cache_per_device = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 8
  param_per_device = mem.argument_size_in_bytes - cache_per_device
  assert param_per_device == pytest.approx(cfg.param_bytes() / 8, rel=0.05)


@pytest.mark.parametrize("spec,kwargs,words", [
    ("model:3", dict(batch=3, capacity=24), ["'model'", "num_heads", "8", "3"]),
    ("model:8", dict(batch=4, capacity=24), None),  # fine: K=2 < 8 is replicated, not an error
    ("data:2", dict(batch=3, capacity=24), ["'data'", "batch = 3"]),
    ("seq:8", dict(batch=4, capacity=20), ["'seq'", "capacity = 20"]),
])
def test_indivisible_axes_raise_before_compiling(spec, kwargs, words):
  plan = sharding.Plan(CFG, sharding.make_mesh(spec)) if spec != "model:3" else \
      sharding.Plan(CFG, sharding.make_mesh(spec, jax.devices()[:3]))
  if words is None:
    engine.new_cache(CFG, PARAMS, plan=plan, **kwargs)
    return
  with pytest.raises(ValueError) as err:
    engine.new_cache(CFG, PARAMS, plan=plan, **kwargs)
  for word in words:
    assert word in str(err.value)


def test_prompt_length_must_divide_seq():
  plan = plan_for("seq:8")
  cache = engine.new_cache(CFG, PARAMS, 4, 24, plan=plan)
  with pytest.raises(ValueError, match="prompt length = 12"):
    lctx.prefill(CFG, PARAMS, np.ones((4, 12), np.int32), cache, plan=plan)


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_sequence_parallel_decode_never_gathers_the_cache(layout):
  """seq:8 decode: per-shard partial softmaxes merged by all-reduces of [B, N, H]-sized
  values; no all-gather, all-to-all or permute (the cache stays where it is)."""
  plan = plan_for("seq:8")
  params = lctx.abstract_params(CFG)
  if layout == "unrolled":
    params = jax.eval_shape(lctx.unstack_layers, params)
  cache = abstract_cache(CFG, B, 1024, stacked=layout == "stacked")
  step = engine.sharded_step("decode", plan, params, cache)
  hlo = step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32), cache).compile().as_text()
  kinds = {kind for _, kind in _collectives(hlo)}
  assert kinds <= {"all-reduce"}, kinds
  assert "all-reduce" in hlo
  mem = step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32), cache).compile().memory_analysis()
  kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
  assert mem.alias_size_in_bytes >= kv_bytes / 8  # each device updates its slice in place
