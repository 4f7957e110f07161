"""Host memory: context switches (lctx.cache.offload) and streamed caches."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import engine, session, sharding
from lctx.cache import offload
from lctx.cost import hlo as hlo_cost

CFG = lctx.ModelConfig.from_preset("tiny")
PARAMS = lctx.init_params(CFG, seed=0)
SPECS = ["", "int8", "kivi:bits=2,group=8,residual=8", "snapkv:ratio=0.5,window=4"]
B, T, CAPACITY = 2, 16, 32


def filled(spec, plan=None):
  """A cache of B rows after a prefill of T random tokens (and two decode steps)."""
  params = PARAMS if plan is None else engine.shard_params(PARAMS, plan)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T))
  cache = engine.new_cache(CFG, params, B, CAPACITY, kv_compression=spec, plan=plan)
  logits, cache = lctx.prefill(CFG, params, tokens, cache, plan=plan)
  for _ in range(2):
    logits, cache = lctx.decode_step(CFG, params, jnp.argmax(logits, -1), cache, plan=plan)
  return cache


def assert_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("mesh", [None, "data:2,model:4"])  # 1 and 8 devices
@pytest.mark.parametrize("spec", SPECS)
def test_swap_round_trip_is_bitwise(spec, mesh):
  plan = None if mesh is None else sharding.Plan(CFG, sharding.make_mesh(mesh))
  a, b = filled(spec, plan), filled(spec, plan)
  b = jax.tree.map(lambda x: x, b)
  host_b = offload.to_host(b, plan)
  assert offload.on_host(host_b)
  assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(host_b))
  a_host, b_back = offload.swap(a, host_b, plan)
  assert offload.on_host(a_host) and not offload.on_host(b_back)
  assert_bitwise(b_back, b)
  assert_bitwise(offload.to_device(a_host, plan), a)
  if plan is not None:  # the same shardings as before, only the memory kind changed
    for x, y in zip(jax.tree.leaves(b_back), jax.tree.leaves(b)):
      assert x.sharding == y.sharding


@pytest.mark.parametrize("mesh,spec", [(None, s) for s in SPECS[:3]] + [("model:2", "int8")])
def test_swap_moves_the_physical_bytes(spec, mesh):
  """The compiled switch's host transfers (read from its HLO) are the
  cache's physical bytes each way: one device's share on a mesh."""
  plan = None if mesh is None else sharding.Plan(CFG, sharding.make_mesh(mesh))
  cache = filled(spec, plan)
  host = offload.to_host(cache, plan)
  program = offload.swap_program(cache, host, plan)
  moved = hlo_cost.analyze(program.lower(cache, host)).host_transfer_bytes
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(cache),
                                   jax.tree.leaves(offload.shardings(cache, plan))))
  assert moved == 2 * per_device
  if plan is None:
    assert moved == 2 * cache.physical_bytes


@pytest.mark.parametrize("spec", ["", "snapkv:ratio=0.5,window=4"])
def test_two_users_swapping_get_their_own_tokens(spec):
  """Two users taking turns on the device, caches swapped through host
  memory every 3 tokens: each gets exactly what lctx.generate gives it alone."""
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, CFG.vocab_size, (2, 9)), rng.integers(0, CFG.vocab_size, (2, 12))
  outs, swaps = session.generate_swapping(CFG, PARAMS, [a, b], max_new_tokens=7, swap_every=3,
                                          kv_compression=spec)
  assert swaps == 3  # 6 decode steps each (the first token is the prefill's): A B A B
  for out, prompt in zip(outs, (a, b)):
    want = lctx.generate(CFG, PARAMS, prompt, max_new_tokens=7, kv_compression=spec)
    np.testing.assert_array_equal(out, np.asarray(want))


def test_swapping_with_sampling_and_eos_matches_generate():
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, CFG.vocab_size, (2, 8)) for _ in range(2)]
  kw = dict(max_new_tokens=9, sampling=lctx.SamplingConfig(0.9, 5), key=jax.random.key(3),
            eos_token_id=[5, 7, 11])
  outs, swaps = session.generate_swapping(CFG, PARAMS, prompts, swap_every=2, **kw)
  assert swaps > 0
  for out, prompt in zip(outs, prompts):
    np.testing.assert_array_equal(out, np.asarray(lctx.generate(CFG, PARAMS, prompt, **kw)))


def test_swapping_errors():
  prompt = np.zeros((1, 4), np.int32)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="swap_every"):
      session.generate_swapping(CFG, PARAMS, [prompt], max_new_tokens=2, swap_every=bad)
  with pytest.raises(ValueError, match="at least one"):
    session.generate_swapping(CFG, PARAMS, [], max_new_tokens=2, swap_every=1)


@pytest.mark.slow  # the entry point end to end (subprocess); -m slow runs it
def test_generate_flag_swap_every(tmp_path):
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.generate", "--swap_every=3",
                         "--max_new_tokens=8", "--batch=2", "--kv_compression=int8",
                         f"--json_out={out}"], cwd=Path(__file__).resolve().parent.parent,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["swap"]["same_tokens"] and result["swap"]["swaps"] == 5
  assert "equal the run without swapping" in proc.stdout


# ---- the `offload` policy: a cache streamed from host memory, layer by layer ----

def to_streamed(cache):
  """An on-device cache's state as an `offload` cache: K and V copied to host memory."""
  host = lambda side: jax.device_put(side, jax.memory.Space.Host)
  return cache.replace(k=host(cache.k), v=host(cache.v), offload=True)


