"""The reader of aiconfigurator-core's published serving measurements
(lctx.cost.published): the row mapping on a small CSV written here with the
real column layout, and the installed 0.12.0 file itself."""

import csv
import importlib.metadata
import importlib.util

import pytest
from conftest import in_ci

from lctx.config import list_presets
from lctx.cost import published
from lctx.cost.hardware import list_hardware
from lctx.cost.published import ServingRow

# The header of systems/silicon_sample.csv in aiconfigurator-core 0.12.0.
HEADER = (
    "id,silicon_data_source,backend,backend_version,model_path,system,precision,mode,isl,osl,"
    "gemm_quant_mode,moe_quant_mode,batch_size,tp_size,pp_size,attention_dp_size,moe_tp_size,"
    "moe_ep_size,prefill_batch_size,prefill_num_workers,prefill_tp_size,prefill_pp_size,"
    "prefill_attention_dp_size,prefill_moe_tp_size,prefill_moe_ep_size,decode_batch_size,"
    "decode_num_workers,decode_tp_size,decode_pp_size,decode_attention_dp_size,"
    "decode_moe_tp_size,decode_moe_ep_size,silicon_ttft_ms,silicon_tpot_ms").split(",")

AGG = dict(mode="agg", pp_size="1", attention_dp_size="1", backend_version="1.0.0rc3")
# (fields, expected: a ServingRow less index/row_id/hf_model, or the skip reason)
CASES = [
    (dict(model_path="meta-llama/Llama-3.1-8B-Instruct", system="h100_sxm", backend="trtllm",
          isl="1024", osl="128", batch_size="16", tp_size="2", attention_dp_size="",
          silicon_data_source="source_file=x.csv; silicon_concurrency=16",
          silicon_ttft_ms="250.0", silicon_tpot_ms="12.5"),
     dict(model="llama-3.1-8b", system="h100_sxm", hardware="h100-sxm", backend="trtllm",
          backend_version="1.0.0rc3", tp=2, concurrency=16, isl=1024, osl=128, quant_mode="",
          weight_dtype="bfloat16", kv_dtype="bfloat16", ttft_s=0.25, tpot_s=0.0125)),
    (dict(model_path="meta-llama/Llama-3.1-70B", system="h200_sxm", backend="vllm",
          backend_version="", precision="fp8", gemm_quant_mode="fp8", moe_quant_mode="fp8",
          isl="8192", osl="1024", batch_size="64", tp_size="8", attention_dp_size="0",
          silicon_data_source="source_file=2026-04-06.csv; wip=False",
          silicon_ttft_ms="1500", silicon_tpot_ms="20"),
     dict(model="llama-3.1-70b", system="h200_sxm", hardware="h200", backend="vllm",
          backend_version="", tp=8, concurrency=64, isl=8192, osl=1024, quant_mode="fp8",
          weight_dtype="float8", kv_dtype="bfloat16", ttft_s=1.5, tpot_s=0.02)),
    (dict(model_path="Qwen/Qwen3-32B", system="b200_sxm", backend="sglang",
          backend_version="0.5.6.post2", precision="fp8", gemm_quant_mode="fp8_block",
          isl="2048", osl="512", batch_size="4", tp_size="4", silicon_ttft_ms="100",
          silicon_tpot_ms="8"),
     dict(model="qwen3-32b", system="b200_sxm", hardware="b200", backend="sglang",
          backend_version="0.5.6.post2", tp=4, concurrency=4, isl=2048, osl=512,
          quant_mode="fp8_block", weight_dtype="float8", kv_dtype="bfloat16", ttft_s=0.1,
          tpot_s=0.008)),
    # Pre-quantized checkpoint, quant mode left to the checkpoint: fp8 weights and KV.
    (dict(model_path="nvidia/Llama-3.1-8B-Instruct-FP8", system="h200_sxm", backend="vllm",
          backend_version="0.12.0", isl="1000", osl="100", batch_size="112", tp_size="1",
          silicon_ttft_ms="71.91", silicon_tpot_ms="11.25"),
     dict(model="llama-3.1-8b", system="h200_sxm", hardware="h200", backend="vllm",
          backend_version="0.12.0", tp=1, concurrency=112, isl=1000, osl=100, quant_mode="",
          weight_dtype="float8", kv_dtype="float8", ttft_s=71.91 / 1e3, tpot_s=11.25 / 1e3)),
    (dict(model_path="deepseek-ai/DeepSeek-R1", system="b200_sxm", gemm_quant_mode="nvfp4"),
     "MoE model deepseek-ai/DeepSeek-R1 (lctx costs dense decoders)"),
    (dict(model_path="mistralai/Mistral-7B-v0.1", system="h100_sxm"),
     "model mistralai/Mistral-7B-v0.1 has no lctx preset"),
    (dict(model_path="Qwen/Qwen3-32B", system="gb200"), "system gb200 has no lctx hardware preset"),
    (dict(model_path="meta-llama/Llama-3.1-70B", system="b200_sxm", precision="fp4",
          gemm_quant_mode="nvfp4"),
     "weight quantization nvfp4 (lctx has bf16 and fp8 peaks only)"),
    (dict(model_path="nvidia/Qwen3-32B-NVFP4", system="b200_sxm"),
     "weight quantization nvfp4 (lctx has bf16 and fp8 peaks only)"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", mode="disagg", batch_size="",
          tp_size="", pp_size="", attention_dp_size="", prefill_tp_size="1", decode_tp_size="4"),
     "disagg serving mode (lctx costs aggregated serving: one worker does prefill and decode)"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", pp_size="2"),
     "pipeline parallel (lctx meshes have no pipeline axis)"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", attention_dp_size="2"),
     "attention data parallel (lctx replicates whole models only)"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", batch_size="144",
          silicon_data_source="source_file=x.csv; silicon_concurrency=288"),
     "client concurrency differs from batch_size (several workers)"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", tp_size=""),
     "missing parallelism, batch or length"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", silicon_tpot_ms=""),
     "missing TTFT or TPOT"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm", silicon_ttft_ms="0"),
     "non-positive TTFT or TPOT"),
    (dict(model_path="Qwen/Qwen3-32B", system="h100_sxm",
          silicon_data_source="source_file=x.csv; wip=True"), "measurement marked wip=True"),
]


