"""The main job end to end on a small sweep (subprocess, 8 fake devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lctx

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"model", "hardware", "num_devices", "context", "batch", "source",
          "kv_bytes_per_user_per_device", "kv_bytes_per_user_total", "weight_bytes_per_device", "concurrency", "prefill_flops_per_device", "prefill_s",
          "decode_bytes_per_device", "decode_step_s", "context_switch_s", "mesh",
          "decode_temp_bytes_per_device", "prefill_temp_bytes_per_device", "decode_tokens_per_s",
          "sessions_per_hour", "shortfall_bytes_per_device"}


def _run(*flags, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.peak_analysis", *flags], cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                        text=True, timeout=timeout)


def test_peak_analysis_rows_and_plot(tmp_path):
  out, png = tmp_path / "rows.json", tmp_path / "plot.png"
  proc = _run("--contexts=4000,50000", "--num_devices=1,4", f"--json_out={out}",
              f"--plot_out={png}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert len(rows) == 2 * 2 * 2 and FIELDS <= set(rows[0])
  by = {(r["context"], r["num_devices"], r["source"]): r for r in rows}
  # FRAMEWORK.md T11: 20 users of 50K tokens fit on 4 A100s (decimal GB, exact
  # params); the HLO also reserves the prefill's activations: those of the
  # default 8192-token chunk (0.68 GB per device) leave room for all 20.
  assert by[(50000, 4, "analytic")]["concurrency"] == 20
  assert by[(50000, 4, "hlo")]["concurrency"] == 20
  assert by[(50000, 4, "hlo")]["prefill_chunk"] == 8192
  assert by[(50000, 4, "hlo")]["prefill_temp_bytes_per_device"] < 1e9
  for (T, g, source), r in by.items():
    if source == "analytic":
      continue
    other = by[(T, g, "analytic")]
    # The compiled step on g > 1 GPUs also pays 121 latency-bound all-reduces
    # (2 per layer + the embedding's) of a [1, 7168] bf16 row, each 15 us +
    # 2(g-1)/g x bytes over 300 GB/s (A100 NVLink, one direction).
    comm = 0 if g == 1 else 121 * (1.5e-5 + 2 * (g - 1) / g * 7168 * 2 / 300e9)
    assert r["decode_step_s"] - comm == pytest.approx(other["decode_step_s"], rel=0.01)
    ratios = r["hlo_over_analytic"]
    assert ratios["decode_step_s"] == pytest.approx(r["decode_step_s"] / other["decode_step_s"])
  assert png.stat().st_size > 10_000
  assert "decode ms/tok" in proc.stdout and "sessions/hour" in proc.stdout
  # 50K on one A100: 80 GB - 68.78 GB of weights < 12.29 GB of cache.
  assert "context 50000 on model:1: analytic 1.07 GB short per device" in proc.stdout
  assert "prefill chunk 8192" in proc.stdout


def test_one_pass_prefill_reserves_its_activations(tmp_path):
  """--prefill_chunk=0: the one-pass prefill's temporaries (2.92 GB per device
  at 50K on model:4) cost one user."""
  out = tmp_path / "rows.json"
  proc = _run("--contexts=50000", "--num_devices=4", "--prefill_chunk=0", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  by = {r["source"]: r for r in json.loads(out.read_text())}
  assert by["hlo"]["concurrency"] == 19 and by["hlo"]["prefill_chunk"] == 0
  assert "prefill chunk none (one pass)" in proc.stdout


def test_peak_analysis_meshes_and_op_table(tmp_path):
  out, ops = tmp_path / "rows.json", tmp_path / "ops.json"
  proc = _run("--contexts=4000", "--mesh=seq:2,model:2", "--mesh=data:2,model:2", "--batch=2",
              f"--json_out={out}", f"--op_table_out={ops}", "--top_ops=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {(r["mesh"], r["source"]): r for r in json.loads(out.read_text())}
  assert set(rows) == {(m, s) for m in ("seq:2,model:2", "data:2,model:2")
                       for s in ("analytic", "hlo")}
  assert all(r["num_devices"] == 4 for r in rows.values())
  # seq:2 halves each device's share of a cache; data:2 keeps whole model:2 replicas.
  assert rows[("seq:2,model:2", "hlo")]["kv_bytes_per_user_per_device"] == pytest.approx(
      rows[("data:2,model:2", "hlo")]["kv_bytes_per_user_per_device"] / 2)
  table = json.loads(ops.read_text())
  assert {(t["mesh"], t["kind"]) for t in table} == {
      ("seq:2,model:2", "prefill"), ("seq:2,model:2", "decode"),
      ("model:2", "prefill"), ("data:2,model:2", "decode")}
  for t in table:
    seconds = [op["seconds"] for op in t["ops"]]
    assert len(seconds) == 5 and seconds == sorted(seconds, reverse=True)
    assert all(op["op_name"] for op in t["ops"])


def test_model_axis_beyond_the_kv_heads(tmp_path):
  """llama-3.1-70b (N=64, K=8) bf16 at 32K on 16 H100s: each device holds the one
  KV head its query heads read, 1/8 of a user's cache (1.34 GB, as on model:8),
  not all 8 heads (10.74 GB, concurrency 3 before); a one-line note says so."""
  out = tmp_path / "rows.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=16"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.peak_analysis", "--model=llama-3.1-70b",
       "--hardware=h100-sxm", "--contexts=32768", "--mesh=model:8", "--mesh=model:16",
       f"--json_out={out}"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "note: mesh model:16: the model axis (16) exceeds the 8 KV heads" in proc.stdout
  assert "replicated on 2 devices" in proc.stdout
  rows = {(r["mesh"], r["source"]): r for r in json.loads(out.read_text())}
  total = 32768 * 2 * 80 * 8 * 128 * 2  # T x 2 L K H x bf16
  for mesh in ("model:8", "model:16"):
    assert rows[(mesh, "hlo")]["kv_bytes_per_user_total"] == total
    assert rows[(mesh, "analytic")]["kv_bytes_per_user_total"] == total
    assert rows[(mesh, "hlo")]["kv_bytes_per_user_per_device"] == total / 8
  assert rows[("model:16", "hlo")]["concurrency"] >= rows[("model:8", "hlo")]["concurrency"] >= 40


def test_peak_analysis_rejects_a_bad_mesh():
  proc = _run("--contexts=4000", "--mesh=tensor:4", timeout=300)
  assert proc.returncode != 0 and "unknown axis 'tensor'" in proc.stderr
  proc = _run("--contexts=4000", "--mesh=seq:4,model:2", "--prefill_chunk=6", timeout=300)
  assert proc.returncode != 0
  assert "--prefill_chunk: prefill chunk=6 on a mesh with seq:4: allowed: 0" in proc.stderr


def test_chunked_prefill_on_a_seq_mesh(tmp_path):
  """yi-34b at 50K on seq:2,model:4: the chunked prefill runs on the seq mesh
  (each device its slice of the cache). Its 0.55 GB of temporaries per device
  (one pass: 1.75 GB) let 40 users fit where one pass fits 39; the closed
  form's 46 splits the weights 8 ways, where seq:2 replicates them (17.2 GB
  per device, not 8.6)."""
  out = tmp_path / "rows.json"
  proc = _run("--contexts=50000", "--mesh=seq:2,model:4", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  by = {r["source"]: r for r in json.loads(out.read_text())}
  assert by["hlo"]["prefill_chunk"] == 8192
  assert by["hlo"]["prefill_temp_bytes_per_device"] < 0.6e9
  assert by["hlo"]["concurrency"] == 40 and by["analytic"]["concurrency"] == 46


def test_peak_analysis_errors_list_choices():
  proc = _run("--hardware=a99", timeout=300)
  assert proc.returncode != 0 and "a100-80g-sxm" in proc.stderr
  proc = _run("--model=yi-99b", timeout=300)
  assert proc.returncode != 0 and "'yi-34b'" in proc.stderr
  proc = _run("--contexts=4000", "--mesh=data:2,model:4", timeout=300)
  assert proc.returncode != 0 and "batch 1 must be a multiple of the mesh's data size 2" in proc.stderr


def test_bench_analysis_times_the_1m_run(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_analysis", "--only=1m_tp8",
                         "--repeats=1", f"--json_out={out}"], cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = json.loads(out.read_text())["runs"]["1m_tp8"]
  assert run["target_s"] == 5 and len(run["seconds"]) == 1 and run["median_s"] > 0
  assert run["met"] == (run["median_s"] <= 5)


def test_kv_compression_side_by_side(tmp_path):
  """--kv_compression twice: the dense rows first, then each policy; the
  compressed cache's bytes per user from both sources agree, and so do the
  hlo decode bytes with the closed form (within 5% at 128K on model:8)."""
  out = tmp_path / "rows.json"
  proc = _run("--contexts=131072", "--num_devices=8", "--kv_compression=int8",
              "--kv_compression=int4", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [r["kv_compression"] for r in rows] == ["", "", "int8", "int8", "int4", "int4"]
  by = {(r["kv_compression"], r["source"]): r for r in rows}
  for kv in ("", "int8", "int4"):
    a, h = by[(kv, "analytic")], by[(kv, "hlo")]
    assert h["kv_bytes_per_user_total"] == pytest.approx(a["kv_bytes_per_user_total"], rel=1e-9)
    assert h["decode_bytes_per_device"] == pytest.approx(a["decode_bytes_per_device"], rel=0.05)
  dense = by[("", "analytic")]["kv_bytes_per_user_total"]
  # int8: 1 byte + a bf16 scale per 128 channels; int4: half a byte + the scale.
  assert by[("int8", "analytic")]["kv_bytes_per_user_total"] == pytest.approx(
      dense * (128 + 2) / 256)
  assert by[("int4", "analytic")]["kv_bytes_per_user_total"] == pytest.approx(
      dense * (64 + 2) / 256)
  assert by[("int4", "hlo")]["concurrency"] > by[("int8", "hlo")]["concurrency"] > by[
      ("", "hlo")]["concurrency"]
  assert "int8" in proc.stdout and "kv cache" in proc.stdout


def test_kv_compression_errors_name_the_flag():
  proc = _run("--contexts=4000", "--num_devices=8", "--kv_compression=int8:bits=3")
  assert proc.returncode != 0 and "--kv_compression=int8:bits=3" in proc.stderr
  proc = _run("--contexts=4000", "--mesh=seq:2,model:4", "--kv_compression=int8")
  assert proc.returncode != 0 and "seq" in proc.stderr
  proc = _run("--kv_compression=help")
  assert proc.returncode == 0 and "kivi" in proc.stdout


def test_kv_compression_with_eviction(tmp_path):
  """Eviction in the main job: a user's cache is what it keeps, kvpress's
  rule int(T * (1 - ratio)) slots of K/V plus an int32 position per slot,
  layer and KV head (and a float32 score for H2O), the same from the closed
  form and from the compiled programs; the decode step's bytes agree with
  the closed form; composed with int8, the kept slots are int8."""
  out = tmp_path / "rows.json"
  T = 131072
  proc = _run(f"--contexts={T}", "--num_devices=8", "--kv_compression=snapkv:ratio=0.9",
              "--kv_compression=h2o:ratio=0.9,decode=evict",
              "--kv_compression=snapkv:ratio=0.9+int8", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  by = {(r["kv_compression"], r["source"]): r for r in rows}
  cfg = lctx.ModelConfig.from_preset("yi-34b")
  L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  kept = int(T * (1 - 0.9))
  dense_slot = 2 * L * K * H * 2  # bf16 K and V
  want = {"snapkv:ratio=0.9": kept * (dense_slot + 4 * L * K),
          "h2o:decode=evict,ratio=0.9": kept * (dense_slot + 8 * L * K),
          "snapkv:ratio=0.9+int8": kept * (2 * L * K * (H + 2) + 4 * L * K)}
  for kv, total in want.items():
    a, h = by[(kv, "analytic")], by[(kv, "hlo")]
    assert a["kv_bytes_per_user_total"] == pytest.approx(total, rel=1e-9)
    assert h["kv_bytes_per_user_total"] == pytest.approx(total, rel=1e-9)
    assert h["decode_bytes_per_device"] == pytest.approx(a["decode_bytes_per_device"], rel=0.05)
    assert h["concurrency"] > 8 * by[("", "hlo")]["concurrency"]
  assert "snapkv:ratio=0.9+int8" in proc.stdout


def _quality_row(spec, rel, ratio=None, task="passkey", context=1024):
  """A row of experiments.quality_sweep's JSON (lctx.quality.results)."""
  return {"model": "smollm2-135m", "task": task, "context": context, "depth": 0.5,
          "method": "+".join(p.split(":")[0] for p in spec.split("+")), "spec": spec,
          "ratio": ratio, "protocol": "agnostic", "accuracy": rel, "relative_accuracy": rel,
          "answer_recall": None, "kl": 0.1, "top1_agreement": 0.9, "n": 8}