def on_device(cache):
  dev = lambda side: jax.device_put(side, jax.memory.Space.Device)
  return cache.replace(k=dev(cache.k), v=dev(cache.v), offload=False)


SHARE_CFG = CFG.replace(num_layers=4, kv_share_every=2)
SHARE_PARAMS = lctx.init_params(SHARE_CFG, seed=1)


@pytest.mark.parametrize("spec,layout", [("", "stacked"), ("", "unrolled"), ("int8", "stacked"),
                                         ("int4", "unrolled"), ("share+int8", "stacked")])
def test_streamed_decode_is_on_device_decode_bitwise(spec, layout):
  """From the same state, decode steps on a host-resident cache streamed one
  layer ahead give bitwise the logits and cache of on-device decode."""
  config, params = (SHARE_CFG, SHARE_PARAMS) if spec.startswith("share") else (CFG, PARAMS)
  spec = spec.removeprefix("share+").removeprefix("share")
  if layout == "unrolled":
    params = lctx.unstack_layers(params)
  tokens = np.random.default_rng(3).integers(0, config.vocab_size, (B, T))
  cache = engine.new_cache(config, params, B, CAPACITY, kv_compression=spec)
  logits, cache = lctx.prefill(config, params, tokens, cache, lengths=[T, T - 5])
  streamed = to_streamed(jax.tree.map(jnp.copy, cache))
  nxt = jnp.argmax(logits, -1)
  for _ in range(3):
    want, cache = lctx.decode_step(config, params, nxt, cache)
    got, streamed = lctx.decode_step(config, params, nxt, streamed)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    nxt = jnp.argmax(want, -1)
  assert all(x.sharding.memory_kind == "pinned_host"
             for x in jax.tree.leaves((streamed.k, streamed.v)))
  assert_bitwise(on_device(streamed), cache)


@pytest.mark.parametrize("spec,chunk", [("", None), ("int8", None), ("", 5)])
def test_streamed_prefill_matches_on_device(spec, chunk):
  """One-pass prefill streams bitwise; a chunked one to float rounding (XLA
  fuses the chunk loop's body differently around the fetched block)."""
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (B, 12))
  outs = []
  for s in (spec, "+".join(filter(None, (spec, "offload")))):
    cache = engine.new_cache(CFG, PARAMS, B, CAPACITY, kv_compression=s)
    logits, cache = lctx.prefill(CFG, PARAMS, tokens, cache, chunk=chunk)
    outs.append((logits, cache))
  (want, dense), (got, streamed) = outs
  if chunk is None:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_bitwise(on_device(streamed), dense)
  else:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def _layer_bytes(cache):
  return sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v)))


@pytest.mark.parametrize("config,spec", [(CFG, "offload"), (CFG, "int8+offload"),
                                         (SHARE_CFG, "int4+offload")])
def test_streamed_programs_move_each_block_once(config, spec):
  """Host-link bytes read from the compiled programs: a decode step brings
  every cache layer's block once and sends each row's new token back; a
  one-pass prefill brings and returns every block once; a chunked one brings
  every block per chunk and returns the chunk's slots."""
  params = lctx.abstract_params(config)
  cache = engine.new_cache(config, lctx.init_params(config), B, CAPACITY, kv_compression=spec)
  whole = _layer_bytes(cache)
  slot = whole // CAPACITY  # every layer's bytes of one slot of all B rows
  step = hlo_cost.analyze(engine.decode_jit.lower(config, params, jnp.zeros((B,), jnp.int32),
                                                  cache))
  assert step.host_transfer_bytes == whole + slot
  tokens, lengths = jnp.zeros((B, 12), jnp.int32), jnp.full((B,), 12)
  one_pass = hlo_cost.analyze(engine.prefill_jit.lower(config, params, tokens, lengths, cache))
  assert one_pass.host_transfer_bytes == 2 * whole
  chunked = hlo_cost.analyze(engine.prefill_jit.lower(config, params, tokens, lengths, cache,
                                                      chunk=4))
  assert chunked.host_transfer_bytes == 3 * whole + 12 * slot


