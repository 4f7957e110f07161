"""Sharded execution on 8 fake CPU devices equals the unsharded model."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import engine, sharding
from lctx.cache import abstract_cache
from lctx.cost import hlo as hlo_cost

CFG = lctx.ModelConfig.from_preset("tiny")  # N=8, K=2: model:8 exercises the beyond-K path
PARAMS = lctx.init_params(CFG, seed=0)
MESHES = ["model:8", "data:2,model:4", "seq:8", "data:2,seq:2,model:2"]
B, T, NEW, CAPACITY = 4, 16, 6, 24


def plan_for(spec, config=CFG):
  return sharding.Plan(config, sharding.make_mesh(spec))


def _abstract(config, layout, capacity):
  """Abstract params and a B-row cache of `capacity` slots in the given layer layout."""
  params = lctx.abstract_params(config)
  if layout == "unrolled":
    params = jax.eval_shape(lctx.unstack_layers, params)
  return params, abstract_cache(config, B, capacity, stacked=layout == "stacked")


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


@pytest.mark.parametrize("spec,layout,kv_heads", [
    *((spec, layout, 2) for spec in MESHES for layout in ("stacked", "unrolled")),
    ("model:8", "stacked", 1), ("data:2,seq:2,model:2", "unrolled", 1),  # MQA: 1 KV head
    ("seq:2,model:4", "stacked", 1), ("model:8", "unrolled", 8)])
def test_sharded_equals_unsharded(spec, layout, kv_heads):
  cfg = CFG.replace(num_kv_heads=kv_heads)
  params = PARAMS if kv_heads == CFG.num_kv_heads else lctx.init_params(cfg, seed=0)
  params = params if layout == "stacked" else lctx.unstack_layers(params)
  plan = plan_for(spec, cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  lengths = np.array([16, 9, 12, 5])

  want_logits, cache = lctx.prefill(cfg, params, tokens, engine.new_cache(cfg, params, B, CAPACITY),
                                    lengths=lengths)
  sharded_params = engine.shard_params(params, plan)
  sharded_cache = engine.new_cache(cfg, sharded_params, B, CAPACITY, plan=plan)
  in_sharding = jax.tree.map(lambda x: x.sharding, sharded_cache)
  got_logits, sharded_cache = lctx.prefill(cfg, sharded_params, tokens, sharded_cache,
                                           lengths=lengths, plan=plan)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  for _ in range(3):
    token = jnp.argmax(want_logits, -1).astype(jnp.int32)
    want_logits, cache = lctx.decode_step(cfg, params, token, cache)
    got_logits, sharded_cache = lctx.decode_step(cfg, sharded_params, token, sharded_cache,
                                                 plan=plan)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  # One cache layout from allocation through prefill and decode: no resharding.
  assert jax.tree.map(lambda x: x.sharding, sharded_cache) == in_sharding

  want = lctx.generate(cfg, params, tokens, lengths=lengths, max_new_tokens=NEW, capacity=CAPACITY)
  got = lctx.generate(cfg, params, tokens, lengths=lengths, max_new_tokens=NEW, capacity=CAPACITY,
                      plan=plan)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec,kv_heads,replicas,kv_spec", [
    ("model:8", 2, 4, "model"), ("model:2", 2, 1, "model"), ("model:8", 1, 8, None),
    ("model:8", 8, 1, "model"), ("data:2,seq:2,model:2", 1, 2, None),
    ("seq:2,model:4", 2, 2, "model")])
def test_kv_heads_beyond_model_axis_live_only_where_their_queries_are(spec, kv_heads, replicas,
                                                                     kv_spec):
  """model = r K: each KV head on the r devices whose query heads read it, so a
  device holds 1/K of the cache and of the K/V projections (vLLM's layout)."""
  cfg = CFG.replace(num_kv_heads=kv_heads)
  plan = plan_for(spec, cfg)
  assert plan.kv_replicas == replicas and plan.size("model") == sharding.parse_mesh_spec(spec)["model"]
  params = lctx.abstract_params(cfg)
  cache = abstract_cache(cfg, B, CAPACITY)
  shardings = plan.cache_shardings(cache)
  assert shardings.k.spec[2] == kv_spec
  total = cache.k.size * cache.k.dtype.itemsize
  seq = sharding.parse_mesh_spec(spec)["seq"]
  data = sharding.parse_mesh_spec(spec)["data"]
  per_device = math.prod(shardings.k.shard_shape(cache.k.shape)) * 4
  assert per_device == total // min(kv_heads, plan.size("model")) // seq // data
  w_k = params["layers"]["w_k"]
  w_sharding = plan.param_shardings(params)["layers"]["w_k"]
  assert math.prod(w_sharding.shard_shape(w_k.shape)) == w_k.size // min(kv_heads, plan.size("model"))


@pytest.mark.parametrize("spec,kv_heads", [("model:4", 3), ("model:3", 2)])
def test_model_axis_neither_dividing_nor_multiple_of_kv_heads_is_an_error(spec, kv_heads):
  cfg = CFG.replace(num_heads=12, num_kv_heads=kv_heads, hidden_size=96, intermediate_size=192)
  devices = jax.devices()[:sharding.parse_mesh_spec(spec)["model"]]
  with pytest.raises(ValueError, match="num_kv_heads = .*allowed model sizes"):
    sharding.Plan(cfg, sharding.make_mesh(spec, devices))


def _collectives(hlo: str) -> list[tuple[str, str]]:
  return re.findall(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                    r"collective-permute)(?:-start)?\(", hlo)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_tensor_parallel_decode_collectives(kv_heads, layout):
  """Megatron: one all-reduce of the [B, 1, D] activations after attention and
  one after the MLP, per layer, plus one for the embedding lookup in the
  vocab-sharded table; no all-gather (of parameters or anything else), also
  when model:8 exceeds K (each device's query heads then read the one KV head
  it holds: a wrong head-to-device map would need collectives)."""
  cfg = CFG.replace(num_kv_heads=kv_heads)
  plan = plan_for("model:8", cfg)
  params, cache = _abstract(cfg, layout, 64)
  step = engine.sharded_step("decode", plan, params, cache)
  hlo = step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32), cache).compile().as_text()
  found = _collectives(hlo)
  assert not [c for c in found if c[1] != "all-reduce"], found
  activation_reduces = [c for c in found
                        if c[1] == "all-reduce" and c[0].startswith(f"f32[{B},1,{cfg.hidden_size}]")]
  per_layer_copies = cfg.num_layers if layout == "unrolled" else 1  # a scan body is listed once
  assert len(activation_reduces) == 2 * per_layer_copies + 1, found
  assert len(found) == len(activation_reduces), found