def test_kv_compression_quality(tmp_path):
  """Each cache beside its measured relative accuracy from --quality_json: int8
  (offload ignored: lossless), a token budget as the nearest measured ratio of
  each context, and int4, which the JSON never measured."""
  quality, out = tmp_path / "quality.json", tmp_path / "rows.json"
  quality.write_text(json.dumps({"meta": {}, "rows": [
      _quality_row("", 1.0), _quality_row("int8", 0.98),
      _quality_row("int8", 0.96, task="mqar", context=4096),
      _quality_row("snapkv:ratio=0.5", 0.9, ratio=0.5),
      _quality_row("snapkv:ratio=0.9", 0.4, ratio=0.9)]}))
  proc = _run("--model=tiny", "--contexts=64,256", "--num_devices=1", "--workers=2",
              "--kv_compression=int8+offload", "--kv_compression=snapkv:budget=32",
              "--kv_compression=int4", f"--quality_json={quality}", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert f"from {quality};" in text
  assert "dense quality: uncompressed" in text
  assert ("int8+offload quality: 0.97 rel. acc. (int8, smollm2-135m, mqar/passkey at 1K-4K "
          "ctx)") in text
  # 32 of 64 tokens kept: ratio 0.5; of 256: 0.875, nearest measured 0.9
  assert "snapkv:budget=32 quality at 64: 0.90 rel. acc. (snapkv ratio 0.5," in text
  assert ("snapkv:budget=32 quality at 256: 0.40 rel. acc. (snapkv nearest measured ratio 0.9 "
          "for 0.875,") in text
  assert "int4 quality: unmeasured" in text
  by = {(r["context"], r["kv_compression"], r["source"]): r for r in json.loads(out.read_text())}
  assert len(by) == 2 * 4 * 2
  assert by[(64, "", "hlo")]["relative_accuracy"] == 1.0
  assert by[(64, "int8+offload", "analytic")]["relative_accuracy"] == pytest.approx(0.97)
  assert by[(256, "snapkv:budget=32", "hlo")]["relative_accuracy"] == pytest.approx(0.4)
  assert by[(256, "int4", "hlo")]["relative_accuracy"] is None
  assert by[(256, "int4", "hlo")]["quality_label"] == "unmeasured"


def test_kv_compression_quality_without_a_json(tmp_path):
  """The default --quality_json (docs/quality.json, relative to the working
  directory) missing: every lossy cache is unmeasured; a given path that is
  missing is an error naming it."""
  proc = subprocess.run([sys.executable, "-m", "experiments.peak_analysis", "--model=tiny",
                         "--contexts=64", "--num_devices=1", "--kv_compression=int8"],
                        cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                           "PYTHONPATH": str(ROOT)},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "docs/quality.json (not found: every lossy cache unmeasured)" in proc.stdout
  assert "int8 quality: unmeasured" in proc.stdout
  missing = tmp_path / "none.json"
  proc = _run("--model=tiny", "--contexts=64", "--num_devices=1", "--kv_compression=int8",
              f"--quality_json={missing}", timeout=300)
  assert proc.returncode != 0 and f"--quality_json={missing}" in proc.stderr
  assert "not found" in proc.stderr
