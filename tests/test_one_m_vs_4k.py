"""experiments.one_m_vs_4k end to end on the tiny model (subprocess, fake CPU devices):
a long context of 256 tokens against a short one of 64, a few rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lctx
from lctx import convert
from lctx.cost import analytic, metrics

ROOT = Path(__file__).resolve().parent.parent
MODES = ("closed_form", "roofline", "calibrated")
METRICS = ("concurrency", "prefill_s", "decode_step_s", "context_switch_s", "kv_bytes_per_user")
LONG, SHORT = 256, 64
ROWS = ["dense", "int8", "snapkv:ratio=0.5,window=16", "kv_heads=1+int4", "kv_share_every=2",
        "offload", "kivi:bits=2", "int8+offload", "snapkv:budget=32,window=16", "int4"]


def _quality_row(spec, rel, ratio=None, task="passkey", context=1024):
  """A row of experiments.quality_sweep's JSON (lctx.quality.results)."""
  return {"model": "smollm2-135m", "task": task, "context": context, "depth": 0.5,
          "method": "+".join(p.split(":")[0] for p in spec.split("+")), "spec": spec,
          "ratio": ratio, "protocol": "agnostic", "accuracy": rel, "relative_accuracy": rel,
          "answer_recall": None, "kl": 0.1, "top1_agreement": 0.9, "n": 8}


# int8 measured; snapkv (window 16) at ratios 0.5 and 0.9; int4 measured, but its
# row kv_heads=1+int4 converts the model: unmeasured. int4 alone: unmeasured.
QUALITY = [_quality_row("", 1.0), _quality_row("int8", 0.98),
           _quality_row("int8", 0.96, task="mqar", context=4096),
           _quality_row("snapkv:ratio=0.5,window=16", 0.9, ratio=0.5),
           _quality_row("snapkv:ratio=0.9,window=16", 0.4, ratio=0.9),
           _quality_row("int4:group=4", 0.9)]


def _run(*flags, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.one_m_vs_4k", "--model=tiny",
                         *flags], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=timeout)


