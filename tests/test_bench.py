"""The benchmark script end to end on a tiny model (numbers are not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lctx import ModelConfig
from lctx.bench import decode_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_bench_decode_runs_and_agrees_with_transformers(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.bench_decode", "--model=tiny", "--context=40",
         "--decode_steps=2", "--rounds=1", "--read_buffer_mb=16", f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  for key in ("lctx_prefill_tok_s", "lctx_decode_tok_s", "ref_prefill_tok_s", "ref_decode_tok_s",
              "achieved_gb_s", "machine_read_gb_s"):
    assert r[key] > 0, key
  # The versions the comparison ran against, recorded and printed.
  assert set(r["versions"]) == {"jax", "jaxlib", "torch", "transformers", "numpy"}
  assert r["versions"]["jax"] == r["jax_version"]
  assert all(r["versions"].values())  # the reference needs torch and transformers
  assert f"transformers {r['versions']['transformers']}" in proc.stdout
  # Random weights, and said so (tests/test_cli.py: also for a checkpoint directory).
  assert r["weights"] == "random (seed 0)" and "weights: random (seed 0)" in proc.stdout
  # Same weights in both implementations: the prefill logits agree.
  assert r["max_abs_logit_diff"] < 1e-4
  # Bytes per step: tiny is untied, so the embedding contributes one row.
  cfg = ModelConfig.from_preset("tiny")
  weights = cfg.num_params - (cfg.vocab_size - 1) * cfg.hidden_size
  kv = (40 + 1) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
  assert r["decode_bytes_per_step"] == decode_bytes(cfg, 1, 41) == 4 * (weights + kv)


def test_bench_decode_times_a_chunked_prefill_beside_the_one_pass(tmp_path):
  """--prefill_chunk: lctx prefills in chunks (its logits still match
  transformers) and each round also times the one-pass prefill, reported
  side by side."""
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.bench_decode", "--model=tiny", "--context=40",
         "--prefill_chunk=16", "--decode_steps=1", "--rounds=1", "--read_buffer_mb=16",
         f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["prefill_chunk"] == 16 and r["lctx_one_pass_prefill_s"] > 0
  assert r["chunked_over_one_pass_prefill_s"] == r["lctx_prefill_s"] / r["lctx_one_pass_prefill_s"]
  assert "prefill s, chunked / one pass" in proc.stdout
  assert r["max_abs_logit_diff"] < 1e-4


def test_bench_decode_compares_a_compressed_cache_with_the_dense_one(tmp_path):
  """--kv_compression: each round also decodes with the dense cache; the
  step ratio is printed beside the bytes floor (compressed step bytes over
  dense step bytes, from the formats' closed forms); --synthetic_cache
  skips the prefill (decode time does not depend on the cached values)."""
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.bench_decode", "--model=tiny", "--context=64",
         "--kv_compression=int8", "--synthetic_cache", "--noreference", "--decode_steps=2",
         "--rounds=1", "--read_buffer_mb=16", f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  cfg = ModelConfig.from_preset("tiny")
  assert r["kv_compression"] == "int8" and r["synthetic_cache"] and r["lctx_prefill_s"] is None
  assert r["decode_step_over_dense"] == r["lctx_decode_step_s"] / r["dense_decode_step_s"]
  # int8: per token, layer and KV head 8 one-byte codes and a 4-byte fp32 scale, K and V.
  weights = cfg.num_params - (cfg.vocab_size - 1) * cfg.hidden_size
  kv = 65 * 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 4)
  assert r["decode_bytes_per_step"] == 4 * weights + kv
  assert r["bytes_floor_over_dense"] == (4 * weights + kv) / decode_bytes(cfg, 1, 65)
  assert "int8 / dense cache" in proc.stdout and "bytes floor" in proc.stdout
  bad = subprocess.run(cmd[:4] + ["--kv_compression=kivi:bits=3"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--kv_compression=kivi:bits=3" in bad.stderr


def test_bench_decode_with_eviction(tmp_path):
  """Eviction: the dense side holds as many tokens as eviction keeps; with
  a prefill chunk, the dense chunked prefill is timed beside it and the
  evicting prefill's compiled peak (temporaries + cache) is reported against
  a dense cache of budget + one chunk prefilled in the same chunks."""
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.bench_decode", "--model=tiny", "--context=96",
         "--prefill_chunk=32", "--kv_compression=snapkv:ratio=0.75,window=8", "--noreference",
         "--decode_steps=2", "--rounds=1", "--read_buffer_mb=16", f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["dense_context"] == int(96 * (1 - 0.75))
  assert r["prefill_over_dense_chunked"] == r["lctx_prefill_s"] / r["dense_chunked_prefill_s"]
  assert r["prefill_peak_over_bound"] == pytest.approx(
      (r["evict_prefill_temp_bytes"] + r["evict_prefill_cache_bytes"])
      / (r["bound_temp_bytes"] + r["bound_cache_bytes"]))
  assert 0 < r["prefill_peak_over_bound"] < 3
  assert "dense cache of 24 tokens" in proc.stdout and "prefill peak GB" in proc.stdout
