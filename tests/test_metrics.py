"""The four metrics from the compiled HLO against the closed form (yi-34b, A100 80GB),
and the collective time of the roofline."""

import dataclasses
import math

import pytest

import lctx
from lctx.cost import analytic, hlo, metrics
from lctx.cost.hardware import load_hardware

CFG = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
HW = load_hardware("a100-80g-sxm")
NVLINK = 300e9  # A100 NVLink, bytes/s in one direction (600 GB/s both ways)


def comm_seconds(costs: hlo.Costs) -> float:
  """The collectives' share of a program's roofline seconds."""
  bare = dataclasses.replace(costs, collective_ops=[])
  return (metrics.roofline_seconds(costs, HW, "bfloat16")
          - metrics.roofline_seconds(bare, HW, "bfloat16"))


def tp_all_reduce_seconds(rows: int) -> float:
  """A tensor-parallel yi-34b step on model:8: two all-reduces of the [rows, D]
  bf16 activations per layer and one after the vocabulary-split embedding
  lookup, each latency + 2 (8-1)/8 x bytes over one direction of NVLink."""
  each = HW.collective_latency + 2 * 7 / 8 * rows * CFG.hidden_size * 2 / NVLINK
  return (2 * CFG.num_layers + 1) * each


@pytest.mark.parametrize("g", [1, 8])
@pytest.mark.parametrize("T", [4000, 50000])
def test_hlo_metrics_agree_with_closed_form(g, T):
  a = metrics.from_closed_form(CFG, HW, g, T)
  h = metrics.from_hlo(CFG, HW, g, T)
  assert (a.source, h.source, a.mesh, h.mesh) == ("analytic", "hlo", f"model:{g}", f"model:{g}")
  assert h.weight_bytes_per_device == pytest.approx(a.weight_bytes_per_device, rel=0.01)
  assert h.kv_bytes_per_user_per_device == pytest.approx(a.kv_bytes_per_user_per_device, rel=1e-9)
  assert h.decode_bytes_per_device == pytest.approx(a.decode_bytes_per_device, rel=0.02)
  # The closed form treats tensor parallelism as free; the compiled steps pay
  # their all-reduces (121 of them on model:8, latency-bound in decode).
  runs = metrics.programs(CFG, g, T, 1, "bfloat16")
  decode_comm, prefill_comm = comm_seconds(runs["decode"][2]), comm_seconds(runs["prefill"][2])
  if g == 1:
    assert decode_comm == prefill_comm == 0
  else:
    assert decode_comm == pytest.approx(tp_all_reduce_seconds(1), rel=1e-9)
    assert prefill_comm == pytest.approx(tp_all_reduce_seconds(T), rel=1e-9)
  assert h.decode_step_s - decode_comm == pytest.approx(a.decode_step_s, rel=0.02)
  assert h.prefill_flops_per_device == pytest.approx(a.prefill_flops_per_device, rel=0.05)
  # The compiled swap moves each device's share of two users' caches over its
  # own host link; the closed form pushes both whole caches through one.
  assert h.context_switch_s == pytest.approx(2 * h.kv_bytes_per_user_per_device / HW.host_bandwidth)
  assert h.context_switch_s == pytest.approx(a.context_switch_s / g)
  if g == 1:
    assert h.prefill_s == pytest.approx(a.prefill_s, rel=0.05)
  else:  # beside the all-reduces, memory-bound elementwise ops on [T, D] activations
    assert a.prefill_s < h.prefill_s - prefill_comm < 1.1 * a.prefill_s
  # Concurrency: HBM per device must hold the weights, n caches and the larger
  # of a decode step's and a prefill's temporaries. A scanned decode step copies
  # one layer's weight slices and its cache slices out before their matmuls
  # (as XLA:CPU does for the same fp32 program): more than the largest weight
  # matrix of a layer, less than a whole layer's weights and cache.
  layer_weights = (CFG.param_bytes() - 2 * CFG.vocab_size * CFG.hidden_size * 2) / CFG.num_layers / g
  layer_cache = h.kv_bytes_per_user_per_device / CFG.num_layers
  biggest_matrix = CFG.hidden_size * CFG.intermediate_size * 2 / g
  assert biggest_matrix < h.decode_temp_bytes_per_device < 1.01 * (layer_weights + layer_cache)
  # A prefill materializes the MLP's gate and up projections, [T, F] each.
  assert 2 * T * CFG.intermediate_size * 2 / g < h.prefill_temp_bytes_per_device < 10e9
  fixed = h.decode_temp_bytes_per_device - layer_cache
  fits = lambda n: (h.weight_bytes_per_device + n * h.kv_bytes_per_user_per_device + max(
      fixed + n * layer_cache, h.prefill_temp_bytes_per_device) <= HW.hbm_bytes)
  expected = next(n for n in range(10_000) if not fits(n + 1))
  assert h.concurrency == expected <= a.concurrency


