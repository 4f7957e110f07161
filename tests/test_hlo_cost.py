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


@pytest.mark.parametrize("T,chunk", [(50_000, None), (50_000, 8192), (1_000_000, 8192)])
def test_yi34b_prefill_flops_are_causal(T, chunk):
  """Prefill on model:8, in one pass and in chunks of 8192: per-device FLOPs
  from the HLO within 5% of the causal closed form / 8 (a full-square
  attention would be 38% over at 50K; a chunked prefill charged for the whole
  cache at every chunk, about 2x the attention)."""
  import lctx
  from lctx import engine
  from lctx.cache import abstract_cache
  from lctx.cost import analytic
  config = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
  plan = sharding.Plan(config, sharding.make_mesh("model:8"))
  params, cache = lctx.abstract_params(config), abstract_cache(config, 1, T)
  lowered = engine.sharded_step("prefill", plan, params, cache, chunk=chunk).lower(
      params, jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32), cache)
  costs = hlo.analyze(lowered)
  assert costs.unknown_trip_counts == 0
  assert costs.flops == pytest.approx(analytic.prefill_flops(config, T, "exact") / 8, rel=0.05)


def test_a_loop_bounded_at_run_time_is_charged_its_declared_trips():
  """A while loop with a traced bound has no known_trip_count: the walker
  charges the trip count declared in its name scope (TRIPS_SCOPE), here a
  mean of 2.5 over the 4 runs of an outer scan (trips 1, 2, 3, 4), which
  makes the total exact; undeclared, it counts one trip and says so."""
  from lctx.model.attention import TRIPS_SCOPE
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)

  def program(declared):
    def f(x):
      def outer(c, i):
        with jax.named_scope(f"{TRIPS_SCOPE}=2.5" if declared else "plain"):
          return jax.lax.fori_loop(0, i + 1, lambda j, c: c @ x, c), None
      return jax.lax.scan(outer, x, jnp.arange(4))[0]
    return hlo.analyze(jax.jit(f).lower(x))

  matmul = 2 * 64 ** 3
  declared, plain = program(True), program(False)
  assert declared.unknown_trip_counts == 0
  assert declared.flops == pytest.approx((1 + 2 + 3 + 4) * matmul, rel=0.01)
  assert plain.unknown_trip_counts == 1


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


# ---- collectives: what they move and over how many devices -----------------------------

def test_all_gather_counts_its_gathered_output():
  """Gathering a [64, 512] fp32 array sharded 8 ways moves the whole output
  buffer, 64 x 512 x 4 = 131,072 bytes per device, over 8 participants."""
  mesh = sharding.make_mesh("model:8")
  gather = jax.jit(lambda x: x * 2, in_shardings=NamedSharding(mesh, P("model")),
                   out_shardings=NamedSharding(mesh, P()))
  costs = hlo.analyze(gather.lower(jax.ShapeDtypeStruct((64, 512), jnp.float32)))
  assert dict(costs.collectives) == {"all-gather": 131_072}
  assert costs.collective_ops == [("all-gather", 131_072, 8, 1)]


def _yi34b_seq8_prefill():
  import lctx
  from lctx.cost import metrics
  config = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
  return config, metrics.program_costs(config, "seq:8", 4096, 1, "prefill")  # lru-cached


def test_yi34b_seq_parallel_prefill_gathers_k_and_v():
  """seq:8 prefill at T=4096: each of 60 layers all-gathers K and V, each the
  full [T, K=8, H=128] bf16 array, over the 8 seq shards."""
  _, costs = _yi34b_seq8_prefill()
  assert costs.collectives["all-gather"] == 2 * 60 * 4096 * 8 * 128 * 2
  assert {p for kind, _, p, _ in costs.collective_ops if kind == "all-gather"} == {8}


def test_conditional_counts_the_branch_that_computes():
  """lax.cond(p, tanh(x @ w), x): the dear branch's matmul is counted, not the
  identity (an upper bound: the predicate is unknown at compile time)."""
  f = jax.jit(lambda p, x, w: jax.lax.cond(p, lambda: jnp.tanh(x @ w), lambda: x))
  costs = hlo.analyze(f.lower(jax.ShapeDtypeStruct((), jnp.bool_),
                              jax.ShapeDtypeStruct((256, 512), jnp.float32),
                              jax.ShapeDtypeStruct((512, 512), jnp.float32)))
  assert costs.flops == 2 * 256 * 512 ** 2
  assert costs.transcendentals == 256 * 512


