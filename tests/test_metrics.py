"""The four metrics from the compiled HLO against the closed form (yi-34b, A100 80GB)."""

import pytest

import lctx
from lctx.cost import metrics
from lctx.cost.hardware import load_hardware

CFG = lctx.ModelConfig.from_preset("yi-34b", param_dtype="bfloat16", dtype="bfloat16")
HW = load_hardware("a100-80g-sxm")


@pytest.mark.parametrize("g", [1, 8])
@pytest.mark.parametrize("T", [4000, 50000])
def test_hlo_metrics_agree_with_closed_form(g, T):
  a = metrics.from_closed_form(CFG, HW, g, T)
  h = metrics.from_hlo(CFG, HW, g, T)
  assert (a.source, h.source) == ("analytic", "hlo")
  assert h.concurrency == a.concurrency  # T11, T14: 20 users on 4, 46 on 8 at 50K
  assert h.weight_bytes_per_device == pytest.approx(a.weight_bytes_per_device, rel=0.01)
  assert h.kv_bytes_per_user == pytest.approx(a.kv_bytes_per_user, rel=1e-9)
  assert h.decode_bytes_per_device == pytest.approx(a.decode_bytes_per_device, rel=0.05)
  assert h.decode_step_s == pytest.approx(a.decode_step_s, rel=0.05)
  assert h.prefill_flops_per_device == pytest.approx(a.prefill_flops_per_device, rel=0.05)
  if g == 1:
    assert h.prefill_s == pytest.approx(a.prefill_s, rel=0.05)
  else:  # the closed form treats tensor parallelism as free; the HLO pays its all-reduces
    assert a.prefill_s < h.prefill_s < 1.5 * a.prefill_s


def test_nothing_fits_reports_the_shortfall():
  h = metrics.from_hlo(CFG, HW, 1, 50000)
  assert h.concurrency == 0
  # 80 GB minus 68.8 GB of weights leaves 11.2 GB; one user needs 12.29 GB.
  assert h.shortfall_bytes == pytest.approx(12.288e9 - (80e9 - CFG.param_bytes()), rel=1e-6)