def write_csv(path, cases, header=HEADER):
  """One CSV row per case: AGG and a valid default under the case's fields."""
  base = dict(AGG, backend="trtllm", isl="1024", osl="1024", batch_size="8", tp_size="1",
              silicon_data_source="source_file=x.csv", silicon_ttft_ms="100",
              silicon_tpot_ms="10")
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header, restval="")
    w.writeheader()
    for i, (fields, _) in enumerate(cases):
      w.writerow({**base, "id": f"row{i}", **fields})
  return path


def test_rows_map_field_by_field(tmp_path):
  rows, skipped = published.read_rows(write_csv(tmp_path / "s.csv", CASES))
  kept = [(i, c) for i, c in enumerate(CASES) if isinstance(c[1], dict)]
  assert rows == [ServingRow(index=i, row_id=f"row{i}", hf_model=fields["model_path"], **want)
                  for i, (fields, want) in kept]
  assert [r.mesh for r in rows] == ["model:2", "model:8", "model:4", "model:1"]
  # Every other row is listed with its reason, in file order.
  assert skipped == [(i, c[1]) for i, c in enumerate(CASES) if isinstance(c[1], str)]
  assert len(rows) + len(skipped) == len(CASES)


def test_summary_counts(tmp_path):
  rows, skipped = published.read_rows(write_csv(tmp_path / "s.csv", CASES))
  text = published.summary(rows, skipped)
  assert text.splitlines()[0] == f"4 rows lctx can cost, {len(CASES) - 4} skipped"
  assert "h100-sxm   trtllm  tp=2      1" in text
  assert "    2  weight quantization nvfp4 (lctx has bf16 and fp8 peaks only)" in text


def test_missing_column_is_an_error(tmp_path):
  header = [c for c in HEADER if c != "silicon_tpot_ms"]
  with pytest.raises(ValueError, match="silicon_tpot_ms"):
    published.read_rows(write_csv(tmp_path / "s.csv", CASES[:1], header))


def test_csv_path_names_the_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install aiconfigurator-core==0\.12\.0"):
    published.csv_path()


def installed_csv():
  """The installed CSV; skips when aiconfigurator-core is absent, except in CI,
  where it fails (CI must install the `validate` extra)."""
  try:
    path = published.csv_path()
  except FileNotFoundError as e:
    if in_ci():
      pytest.fail(f"{e}; CI requires it", pytrace=False)
    pytest.skip(str(e))
  assert importlib.metadata.version("aiconfigurator-core") == "0.12.0", "spot checks read 0.12.0"
  return path


