"""The main job end to end on a small sweep (subprocess, 8 fake devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"model", "hardware", "num_devices", "context", "batch", "source", "kv_bytes_per_user",
          "weight_bytes_per_device", "concurrency", "prefill_flops_per_device", "prefill_s",
          "decode_bytes_per_device", "decode_step_s", "context_switch_s"}


def test_peak_analysis_rows_and_plot(tmp_path):
  out, png = tmp_path / "rows.json", tmp_path / "plot.png"
  cmd = [sys.executable, "-m", "experiments.peak_analysis", "--contexts=4000,50000",
         "--num_devices=1,4", f"--json_out={out}", f"--plot_out={png}"]
  proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert len(rows) == 2 * 2 * 2 and FIELDS <= set(rows[0])
  by = {(r["context"], r["num_devices"], r["source"]): r for r in rows}
  # FRAMEWORK.md T11: 20 users of 50K tokens fit on 4 A100s (decimal GB, exact params).
  assert by[(50000, 4, "analytic")]["concurrency"] == by[(50000, 4, "hlo")]["concurrency"] == 20
  for (T, g, source), r in by.items():
    other = by[(T, g, "hlo" if source == "analytic" else "analytic")]
    assert r["decode_step_s"] == pytest.approx(other["decode_step_s"], rel=0.05)
  assert png.stat().st_size > 10_000
  assert "decode ms/tok" in proc.stdout


def test_peak_analysis_errors_list_choices():
  proc = subprocess.run([sys.executable, "-m", "experiments.peak_analysis", "--hardware=a99"],
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "a100-80g-sxm" in proc.stderr