def test_streamed_sharded_equals_unsharded():
  plan = sharding.Plan(CFG, sharding.make_mesh("data:2,model:4"))
  tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (B, T))
  got = []
  for p in (None, plan):
    params = PARAMS if p is None else engine.shard_params(PARAMS, p)
    cache = engine.new_cache(CFG, params, B, CAPACITY, kv_compression="int8+offload", plan=p)
    logits, cache = lctx.prefill(CFG, params, tokens, cache, plan=p)
    logits, cache = lctx.decode_step(CFG, params, jnp.argmax(logits, -1), cache, plan=p)
    got.append(np.asarray(logits))
    assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(cache.k))
  np.testing.assert_allclose(got[1], got[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec,word", [("kivi:bits=2,group=8,residual=8+offload", "allowed"),
                                       ("fp8+offload", "allowed"),
                                       ("snapkv:ratio=0.5+offload", "allowed")])
def test_offload_refuses_what_it_cannot_stream(spec, word):
  with pytest.raises(ValueError, match=word):
    engine.new_cache(CFG, PARAMS, B, CAPACITY, kv_compression=spec)


def test_offload_refuses_seq_meshes():
  plan = sharding.Plan(CFG, sharding.make_mesh("seq:2"))
  with pytest.raises(ValueError, match="seq"):
    engine.new_cache(CFG, PARAMS, B, CAPACITY, kv_compression="offload", plan=plan)


# ---- costs of offload --------------------------------------------------------------

def test_overlapped_seconds_closed_form():
  from lctx.cost.metrics import overlapped_seconds
  assert overlapped_seconds(10.0, 0.0, 4) == 10.0  # nothing streamed: the compute
  # per layer c = 1, t = 2: t + 3 max(c, t) + c; the serial sum would be 12
  assert overlapped_seconds(4.0, 8.0, 4) == 2 + 3 * 2 + 1
  assert overlapped_seconds(8.0, 4.0, 4) == 1 + 3 * 2 + 2  # compute-bound: transfer hidden


def test_offload_metrics():
  """Closed form and compiled programs: the cache lives in host memory (none
  on the device), a context switch moves nothing, the decode step is the
  overlap of compute and each layer's transfer, the serial figure their sum."""
  from lctx.cost import hardware, metrics
  hw = hardware.load_hardware("a100-80g-sxm")
  T, g = 2048, 2
  for spec in ("offload", "int8+offload"):
    closed = metrics.from_closed_form(CFG, hw, f"model:{g}", T, kv_compression=spec)
    plain = metrics.from_closed_form(CFG, hw, f"model:{g}", T, kv_compression=spec[:-8])
    kv = plain.kv_bytes_per_user_total
    assert closed.kv_bytes_per_user_total == kv and closed.kv_bytes_per_user_per_device == 0
    assert closed.host_bytes_per_user_per_device == kv / g
    assert closed.context_switch_s == 0
    transfer = kv / g / hw.host_bandwidth
    assert closed.decode_step_s_serial == pytest.approx(plain.decode_step_s + transfer)
    assert closed.decode_step_s == pytest.approx(metrics.overlapped_seconds(
        plain.decode_step_s, transfer, CFG.num_kv_layers))
    assert closed.concurrency == min(math.floor(hw.host_memory_bytes / (kv / g)), math.floor(
        (hw.hbm_bytes - plain.weight_bytes_per_device) / (2 * kv / g / CFG.num_kv_layers)))

    compiled = metrics.from_hlo(CFG, hw, f"model:{g}", T, kv_compression=spec)
    assert compiled.kv_bytes_per_user_per_device == 0
    assert compiled.host_bytes_per_user_per_device == kv / g  # the per-device share, exactly
    assert compiled.context_switch_s == 0
    bf16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")  # as from_hlo compiles it
    decode = metrics.program_costs(bf16, f"model:{g}", T, 1, "decode", None, None, spec)
    assert decode.host_transfer_bytes == kv / g + kv / g / T  # every block, and the new token
    assert compiled.decode_step_s_serial == pytest.approx(
        metrics.roofline_seconds(decode, hw, "bfloat16") + decode.host_transfer_bytes
        / hw.host_bandwidth)


@pytest.mark.parametrize("spec", ["", "int8+offload"])
def test_a_swapped_out_cache_is_refused_until_it_comes_back(spec):
  cache = engine.new_cache(CFG, PARAMS, 1, 8, kv_compression=spec)
  host = offload.to_host(cache)
  with pytest.raises(ValueError, match="to_device"):
    lctx.prefill(CFG, PARAMS, np.zeros((1, 4), np.int32), host)
  with pytest.raises(ValueError, match="to_device"):
    lctx.decode_step(CFG, PARAMS, jnp.zeros((1,), jnp.int32), host)
  logits, _ = lctx.prefill(CFG, PARAMS, np.zeros((1, 4), np.int32), offload.to_device(host))
  assert logits.shape == (1, CFG.vocab_size)