def _closed_form_kv_bytes(row: dict) -> float:
  """One user's cache at the row's context, from lctx's closed forms, for the
  model the row serves (converted KV heads, shared KV layers)."""
  config = lctx.ModelConfig.resolve("tiny", param_dtype="bfloat16", dtype="bfloat16")
  if row["kv_share_every"] > 1:
    config = config.replace(kv_share_every=row["kv_share_every"])
  config = convert.gqa_config(config, row["kv_heads"])
  T = row["context"]
  per_token = metrics.kv_token_bytes(config, row["kv_compression"], T, "bfloat16")
  return (analytic.kv_bytes_per_user(config, T, "bfloat16") if per_token is None
          else per_token * T)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("one_m_vs_4k")
  out, png, quality = tmp / "table.json", tmp / "table.png", tmp / "quality.json"
  quality.write_text(json.dumps({"meta": {}, "rows": QUALITY}))
  proc = _run(f"--long={LONG}", f"--short={SHORT}", "--num_devices=2", "--workers=2",
              "--rows=" + ",".join(ROWS), f"--json_out={out}", f"--plot_out={png}",
              f"--quality_json={quality}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text()), png


def test_rows_files_and_the_baseline(run):
  proc, report, png = run
  rows = report["rows"]
  assert [r["label"] for r in rows] == ["dense@short"] + ROWS
  assert report["long"] == LONG and report["short"] == SHORT and report["mesh"] == "model:2"
  assert png.stat().st_size > 10_000
  base = rows[0]
  assert base["context"] == SHORT and base["lossless"] and base["kv_compression"] == ""
  for mode in MODES:  # the baseline's ratios are 1 by construction, in every mode
    assert set(base["ratios"][mode]) == set(METRICS)
    assert all(base["ratios"][mode][m] == 1.0 for m in METRICS), (mode, base["ratios"][mode])
    assert all(base["within_2x"][mode].values())
  for r in rows:
    if r.get("error"):
      continue
    assert r["context"] == (SHORT if r is base else LONG)
    for mode in MODES:
      for m in METRICS:
        assert r["ratios"][mode][m] == pytest.approx(r["values"][mode][m]
                                                     / base["values"][mode][m])
    # the calibrated mode has no context switch of its own: the roofline's
    assert r["values"]["calibrated"]["context_switch_s"] == r["values"]["roofline"][
        "context_switch_s"]
  assert "* = within 2x of 64" in proc.stdout and "lossy" in proc.stdout


def test_kv_bytes_per_user_are_the_closed_form(run):
  _, report, _ = run
  by = {r["label"]: r for r in report["rows"]}
  assert by["kv_heads=1+int4"]["kv_heads"] == 1 and by["kv_heads=1+int4"]["model"] == "tiny-kv1"
  assert by["kv_share_every=2"]["kv_share_every"] == 2
  for r in report["rows"]:
    if r.get("error"):
      continue
    expected = _closed_form_kv_bytes(r)
    for mode in MODES:
      assert r["values"][mode]["kv_bytes_per_user"] == pytest.approx(expected, rel=1e-9), (
          r["label"], mode)
  # each axis shrinks the long context's cache below dense's
  dense = by["dense"]["values"]["roofline"]["kv_bytes_per_user"]
  for label in ("int8", "snapkv:ratio=0.5,window=16", "kv_heads=1+int4", "kv_share_every=2"):
    assert by[label]["values"]["roofline"]["kv_bytes_per_user"] < dense


def test_tags_and_a_failed_row(run):
  proc, report, _ = run
  by = {r["label"]: r for r in report["rows"]}
  assert by["dense"]["lossless"] and by["offload"]["lossless"]
  for label in ("int8", "snapkv:ratio=0.5,window=16", "kv_heads=1+int4", "kv_share_every=2"):
    assert not by[label]["lossless"] and by[label]["reason"]
  assert "drops tokens" in by["snapkv:ratio=0.5,window=16"]["reason"]
  # KIVI's 32-channel groups do not divide the tiny model's head_dim of 8: that
  # row fails with lctx's reason, and the run goes on.
  assert "head_dim" in by["kivi:bits=2"]["error"]
  assert "warning: 1 row(s) failed: kivi:bits=2" in proc.stdout


def test_measured_quality(run):
  """Each row's relative accuracy from --quality_json at its own context:
  dense and offload 1 (uncompressed); int8 (and int8+offload) the mean of its
  rows; a budget of 32 of 256 tokens, ratio 0.875, the nearest measured 0.9;
  a model change and a never measured policy: unmeasured."""
  proc, report, _ = run
  by = {r["label"]: r for r in report["rows"]}
  assert report["quality_json"].endswith("quality.json")
  for label in ("dense@short", "dense", "offload"):
    assert by[label]["relative_accuracy"] == 1.0
    assert by[label]["quality"].startswith("uncompressed")
  int8 = "0.97 rel. acc. (int8, smollm2-135m, mqar/passkey at 1K-4K ctx)"
  assert by["int8"]["quality"] == by["int8+offload"]["quality"] == int8
  assert by["int8"]["relative_accuracy"] == pytest.approx(0.97)
  assert by["snapkv:ratio=0.5,window=16"]["relative_accuracy"] == pytest.approx(0.9)
  budget = by["snapkv:budget=32,window=16"]
  assert budget["relative_accuracy"] == pytest.approx(0.4)
  assert "snapkv nearest measured ratio 0.9 for 0.875," in budget["quality"]
  for label in ("kv_heads=1+int4", "kv_share_every=2", "int4", "kivi:bits=2"):
    assert by[label]["relative_accuracy"] is None and by[label]["quality"] == "unmeasured"
  assert f"int8: lossy, {by['int8']['reason']}; quality: {int8}" in proc.stdout
  line = next(x for x in proc.stdout.splitlines() if x.startswith("int8 "))
  assert " lossy       0.97 | " in line
  line = next(x for x in proc.stdout.splitlines() if x.startswith("int4 "))
  assert " lossy unmeasured | " in line


def test_a_missing_quality_json_is_a_usage_error(tmp_path):
  missing = tmp_path / "none.json"
  proc = _run(f"--quality_json={missing}", f"--long={LONG}", f"--short={SHORT}", "--rows=int8")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"--quality_json={missing}" in proc.stderr and "not found" in proc.stderr


@pytest.mark.parametrize("rows, words", [
    ("int9", ["--rows: row 'int9'", "unknown policy 'int9'", "the default rows: dense@short"]),
    ("dense,kv_heads=3", ["--rows: row 'kv_heads=3'", "allowed: [1, 2]"]),
    ("kv_share_every=3", ["kv_share_every=3 does not divide the 2 layers", "allowed: [1, 2]"]),
])
def test_a_bad_row_is_a_usage_error(rows, words):
  proc = _run(f"--rows={rows}", f"--long={LONG}", f"--short={SHORT}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: --rows: ")
  for w in words:
    assert w in line, line
