"""The four metrics from the compiled HLO against the closed form (yi-34b, A100 80GB)."""

import math

import pytest

import lctx
from lctx.cost import analytic, metrics
from lctx.cost.hardware import load_hardware

CFG = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
HW = load_hardware("a100-80g-sxm")


@pytest.mark.parametrize("g", [1, 8])
@pytest.mark.parametrize("T", [4000, 50000])
def test_hlo_metrics_agree_with_closed_form(g, T):
  a = metrics.from_closed_form(CFG, HW, g, T)
  h = metrics.from_hlo(CFG, HW, g, T)
  assert (a.source, h.source, a.mesh, h.mesh) == ("analytic", "hlo", f"model:{g}", f"model:{g}")
  assert h.weight_bytes_per_device == pytest.approx(a.weight_bytes_per_device, rel=0.01)
  assert h.kv_bytes_per_user == pytest.approx(a.kv_bytes_per_user, rel=1e-9)
  assert h.decode_bytes_per_device == pytest.approx(a.decode_bytes_per_device, rel=0.02)
  assert h.decode_step_s == pytest.approx(a.decode_step_s, rel=0.02)
  assert h.prefill_flops_per_device == pytest.approx(a.prefill_flops_per_device, rel=0.05)
  # The compiled swap moves each device's share of two users' caches over its
  # own host link; the closed form pushes both whole caches through one.
  assert h.context_switch_s == pytest.approx(2 * h.kv_bytes_per_user / HW.host_bandwidth)
  assert h.context_switch_s == pytest.approx(a.context_switch_s / g)
  if g == 1:
    assert h.prefill_s == pytest.approx(a.prefill_s, rel=0.05)
  else:  # the closed form treats tensor parallelism as free; the HLO pays its all-reduces
    assert a.prefill_s < h.prefill_s < 1.5 * a.prefill_s
  # Concurrency: the closed form with the compiled programs' temporaries reserved
  # (a decode step of one user holds next to nothing; a one-pass prefill holds
  # its activations).
  assert h.temp_bytes_per_device < 1e-3 * h.kv_bytes_per_user
  assert 0 < h.prefill_temp_bytes_per_device < 5e9
  reserved = analytic.concurrency(CFG, T, HW, g, "bfloat16",
                                  reserve_bytes=g * h.prefill_temp_bytes_per_device)
  assert h.concurrency == reserved.users <= a.concurrency


def test_concurrency_reference_points():
  """FRAMEWORK.md T11 and T14 (50K context, exact parameters, decimal GB)."""
  got = [metrics.from_closed_form(CFG, HW, g, 50000).concurrency for g in (1, 2, 4, 8)]
  assert got == [0, 7, 20, 46]


def test_nothing_fits_reports_the_shortfall():
  a, h = metrics.from_closed_form(CFG, HW, 1, 50000), metrics.from_hlo(CFG, HW, 1, 50000)
  assert a.concurrency == h.concurrency == 0
  # 80 GB minus 68.8 GB of weights leaves 11.2 GB; one user needs 12.29 GB,
  # and the HLO's prefill holds its activations beside it.
  assert a.shortfall_bytes == pytest.approx(12.288e9 - (80e9 - CFG.param_bytes()), rel=1e-6)
  assert h.shortfall_bytes == pytest.approx(
      a.shortfall_bytes + h.prefill_temp_bytes_per_device, rel=1e-6)
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
  assert dp.kv_bytes_per_user == tp4.kv_bytes_per_user
  assert dp.prefill_s == tp4.prefill_s
  assert dp.concurrency == 2 * tp4.concurrency
  # Each device reads half the users' caches of the model:4 step, and all its weights.
  assert dp.decode_bytes_per_device == pytest.approx(
      tp4.decode_bytes_per_device - tp4.kv_bytes_per_user, rel=0.01)
  sp = metrics.from_hlo(CFG, HW, "seq:2,model:4", T)
  assert sp.kv_bytes_per_user == pytest.approx(tp4.kv_bytes_per_user / 2)
  assert sp.weight_bytes_per_device == tp4.weight_bytes_per_device
  with pytest.raises(ValueError, match="batch 1 must be a multiple of the mesh's data size 2"):
    metrics.from_hlo(CFG, HW, "data:2,model:4", T, B=1)
  assert math.isclose(metrics.ratios(metrics.from_closed_form(CFG, HW, 4, T), tp4)["kv_bytes_per_user"], 1.0)