def test_concurrency_reference_points():
  """FRAMEWORK.md T11 and T14 (50K context, exact parameters, decimal GB)."""
  got = [metrics.from_closed_form(CFG, HW, g, 50000).concurrency for g in (1, 2, 4, 8)]
  assert got == [0, 7, 20, 46]


def test_nothing_fits_reports_the_shortfall():
  a, h = metrics.from_closed_form(CFG, HW, 1, 50000), metrics.from_hlo(CFG, HW, 1, 50000)
  assert a.concurrency == h.concurrency == 0
  # 80 GB minus 68.8 GB of weights leaves 11.2 GB; one user needs 12.29 GB,
  # and the HLO's prefill holds its activations beside it.
  assert a.shortfall_bytes_per_device == pytest.approx(12.288e9 - (80e9 - CFG.param_bytes()), rel=1e-6)
  assert h.shortfall_bytes_per_device == pytest.approx(
      a.shortfall_bytes_per_device + h.prefill_temp_bytes_per_device, rel=1e-6)
  assert (a.decode_tokens_per_s, h.sessions_per_hour) == (0, 0)


def test_throughput_of_waves_of_users():
  """Decode tokens/s and sessions/hour with HBM full: waves of `concurrency`
  users, each prefilled in turn, then G tokens decoded together."""
  G, T = 500, 4000
  a = metrics.from_closed_form(CFG, HW, 8, T, generated_tokens=G)
  n = a.concurrency
  step = analytic.decode_step_seconds(CFG, n, T, HW, 8, "bfloat16")
  assert a.decode_tokens_per_s == pytest.approx(n / step)
  assert a.sessions_per_hour == pytest.approx(3600 * n / (n * a.prefill_s + G * step))


def test_mesh_with_data_and_seq_axes():
  """data:2 replicates the weights: a user lives on one model:4 replica, and
  the two replicas hold twice its users; seq:2,model:4 splits each cache 8 ways."""
  T = 4000
  tp4, dp = metrics.from_hlo(CFG, HW, 4, T, B=2), metrics.from_hlo(CFG, HW, "data:2,model:4", T, B=2)
  assert (dp.mesh, dp.num_devices) == ("data:2,model:4", 8)
  assert dp.weight_bytes_per_device == tp4.weight_bytes_per_device
  assert dp.kv_bytes_per_user_per_device == tp4.kv_bytes_per_user_per_device
  assert dp.prefill_s == tp4.prefill_s
  assert dp.concurrency == 2 * tp4.concurrency
  # Each device reads half the users' caches of the model:4 step, and all its weights.
  assert dp.decode_bytes_per_device == pytest.approx(
      tp4.decode_bytes_per_device - tp4.kv_bytes_per_user_per_device, rel=0.01)
  sp = metrics.from_hlo(CFG, HW, "seq:2,model:4", T)
  assert sp.kv_bytes_per_user_per_device == pytest.approx(tp4.kv_bytes_per_user_per_device / 2)
  assert sp.weight_bytes_per_device == tp4.weight_bytes_per_device
  with pytest.raises(ValueError, match="batch 1 must be a multiple of the mesh's data size 2"):
    metrics.from_hlo(CFG, HW, "data:2,model:4", T, B=1)
  assert math.isclose(metrics.ratios(metrics.from_closed_form(CFG, HW, 4, T), tp4)["kv_bytes_per_user_per_device"], 1.0)


# ---- collective time: latency + ring bytes over one direction of the links ----------

def _one(kind: str, nbytes: float, p: int, count: float = 1) -> hlo.Costs:
  return hlo.Costs(collective_ops=[(kind, nbytes, p, count)])