ALL_MESHES = MESHES + ["model:4", "seq:2,model:4", "data:2,model:2", "seq:4,model:2"]


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_no_decode_step_gathers_the_cache_or_a_parameter(kv_heads, layout):
  """Every mesh of this suite, both layouts: the only all-gathers a decode step
  may do are of the new token's K/V and slot indices for a batch-sharded
  cache write (B x K x H values), never of a cache or parameter; and the
  cache arrays come out of the step exactly as sharded as they went in."""
  cfg = CFG.replace(num_kv_heads=kv_heads)
  params, cache = _abstract(cfg, layout, 1024)
  token_kv_bytes = B * kv_heads * cfg.head_dim * 4
  layers = params["layers"] if layout == "stacked" else params["layers"][0]
  smallest_weight = min(x.size * 4 for k, x in layers.items() if k.startswith("w_"))
  assert token_kv_bytes < smallest_weight
  for spec in ALL_MESHES:
    plan = plan_for(spec, cfg)
    step = engine.sharded_step("decode", plan, params, cache)
    text = hlo_cost.partitioned_hlo(step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32),
                                               cache))
    for kind in ("all-gather", "all-to-all", "collective-permute"):
      for shape in re.findall(rf"= (\S+) {kind}(?:-start)?\(", text):
        assert hlo_cost.shape_bytes(shape) <= token_kv_bytes, (spec, kind, shape)


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