def test_installed_csv():
  path = installed_csv()
  with open(path, newline="") as f:
    n = sum(1 for _ in csv.DictReader(f))
  rows, skipped = published.read_rows()
  assert n == 5221 and len(rows) + len(skipped) == n
  assert sorted([r.index for r in rows] + [i for i, _ in skipped]) == list(range(n))
  assert {r.model for r in rows} == {"llama-3.1-8b", "llama-3.1-70b", "qwen3-32b"}
  assert {r.model for r in rows} <= set(list_presets())
  assert {r.hardware for r in rows} == {"h100-sxm", "h200", "b200"} <= set(list_hardware())
  assert {r.backend for r in rows} == {"trtllm", "vllm", "sglang"}
  assert len(rows) == 910
  by_index = {r.index: r for r in rows}
  # Read by hand from the file (line = index + 2).
  assert by_index[1305] == ServingRow(
      index=1305,
      row_id="meta_llama_llama_3_1_8b_instruct_meta_llama_llama_3_1_8b_instruct_h100_sxm_"
             "trtllm_agg_1024x128_c8_tp1_epnone_1",
      hf_model="meta-llama/Llama-3.1-8B-Instruct", model="llama-3.1-8b", system="h100_sxm",
      hardware="h100-sxm", backend="trtllm", backend_version="1.0.0rc3", tp=1, concurrency=8,
      isl=1024, osl=128, quant_mode="", weight_dtype="bfloat16", kv_dtype="bfloat16",
      ttft_s=190.9545068625 / 1e3, tpot_s=7.94357745 / 1e3)
  r = by_index[3499]  # llama_3_1_70b_h200_sxm_trtllm_fp8_agg_1024x8192_c128_tp1
  assert (r.model, r.hardware, r.backend, r.backend_version, r.tp, r.concurrency, r.isl, r.osl,
          r.weight_dtype, r.kv_dtype) == ("llama-3.1-70b", "h200", "trtllm", "", 1, 128, 1024,
                                          8192, "float8", "bfloat16")
  assert (r.ttft_s, r.tpot_s) == (pytest.approx(368.96720149198046),
                                  pytest.approx(0.03042062744866144))
  r = by_index[1709]  # nvidia/Llama-3.1-8B-Instruct-FP8, vLLM 0.12.0 on H200
  assert (r.model, r.hardware, r.tp, r.concurrency, r.isl, r.osl, r.weight_dtype, r.kv_dtype,
          r.ttft_s, r.tpot_s) == ("llama-3.1-8b", "h200", 1, 112, 1000, 100, "float8", "float8",
                                  pytest.approx(0.07191), pytest.approx(0.01125))
  r = by_index[1002]  # Qwen3-32B bf16 on one H100, SGLang 0.5.8.post1
  assert (r.model, r.hardware, r.backend, r.tp, r.concurrency, r.weight_dtype) == (
      "qwen3-32b", "h100-sxm", "sglang", 1, 16, "bfloat16")
  reasons = dict(skipped)
  assert reasons[0] == "MoE model MiniMaxAI/MiniMax-M2.5 (lctx costs dense decoders)"
  assert reasons[892] == "system gb200 has no lctx hardware preset"  # Qwen3-32B on GB200
  assert reasons[3688] == "weight quantization nvfp4 (lctx has bf16 and fp8 peaks only)"
  assert sum(reason.startswith("MoE model") for reason in reasons.values()) == 4150


def test_validate_cost_predicts_every_modellable_row(tmp_path):
  """experiments.validate_cost on the synthetic CSV: every row is predicted by
  the closed form through the serving model (checked against the formulas
  here, fp8 weights at the fp8 peak and the fp8 cache at 1 byte), rows with a
  bf16 cache also from the compiled programs in both modes (roofline checked
  against metrics.roofline_seconds of the same programs)."""
  import json
  import subprocess
  import sys
  from pathlib import Path

  import lctx
  from lctx.cost import analytic, hardware, serving
  path = write_csv(tmp_path / "s.csv", CASES)
  out = tmp_path / "v.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.validate_cost", f"--csv={path}",
                         "--noaic", f"--json_out={out}", f"--plot_out={tmp_path / 'v.png'}"],
                        cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  rows = {r["index"]: r for r in result["rows"]}
  # Every row lctx can model is predicted (the 4 dense GPU rows); the rest are listed.
  assert len(rows) == 4 and len(rows) + len(result["skipped"]) == len(CASES)
  by_model = {(r["model"], r["hardware"]): r for r in rows.values()}
  # CASES[0]: llama-3.1-8b bf16, h100, tp 2, 16 users, 1024 / 128.
  row = by_model[("llama-3.1-8b", "h100-sxm")]
  config = lctx.ModelConfig.from_preset("llama-3.1-8b", param_dtype="bfloat16", dtype="bfloat16")
  hw = hardware.load_hardware("h100-sxm")
  prefill = analytic.prefill_seconds(config, 1024, hw, 2, "bfloat16", "exact")
  step = analytic.decode_step_seconds(config, 16, 1024 + 64, hw, 2, "bfloat16", "exact")
  want = serving.steady_state(prefill, step, 16, 1024, 128)
  assert row["closed_form_ttft_s"] == pytest.approx(want.ttft_s)
  assert row["closed_form_tpot_s"] == pytest.approx(want.tpot_s)
  assert row["closed_form_ttft_burst_s"] == pytest.approx(want.ttft_burst_s)
  assert row["measured_tpot_s"] == 0.0125 and row["fits"]
  # Calibrated (sourced efficiencies below 1, floors) is slower than the roofline.
  assert row["calibrated_tpot_s"] > row["roofline_tpot_s"] > 0
  # CASES[3]: fp8 weights and cache, h200, tp 1, 112 users, 1000 / 100: closed form only.
  row = by_model[("llama-3.1-8b", "h200")]
  h200 = hardware.load_hardware("h200")
  prefill = analytic.prefill_seconds(config, 1000, h200, 1, "float8")
  step = analytic.decode_step_seconds(config, 112, 1050, h200, 1, "float8", kv_dtype="float8")
  assert row["closed_form_tpot_s"] == pytest.approx(
      serving.steady_state(prefill, step, 112, 1000, 100).tpot_s)
  assert "calibrated_tpot_s" not in row and "roofline_tpot_s" not in row
  assert (tmp_path / "v.png").stat().st_size > 0
