"""HLO walker checks: XLA's own count on loop-free programs, loops x trip count,
collective bytes of a tensor-parallel MLP against the formula."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lctx import sharding
from lctx.cost import hlo


def _mlp(x, w1, w2):
  return jax.nn.gelu(x @ w1) @ w2


def test_loop_free_flops_match_xla_cost_analysis():
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((64, 512), (512, 2048), (2048, 512))]
  lowered = jax.jit(_mlp).lower(*args)
  mine = hlo.analyze(lowered)
  xla = lowered.compile().cost_analysis()["flops"]
  assert mine.flops == pytest.approx(xla, rel=0.01)
  assert mine.flops >= 2 * 64 * 512 * 2048 * 2  # the two matmuls


def test_scan_counts_its_body_trip_count_times():
  x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
  ws = jax.ShapeDtypeStruct((6, 512, 512), jnp.float32)

  def scanned(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  def unrolled(x, ws):
    for i in range(6):
      x = jnp.tanh(x @ ws[i])
    return x

  a, b = hlo.analyze(jax.jit(scanned).lower(x, ws)), hlo.analyze(jax.jit(unrolled).lower(x, ws))
  assert a.unknown_trip_counts == 0
  assert a.flops == pytest.approx(b.flops, rel=1e-6)
  assert a.flops == pytest.approx(6 * 2 * 64 * 512 * 512, rel=0.01)
  assert a.transcendentals == b.transcendentals == 6 * 64 * 512
  # Ideal-fusion bytes: the unrolled twin keeps the activation on chip from one
  # matmul into the next, the scan hands it over through its loop carry; the
  # weights (all but 1/5 of the bytes here) are read once either way.
  assert a.bytes_ideal == pytest.approx(b.bytes_ideal, rel=0.25)
  assert min(a.bytes_ideal, b.bytes_ideal) >= 6 * 512 * 512 * 4


def test_tensor_parallel_mlp_collective_bytes():
  """Megatron MLP on model:8: one all-reduce of the [B, D] output per device,
  B * D * 2 bytes in bf16, over 8 participants; per-device dot FLOPs = total / 8."""
  mesh = sharding.make_mesh("model:8")
  B, D, F = 16, 256, 1024
  x = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  w1 = jax.ShapeDtypeStruct((D, F), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "model")))
  w2 = jax.ShapeDtypeStruct((F, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("model", None)))
  costs = hlo.analyze(jax.jit(_mlp).lower(x, w1, w2))
  assert dict(costs.collectives) == {"all-reduce": B * D * 2}
  assert [(k, p) for k, _, p, _ in costs.collective_ops] == [("all-reduce", 8)]
  dot_flops = 2 * B * D * F * 2 / 8
  assert dot_flops <= costs.flops <= 1.05 * dot_flops


@pytest.mark.parametrize("context", [4096, 1 << 20])
@pytest.mark.parametrize("tp", [1, 8])
def test_yi34b_decode_bytes_match_closed_form(context, tp):
  """Per-device bytes of a yi-34b decode step (bf16, batch 1), read from the
  partitioned HLO, within 5% of the closed form (weights + KV) / TP."""
  import lctx
  from lctx import engine
  from lctx.cache import abstract_cache
  from lctx.cost import analytic
  config = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
  plan = sharding.Plan(config, sharding.make_mesh(f"model:{tp}"))
  params, cache = lctx.abstract_params(config), abstract_cache(config, 1, context)
  lowered = engine.sharded_step("decode", plan, params, cache).lower(
      params, jax.ShapeDtypeStruct((1,), jnp.int32), cache)
  costs = hlo.analyze(lowered)
  want = analytic.decode_step_bytes(config, 1, context, "bfloat16", "exact") / tp
  assert costs.bytes_ideal == pytest.approx(want, rel=0.05)
  assert costs.unknown_trip_counts == 0


def test_yi34b_prefill_flops_are_causal():
  """Prefill at 50K tokens on model:8: per-device FLOPs from the HLO within 5% of
  the causal closed form / 8 (a full-square attention would be 38% over)."""
  import lctx
  from lctx import engine
  from lctx.cache import abstract_cache
  from lctx.cost import analytic
  T = 50_000
  config = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
  plan = sharding.Plan(config, sharding.make_mesh("model:8"))
  params, cache = lctx.abstract_params(config), abstract_cache(config, 1, T)
  lowered = engine.sharded_step("prefill", plan, params, cache).lower(
      params, jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32), cache)
  costs = hlo.analyze(lowered)
  assert costs.unknown_trip_counts == 0
  assert costs.flops == pytest.approx(analytic.prefill_flops(config, T, "exact") / 8, rel=0.05)


# ---- peak temporaries (liveness over the listed order) ----------------------------------

N, M = 256, 512


def test_temp_bytes_counts_a_matmul_output_and_fuses_pointwise_ops():
  """tanh(x @ w).sum(0): the [N, M] product is a buffer (its user is not a
  matmul), tanh fuses into the reduction, the [M] sum is the output."""
  f = lambda x, w: jnp.tanh(x @ w).sum(axis=0)
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((N, 128), (128, M))]
  costs = hlo.analyze(jax.jit(f).lower(*args))
  assert costs.temp_bytes == N * M * 4 + M * 4


def test_temp_bytes_frees_dead_buffers():
  """Two products used one after the other are never live together."""
  f = lambda x, w1, w2: jnp.tanh(x @ w1).sum() + jnp.tanh(x @ w2).sum()
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((N, 128), (128, M), (128, M))]
  costs = hlo.analyze(jax.jit(f).lower(*args))
  assert N * M * 4 <= costs.temp_bytes < N * M * 4 + 64


def test_temp_bytes_of_in_place_updates_and_bf16_dots():
  """A donated buffer updated in place costs nothing; a bf16 matrix that JAX's
  CPU lowering widens to f32 for a mixed-precision dot is held as bf16, i.e.
  not at all (it is an argument)."""
  update = jax.jit(lambda c, x: c.at[3].set(x), donate_argnums=0)
  c = jax.ShapeDtypeStruct((64, N, M), jnp.float32)
  assert hlo.analyze(update.lower(c, jax.ShapeDtypeStruct((N, M), jnp.float32))).temp_bytes == 0

  head = jax.jit(lambda h, w: jnp.einsum("...d,dv->...v", h, w,
                                         preferred_element_type=jnp.float32))
  costs = hlo.analyze(head.lower(jax.ShapeDtypeStruct((2, 128), jnp.bfloat16),
                                 jax.ShapeDtypeStruct((128, 4 * M), jnp.bfloat16)))
  assert costs.temp_bytes == 2 * 4 * M * 4  # the f32 logits only
  assert costs.bytes_ideal == (2 * 128 + 128 * 4 * M) * 2 + 2 * 4 * M * 4


def test_temp_bytes_of_a_loop_count_its_body_once():
  """A scan's body reuses its buffers every trip: the peak is one trip's."""
  def scanned(x, ws):
    return jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w).sum(0), None), x, ws)[0]
  x = jax.ShapeDtypeStruct((N, M), jnp.float32)
  one = hlo.analyze(jax.jit(scanned).lower(x, jax.ShapeDtypeStruct((1, M, M), jnp.float32)))
  six = hlo.analyze(jax.jit(scanned).lower(x, jax.ShapeDtypeStruct((6, M, M), jnp.float32)))
  assert six.temp_bytes == one.temp_bytes
  assert six.temp_bytes >= N * M * 4  # the product inside the body


# ---- host <-> device transfers (JAX memory kinds) ----------------------------------------

@pytest.mark.parametrize("n", [1, 4])
def test_host_transfer_bytes_of_arguments_and_results(n):
  """A host argument read on device and a result returned to host each cross
  the link once, per device its shard."""
  mesh = sharding.make_mesh(f"model:{n}")
  dev = NamedSharding(mesh, P(None, "model"), memory_kind="device")
  host = NamedSharding(mesh, P(None, "model"), memory_kind="pinned_host")

  def f(x, h):
    return jax.device_put(x * 3, host), jax.device_put(h, dev) * 2

  x = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=dev)
  h = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=host)
  costs = hlo.analyze(jax.jit(f, out_shardings=(host, dev)).lower(x, h))
  assert costs.host_transfer_bytes == (1024 + 512) * 256 * 4 / n


@pytest.mark.parametrize("n", [1, 4])
def test_host_transfer_bytes_of_an_offloading_scan(n):
  """Each trip of a scan offloads its [1024, 256] output: trips x shard bytes."""
  mesh = sharding.make_mesh(f"model:{n}")

  def offload(xs):
    body = lambda c, x: (c, jax.device_put(jnp.tanh(x), jax.memory.Space.Host))
    return jax.lax.scan(body, 0, xs)[1]

  xs = jax.ShapeDtypeStruct((6, 1024, 256), jnp.float32,
                            sharding=NamedSharding(mesh, P(None, None, "model")))
  costs = hlo.analyze(jax.jit(offload).lower(xs))
  assert costs.host_transfer_bytes == 6 * 1024 * 256 * 4 / n
  plain = hlo.analyze(jax.jit(lambda xs: jnp.tanh(xs)).lower(xs))
  assert plain.host_transfer_bytes == 0


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_scanned_model_costs_equal_its_unrolled_twin(kind):
  """lctx's stacked layers (one scan) and the same layers unrolled compile to
  the same per-device work on model:2."""
  import lctx
  from lctx import engine
  from lctx.cache import abstract_cache
  from lctx.cost import metrics
  config = lctx.ModelConfig.from_preset("small")
  plan = sharding.Plan(config, sharding.make_mesh("model:2"))
  B, T = 2, 256
  costs = {}
  for stacked in (True, False):
    params = lctx.abstract_params(config)
    params = params if stacked else jax.eval_shape(lctx.unstack_layers, params)
    cache = abstract_cache(config, B, T, stacked=stacked)
    step = engine.sharded_step(kind, plan, params, cache)
    costs[stacked] = hlo.analyze(step.lower(params, *metrics.step_args(kind, B, T), cache))
  scanned, unrolled = costs[True], costs[False]
  assert scanned.unknown_trip_counts == 0
  assert scanned.flops == pytest.approx(unrolled.flops, rel=1e-3)
  assert scanned.transcendentals == pytest.approx(unrolled.transcendentals, rel=1e-3)
  assert scanned.bytes_ideal == pytest.approx(unrolled.bytes_ideal, rel=0.02)
  assert dict(scanned.collectives) == pytest.approx(dict(unrolled.collectives), rel=1e-6)