def test_a_plan_on_an_already_split_mesh_is_checked_too():
  plan = plan_for("model:8")  # K = 2: model 2 x model_rep 4
  assert sharding.Plan(CFG, plan.mesh).mesh == plan.mesh
  wrong = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 1, 1, 8), plan.mesh.axis_names)
  with pytest.raises(ValueError, match="expected model=2, model_rep=4"):
    sharding.Plan(CFG, wrong)


def test_model_axis_not_dividing_the_heads_raises_when_the_plan_is_made():
  with pytest.raises(ValueError, match="'model' of size 3 does not divide num_heads .* = 8"):
    sharding.Plan(CFG, sharding.make_mesh("model:3", jax.devices()[:3]))


@pytest.mark.parametrize("spec,kwargs,words", [
    ("model:8", dict(batch=4, capacity=24), None),  # fine: K=2 < 8, each KV head on 4 devices
    ("data:2", dict(batch=3, capacity=24), ["'data'", "batch = 3"]),
    ("seq:8", dict(batch=4, capacity=20), ["'seq'", "capacity = 20"]),
])
def test_indivisible_axes_raise_before_compiling(spec, kwargs, words):
  plan = sharding.Plan(CFG, sharding.make_mesh(spec))
  if words is None:
    engine.new_cache(CFG, PARAMS, plan=plan, **kwargs)
    return
  with pytest.raises(ValueError) as err:
    engine.new_cache(CFG, PARAMS, plan=plan, **kwargs)
  for word in words:
    assert word in str(err.value)


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
@pytest.mark.parametrize("spec", ["seq:8", "data:2,seq:2,model:2", "seq:2,model:4"])
def test_prefill_never_gathers_the_cache(spec, layout):
  """A prompt shorter than the cache (T/s prompt rows per seq shard against
  S/s slots, generate's usual case): each shard writes its own cache slice
  from the gathered prompt K/V; the only all-gathers are of the prompt's K/V
  (the partitioner alone gathered the whole cache once per layer)."""
  plan = plan_for(spec)
  capacity, T = 1024, 512
  params, cache = _abstract(CFG, layout, capacity)
  step = engine.sharded_step("prefill", plan, params, cache)
  text = hlo_cost.partitioned_hlo(step.lower(params, jax.ShapeDtypeStruct((B, T), jnp.int32),
                                             jax.ShapeDtypeStruct((B,), jnp.int32), cache))
  prompt_kv = B * T * CFG.num_kv_heads * CFG.head_dim * 4  # one layer's K (or V), all rows
  for kind in ("all-gather", "all-to-all", "collective-permute"):
    for shape in re.findall(rf"= (\S+) {kind}(?:-start)?\(", text):
      assert hlo_cost.shape_bytes(shape) <= prompt_kv, (kind, shape)


@pytest.mark.parametrize("spec", ["seq:8", "data:2,seq:2,model:2"])
def test_seq_prefill_shorter_than_the_cache_equals_unsharded(spec):
  """The cache a sharded prefill leaves (prompt 16 < capacity 24 on seq meshes)
  equals the unsharded one slot for slot, the slots past the prompt included."""
  plan = plan_for(spec)
  tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (B, 16)).astype(np.int32)
  want_logits, want = lctx.prefill(CFG, PARAMS, tokens, engine.new_cache(CFG, PARAMS, B, 24))
  sharded = engine.shard_params(PARAMS, plan)
  got_logits, got = lctx.prefill(CFG, sharded, tokens,
                                 engine.new_cache(CFG, sharded, B, 24, plan=plan), plan=plan)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got.k), np.asarray(want.k), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(got.v), np.asarray(want.v), atol=1e-6, rtol=0)


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
  params, cache = _abstract(CFG, layout, 1024)
  step = engine.sharded_step("decode", plan, params, cache)
  hlo = step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32), cache).compile().as_text()
  kinds = {kind for _, kind in _collectives(hlo)}
  assert kinds <= {"all-reduce"}, kinds
  assert "all-reduce" in hlo
  mem = step.lower(params, jax.ShapeDtypeStruct((B,), jnp.int32), cache).compile().memory_analysis()
  kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
  assert mem.alias_size_in_bytes >= kv_bytes / 8  # each device updates its slice in place
