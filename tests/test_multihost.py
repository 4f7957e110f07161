"""Two local processes with 4 CPU devices each (gloo) run one global mesh."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import lctx
from experiments.generate import make_prompt

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(command) -> None:
  """Runs command(port, process_id) as processes 0 and 1 of one job (4 CPU
  devices each) and asserts both succeed."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  port = _free_port()
  procs = [subprocess.Popen(command(port, i), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    results = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]


def test_two_processes_generate_the_single_process_tokens(tmp_path):
  _run_two_processes(lambda port, i: [
      sys.executable, "-m", "experiments.generate", "--distributed",
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
      "--mesh=data:2,seq:2,model:2", "--batch=2", f"--json_out={tmp_path / f'{i}.json'}"])
  assert not (tmp_path / "1.json").exists()  # only process 0 writes

  config = lctx.ModelConfig.from_preset("tiny")
  want = lctx.generate(config, lctx.init_params(config, 0), make_prompt(config.vocab_size, 2, 16, 0),
                       max_new_tokens=16)
  got = json.loads((tmp_path / "0.json").read_text())["tokens"]
  np.testing.assert_array_equal(got, want)


def test_two_processes_drive_prefill_and_decode_step(tmp_path):
  """engine.prefill / decode_step with a plan over both processes' devices, fed
  host arrays: the single-process greedy tokens, and the host-side errors
  (token outside the vocabulary, full cache) raised on every process."""
  _run_two_processes(lambda port, i: [
      sys.executable, str(ROOT / "tests" / "multihost_steps.py"), str(port), "2", str(i),
      str(tmp_path / f"{i}.json")])

  config = lctx.ModelConfig.from_preset("tiny")
  params = lctx.init_params(config, 0)
  prompt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 8), dtype=np.int32)
  logits, cache = lctx.prefill(config, params, prompt, lctx.init_cache(config, 2, 12))
  want = []
  for _ in range(4):
    token = np.asarray(logits).argmax(-1).astype(np.int32)
    want.append(token.tolist())
    logits, cache = lctx.decode_step(config, params, token, cache)
  for i in range(2):
    got = json.loads((tmp_path / f"{i}.json").read_text())
    assert got["tokens"] == want
    assert "outside the vocabulary [0, 256)" in got["errors"]["vocab"]
    assert "KV cache is full: a row holds 12 tokens" in got["errors"]["full"]