def test_yi34b_seq_parallel_prefill_flops_count_every_attention_block():
  """seq:8 prefill at T=4096, per device: the T/8 = 512 local tokens through
  every weight matmul, plus attention of those queries against all T keys.
  The local queries form one 512-row block and the keys 8 blocks; each
  (query block, key block) pair sits in a cond that skips hidden pairs at run
  time, and the count takes every pair as computed (the dear branch), so
  attention is the full rectangle: QK^T and AV, 2 x 2 x (T/8) x T x N x H per
  layer, not the causal triangle. Plus the output head on the last token.
  About 3.79e13; the rest (0.1%) is elementwise work: softmax, norms, SwiGLU."""
  c, costs = _yi34b_seq8_prefill()
  T, L, D, N, K, H, F, V = (4096, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                            c.head_dim, c.intermediate_size, c.vocab_size)
  per_layer_weights = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
  matmuls = 2 * (T // 8) * L * per_layer_weights
  attention = 2 * 2 * (T // 8) * T * N * H * L
  head = 2 * D * V
  want = matmuls + attention + head
  assert want == pytest.approx(3.788e13, rel=1e-3)
  assert costs.unknown_trip_counts == 0
  assert costs.flops == pytest.approx(want, rel=2e-3)
  # A causal count would be well under: half the rectangle's attention on average.
  assert costs.flops > want - attention / 4


# ---- replica groups in every form XLA prints -----------------------------------------

@pytest.mark.parametrize("attrs, kind, counts, want", [
    # explicit groups of flattened device ids
    ("channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true",
     "all-reduce", (1, 8), 2),
    ("channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, "
     "to_apply=%region_6.6", "all-reduce", (1, 8), 2),
    # empty: one group of every device (ids meaning replicas, partitions or both)
    ("channel_id=1, replica_groups={}, use_global_device_ids=true", "all-reduce", (1, 8), 8),
    ("channel_id=1, replica_groups={}, dimensions={0}", "all-to-all", (1, 8), 8),
    ("replica_groups={}, to_apply=%add", "all-reduce", (4, 8), 4),
    # cross-replica-and-partition: each replica group spans every partition
    ("channel_id=1, replica_groups={{0}}, to_apply=%add", "all-reduce", (1, 8), 8),
    # no channel: replica ids
    ("replica_groups={{0,1,2,3}}, to_apply=%add", "all-reduce", (4, 1), 4),
    # iota [groups, size]<=[dims], optionally transposed
    ("channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true", "all-reduce",
     (1, 8), 4),
    ("channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, "
     "use_global_device_ids=true", "all-gather", (1, 8), 2),
    # mesh axes (quoted or not, with or without device_ids, sub-axes, none)
    ("channel_id=2, replica_groups=mesh['axis_0'=1,'axis_1'=1,'axis_2'=4,'axis_3'=2], "
     "device_ids=([2,4]T(1,0)) {'axis_2'}, use_global_device_ids=true", "all-reduce", (1, 8), 4),
    ("channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}",
     "all-gather", (1, 8), 8),
    ("replica_groups=mesh[data=2,model=4] {data,model}", "all-reduce", (1, 8), 8),
    ("replica_groups=mesh[x=8], device_ids=(0,2,4,6,1,3,5,7) {x:(2)4}", "reduce-scatter",
     (1, 8), 4),
    ("replica_groups=mesh[x=8] {}", "all-reduce", (1, 8), 1),
    ("replica_groups=maximal_mesh[device_id=3] {}", "all-reduce", (1, 8), 1),
    # collective-permute: the devices that send or receive
    ("channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}", "collective-permute",
     (1, 8), 4),
    ("channel_id=1, source_target_pairs={{0,1},{1,0}}", "collective-permute", (1, 8), 2),
    ("channel_id=1, source_target_pairs={{5,5}}", "collective-permute", (1, 8), 1),
])
def test_participants_of_every_replica_group_form(attrs, kind, counts, want):
  assert hlo._participants(attrs, kind, *counts) == want


@pytest.mark.parametrize("attrs, kind", [
    ("channel_id=1, replica_groups=groups(0,1)", "all-reduce"),
    ("channel_id=1, replica_groups={{0,1},{x}}", "all-reduce"),
    ("channel_id=1, replica_groups=[2,2,2]<=[8]", "all-reduce"),
    ("channel_id=1, replica_groups=mesh['a'=2,'b'=4] {'c'}", "all-reduce"),
    ("channel_id=1, replica_groups=mesh['a'=2,'b'=4]", "all-gather"),
    ("channel_id=1, use_global_device_ids=true", "all-reduce"),
    ("channel_id=1, slice_sizes={1}", "collective-permute"),
])
def test_unreadable_replica_groups_raise(attrs, kind):
  with pytest.raises(ValueError):
    hlo._participants(attrs, kind, 1, 8)


def test_an_unreadable_collective_is_never_free():
  """A module whose all-reduce names groups in an unknown form fails to cost."""
  text = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  ROOT %r = f32[1024]{0} all-reduce(%x), channel_id=1, replica_groups=ring<8>, to_apply=%add
}
"""
  with pytest.raises(ValueError, match="ring<8>"):
    hlo.module_costs(text)
  costs = hlo.module_costs(text.replace("ring<8>", "{}"))  # {}: all 8 partitions
  assert costs.collective_ops == [("all-reduce", 4096, 8, 1)]


def test_tiny_with_8_kv_heads_on_seq2_model4_all_reduces_over_4_devices():
  """tiny with K=8 on seq:2,model:4, decode of 2 users: XLA prints the two
  per-layer all-reduces (attention output, MLP output) with mesh-axes groups
  and device_ids; each spans the 4 model devices, not 1."""
  import lctx
  from lctx import engine
  from lctx.cache import abstract_cache
  from lctx.cost import metrics
  config = lctx.ModelConfig.from_preset("tiny").replace(num_kv_heads=8)
  plan = sharding.Plan(config, sharding.make_mesh("seq:2,model:4"))
  B, T = 2, 64
  params, cache = lctx.abstract_params(config), abstract_cache(config, B, T)
  step = engine.sharded_step("decode", plan, params, cache)
  costs = hlo.analyze(step.lower(params, *metrics.step_args("decode", B, T), cache))
  activations = B * config.hidden_size * 4  # [B, 1, D] f32
  per_layer = [p for kind, nbytes, p, count in costs.collective_ops
               if kind == "all-reduce" and nbytes == activations and count == config.num_layers]
  assert per_layer == [4, 4]
  assert all(p > 1 for _, _, p, _ in costs.collective_ops)
