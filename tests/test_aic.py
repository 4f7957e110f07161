"""AIConfigurator's own predictions of the published rows (lctx.cost.aic): finite
and positive on a handful of rows, equal to the Rust engine's step latencies
put through AIConfigurator's documented agg formulas (an independent path),
and a ValueError naming the field for rows it cannot take."""

import dataclasses
import math
import sys

from packaging.version import Version
import pytest
from conftest import importorskip

importorskip("aiconfigurator_core")

from lctx.cost import aic, published  # noqa: E402


@pytest.fixture(scope="module")
def rows():
  return published.read_rows()[0]


def find(rows, **fields):
  """The first row with these field values."""
  return next(r for r in rows if all(getattr(r, k) == v for k, v in fields.items()))


# One row per backend, and one whose checkpoint AIConfigurator does not ship.
QWEN = dict(hf_model="Qwen/Qwen3-32B", system="h100_sxm", isl=1024, osl=128)
VLLM = dict(QWEN, backend="vllm", tp=2, concurrency=8, quant_mode="")
TRTLLM = dict(QWEN, backend="trtllm", tp=1, concurrency=8, quant_mode="fp8")
SGLANG = dict(QWEN, backend="sglang", tp=2, concurrency=16)
LLAMA = dict(hf_model="meta-llama/Llama-3.1-8B-Instruct", backend="trtllm", tp=1, concurrency=8,
             isl=1024, osl=128)


@pytest.mark.parametrize("fields", [VLLM, TRTLLM, SGLANG, LLAMA],
                         ids=["vllm", "trtllm", "sglang", "llama-alias"])
def test_predictions_are_finite_and_positive(rows, fields):
  row = find(rows, **fields)
  p = aic.predict(row)
  assert isinstance(p, aic.AicPrediction)
  assert math.isfinite(p.ttft_s) and p.ttft_s > 0
  assert math.isfinite(p.tpot_s) and p.tpot_s > 0
  assert p.ttft_s > p.tpot_s  # a 1024-token prefill step outlasts a decode step
  assert p.mode == "SILICON"
  queryable, _ = aic._versions(row.system, row.backend)
  assert p.database_version in queryable
  # None of these rows' versions has a database in 0.12.0: the note says so.
  assert (row.backend_version in p.note) == (row.backend_version not in queryable)
  assert (row.hf_model in aic.ALIASES) == ("not shipped" in p.note)
  pandas = sys.modules.get("pandas")  # aic's stand-in (no pandas) is gone after the import
  assert pandas is None or "placeholder" not in (pandas.__doc__ or "")


def test_equals_engine_steps_through_the_agg_formulas(rows):
  """The same numbers from AIConfigurator's compiled engine (sdk/engine.py
  EngineHandle, its documented per-step surface) and the agg scheduling of
  sdk/backends/base_backend.py run_agg with ctx_tokens = isl (one request's
  prefill per mixed step, C mixed steps, then decode-only steps)."""
  from aiconfigurator_core.sdk.engine import EngineHandle

  def engine(row, version):
    return EngineHandle.compile(row.hf_model, row.system, row.backend, backend_version=version,
                                tp_size=row.tp, gemm_quant_mode=row.quant_mode or None)

  # vLLM (vllm_backend.py): C-1 decode requests ride each mixed step; TTFT adds
  # 0.8 ms per layer of dispatch and queues by min(1 + log2(C)/8, 2).
  row = find(rows, **VLLM)
  p = aic.predict(row)
  e = engine(row, p.database_version)
  c, isl, osl = row.concurrency, row.isl, row.osl
  assert 1 < c < osl
  mix, dec = e.mixed_step_latency(isl, c - 1, isl, osl), e.decode_step_latency(c, isl, osl)
  layers = 64  # Qwen3-32B
  ttft_ms = (mix + 0.8 * layers) * min(1 + math.log2(c) / 8, 2)
  tpot_ms = (mix * c + dec * (osl - c)) / osl
  assert p.ttft_s == pytest.approx(ttft_ms / 1e3, rel=1e-9)
  assert p.tpot_s == pytest.approx(tpot_ms / 1e3, rel=1e-9)

  # TRT-LLM (trtllm_backend.py): TTFT queues by min(2 + (C-3)/20, 4); TPOT
  # counts only max(1, C-3) of the C mixed steps.
  row = find(rows, **TRTLLM)
  p = aic.predict(row)
  e = engine(row, p.database_version)
  c, isl, osl = row.concurrency, row.isl, row.osl
  mix, dec = e.mixed_step_latency(isl, c - 1, isl, osl), e.decode_step_latency(c, isl, osl)
  mixed = max(1, c - 3)
  assert p.ttft_s == pytest.approx(mix * min(2 + (c - 3) / 20, 4) / 1e3, rel=1e-9)
  assert p.tpot_s == pytest.approx((mix * mixed + dec * (osl - c)) / (mixed + osl - c) / 1e3,
                                   rel=1e-9)


def test_database_version_choice():
  queryable, default = aic._versions("h100_sxm", "trtllm")
  assert default in queryable
  ordered = sorted(queryable, key=Version)
  for version in queryable:
    assert aic.database_version("h100_sxm", "trtllm", version) == (version, "")
  assert aic.database_version("h100_sxm", "trtllm", "")[0] == default
  chosen, note = aic.database_version("h100_sxm", "trtllm", "1.0.0rc3")  # older than all
  assert chosen == ordered[0] and "1.0.0rc3" in note
  assert aic.database_version("h100_sxm", "trtllm", "99.0.0")[0] == ordered[-1]


@pytest.mark.parametrize("change, field", [
    (dict(backend="tgi"), "backend"),
    (dict(tp=0), "tp"),
    (dict(concurrency=-1), "concurrency"),
    (dict(osl=1.5), "osl"),
    (dict(quant_mode="int3"), "quant_mode"),
    (dict(hf_model="example/not-a-model"), "hf_model"),
    (dict(system="tpu_v5e"), "system"),
])
def test_bad_row_raises_naming_the_field(rows, change, field):
  row = dataclasses.replace(find(rows, **VLLM), **change)
  with pytest.raises(ValueError, match=f"^{field}"):
    aic.predict(row)


def test_missing_package_raises_with_the_pip_command(rows, monkeypatch):
  monkeypatch.setattr(aic, "available", lambda: False)
  with pytest.raises(ImportError, match="pip install"):
    aic.predict(find(rows, **VLLM))