@pytest.mark.parametrize("kind, factor", [
    ("all-reduce", 2 * 7 / 8),  # reduce-scatter then all-gather: 2(p-1)/p of the buffer
    ("all-gather", 7 / 8),  # (p-1)/p of the gathered output
    ("reduce-scatter", 7 / 8),  # (p-1)/p of the input
    ("all-to-all", 7 / 8),
    ("collective-permute", 1.0),  # the whole buffer to one peer
    ("collective-broadcast", 1.0),
])
def test_one_collective_of_a_gigabyte_over_8_a100s(kind, factor):
  want = HW.collective_latency + factor * 1e9 / NVLINK
  assert metrics.roofline_seconds(_one(kind, 1e9, 8), HW, "bfloat16") == pytest.approx(want)
  # Every count multiplies (a loop's trips), latency included.
  assert metrics.roofline_seconds(_one(kind, 1e9, 8, 3), HW, "bfloat16") == pytest.approx(3 * want)
  # A collective over one device moves nothing and waits for no one.
  assert metrics.roofline_seconds(_one(kind, 1e9, 1, 5), HW, "bfloat16") == 0


def test_all_reduce_seconds_literal():
  """Independently of the code's tables: 15 us + 1.75 GB / 300 GB/s."""
  t = metrics.roofline_seconds(_one("all-reduce", 1e9, 8), HW, "bfloat16")
  assert t == pytest.approx(1.5e-5 + 1.75e9 / 3e11)


def test_small_collectives_cost_their_latency():
  """yi-34b decode on model:8 at 4K: 121 all-reduces of a 14 KB activation
  are latency-bound, ~1.8 ms per step (not the 5 us of bandwidth alone)."""
  t = metrics.roofline_seconds(_one("all-reduce", 7168 * 2, 8, 121), HW, "bfloat16")
  assert t == pytest.approx(121 * (1.5e-5 + 1.75 * 14336 / 3e11))
  assert 1.7e-3 < t < 1.9e-3


def test_unknown_collective_kind_raises():
  with pytest.raises(ValueError, match="all-shuffle"):
    metrics.roofline_seconds(_one("all-shuffle", 1e9, 8), HW, "bfloat16")


def test_yi34b_prefill_all_reduces_its_activations():
  """Prefill at T=50000 on model:8 (bf16): per device, 121 all-reduces of the
  [T, D] activations over 8 devices (2 per layer + 1 after the embedding
  lookup), 121 x 50000 x 7168 x 2 bytes; the roofline charges each one
  latency + 2 (7/8) x bytes / 300 GB/s."""
  costs = metrics.program_costs(CFG, "model:8", 50000, 1, "prefill")
  assert dict(costs.collectives) == {"all-reduce": 121 * 50000 * 7168 * 2}
  assert {p for _, _, p, _ in costs.collective_ops} == {8}
  assert comm_seconds(costs) == pytest.approx(
      121 * (1.5e-5 + 2 * 7 / 8 * 50000 * 7168 * 2 / 3e11), rel=1e-9)


@pytest.mark.parametrize("mesh", ["model:2", "data:2,model:2"])
def test_sweep_decode_steps_between_the_ends_are_interpolated_exactly(mesh):
  """programs(decode_span=(lo, hi)) interpolates a decode step between the
  sweep's ends: every field equals the step compiled at that context (peak
  temporaries included) on meshes without seq."""
  config = lctx.ModelConfig.from_preset("small")
  got = metrics.programs(config, mesh, 3000, 2, "float32", None, (512, 8192))["decode"][2]
  want = metrics.program_costs(config.replace(param_dtype="float32", dtype="float32"), mesh,
                               3000, 2, "decode")
  assert got is not want  # interpolated, not the compiled program
  for f in ("flops", "bytes_ideal", "bytes_upper", "temp_bytes", "copy_bytes", "transcendentals"):
    assert getattr(got, f) == pytest.approx(getattr(want, f), rel=1e-9), f
  assert got.kernels == want.kernels and got.collectives == pytest.approx(want.collectives)


def test_seq_mesh_decode_steps_are_compiled_not_interpolated():
  config = lctx.ModelConfig.from_preset("small").replace(param_dtype="float32", dtype="float32")
  got = metrics.programs(config, "seq:2", 2048, 1, "float32", None, (512, 8192))["decode"][2]
  assert got is metrics.program_costs(config, "seq:2", 2048, 1, "decode")
