"""experiments/shard_sweep end to end on the tiny preset (subprocess, 8 fake devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lctx

ROOT = Path(__file__).resolve().parent.parent


def test_shard_sweep_covers_every_factorization(tmp_path):
  out = tmp_path / "sweep.json"
  cmd = [sys.executable, "-m", "experiments.shard_sweep", "--model=tiny", "--context=64",
         "--batch=4", "--num_devices=8", f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  # 8 = d * s * m in 10 ways; data:8 cannot split a batch of 4.
  assert len(rows) == 10
  skipped = {r["mesh"]: r["skipped"] for r in rows if "skipped" in r}
  assert set(skipped) == {"data:8,seq:1,model:1"} and "batch = 4" in skipped["data:8,seq:1,model:1"]
  ran = [r for r in rows if "skipped" not in r]
  assert sum(r.get("best_prefill", False) for r in ran) == sum(
      r.get("best_decode", False) for r in ran) == 1
  by = {r["mesh"]: r for r in ran}
  full_weights = by["data:2,seq:4,model:1"]["weight_bytes_per_device"]  # replicated
  # model:8 holds about 1/8 of the weights and, with K=2 < 8, each KV head on
  # the 4 devices whose query heads read it: 1/K = 1/2 of the cache; seq:8
  # holds 1/8 of the cache and all the weights.
  assert by["data:1,seq:1,model:8"]["weight_bytes_per_device"] < full_weights / 4
  assert by["data:1,seq:8,model:1"]["weight_bytes_per_device"] == full_weights
  tiny = lctx.ModelConfig.from_preset("tiny")
  whole_cache = 4 * 64 * tiny.kv_bytes_per_token("bfloat16")  # batch 4, context 64, bf16
  assert by["data:1,seq:1,model:8"]["cache_bytes_per_device"] == whole_cache / 2
  assert by["data:1,seq:8,model:1"]["cache_bytes_per_device"] == whole_cache / 8
  assert by["data:1,seq:1,model:8"]["decode_collective_bytes_per_device"].get("all-reduce", 0) > 0
  # A prefill's activations are split by data and seq, not by model (tensor
  # parallelism keeps the [T, D] residual whole on every device).
  temps = {m: r["prefill_temp_bytes_per_device"] for m, r in by.items()}
  assert temps["data:1,seq:8,model:1"] < temps["data:1,seq:1,model:8"]
