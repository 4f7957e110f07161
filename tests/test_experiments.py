"""experiments/generate.py as a subprocess, against lctx.generate in process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lctx
from experiments.generate import make_prompt

REPO = Path(__file__).resolve().parent.parent
CFG = lctx.ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache shared by the subprocesses (saves repeated compiles)."""
  return tmp_path_factory.mktemp("jax_cache")


def start_generate(*args, cache_dir=None) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", "experiments.generate", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
  try:
    stdout, stderr = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, stdout, stderr


def expected_tokens(*, seed=0, batch=1, prompt_len=16, prompt=None, max_new_tokens=16,
                    scan_layers=True, sampling=lctx.SamplingConfig(), kv_compression=""):
  params = lctx.init_params(CFG, seed)
  if not scan_layers:
    params = lctx.unstack_layers(params)
  if prompt is None:
    prompt = make_prompt(CFG.vocab_size, batch, prompt_len, seed)
  out = lctx.generate(CFG, params, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                      key=jax.random.key(seed), kv_compression=kv_compression)
  return np.asarray(out).tolist()


CASES = {
    "defaults": ([], {}),
    "unrolled_sampled": (
        ["--scan_layers=false", "--batch=2", "--seed=3", "--prompt_len=9", "--max_new_tokens=6",
         "--temperature=1.0", "--top_k=20", "--top_p=0.9"],
        dict(scan_layers=False, batch=2, seed=3, prompt_len=9, max_new_tokens=6,
             sampling=lctx.SamplingConfig(1.0, 20, 0.9))),
    "prompt_tokens": (
        ["--prompt_tokens=1,2,3", "--batch=2", "--max_new_tokens=5"],
        dict(prompt=np.array([[1, 2, 3]] * 2), max_new_tokens=5)),
    "kv_compression": (
        ["--kv_compression=int4", "--batch=2", "--max_new_tokens=6"],
        dict(batch=2, max_new_tokens=6, kv_compression="int4")),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_library(case, tmp_path, compile_cache):
  args, kwargs = CASES[case]
  out = tmp_path / "out.json"
  proc = start_generate(*args, f"--json_out={out}", cache_dir=compile_cache)
  want = expected_tokens(**kwargs)  # while the subprocess runs
  rc, stdout, stderr = finish(proc)
  assert rc == 0, stderr[-3000:]
  assert "model tiny" in stdout and "generate:" in stdout
  assert json.loads(out.read_text())["tokens"] == want


@pytest.mark.parametrize("args, message", [
    (["--dtype=float16"], "--dtype"),
    (["--top_p=0"], "--top_p"),
    (["--prompt_len=4", "--prompt_tokens=1,2"], "mutually exclusive"),
    (["--mesh=seq:4", "--prefill_chunk=6"], "a multiple of the seq size 4"),
    (["--kv_compression=int3"], "--kv_compression=int3"),
    (["--kv_compression=int8:group=3"], "group"),
    (["--kv_compression=int8", "--mesh=seq:2"], "without a seq axis"),
])
def test_bad_flags_fail_naming_the_flag(args, message):
  rc, stdout, stderr = finish(start_generate(*args))
  assert rc != 0
  assert message in stderr + stdout


def test_model_must_not_contradict_checkpoint_config(tmp_path):
  # config.json alone marks an HF checkpoint; the mismatch is caught before any weights load.
  (tmp_path / "config.json").write_text((REPO / "configs/models/small.json").read_text())
  rc, stdout, stderr = finish(start_generate(f"--checkpoint={tmp_path}", "--model=tiny"))
  assert rc != 0
  assert "--model=tiny contradicts" in stderr + stdout


def test_generate_on_the_four_meshes_matches_unsharded(tmp_path, compile_cache):
  """Default flags plus --mesh: the same tokens as the unsharded run (8 fake devices)."""
  want = expected_tokens()
  meshes = ["model:8", "data:2,model:4", "seq:8", "data:2,seq:2,model:2"]
  for mesh in meshes:  # one at a time: each uses both cores
    out = tmp_path / f"{mesh.replace(':', '_').replace(',', '_')}.json"
    proc = start_generate(f"--mesh={mesh}", f"--json_out={out}", cache_dir=compile_cache)
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    assert json.loads(out.read_text())["tokens"] == want, mesh
  code, _, stderr = finish(start_generate("--mesh=model:3", cache_dir=compile_cache))
  assert code != 0 and "--mesh=model:3" in stderr and "num_heads" in stderr


def test_kv_compression_help_lists_every_policy():
  from lctx.cache import spec
  rc, stdout, stderr = finish(start_generate("--kv_compression=help"))
  assert rc == 0, stderr[-2000:]
  for name in spec.POLICIES:
    assert name in stdout
