"""Host memory: context switches (lctx.cache.offload) and streamed caches."""

import json
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


@pytest.mark.parametrize("mesh,spec", [(None, s) for s in SPECS] + [("model:2", ""),
                                                                     ("model:2", "int8")])
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


@pytest.mark.parametrize("spec", ["", "int8", "snapkv:ratio=0.5,window=4"])
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
  prompts = [rng.integers(0, CFG.vocab_size, (2, 8)) for _ in range(3)]
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
