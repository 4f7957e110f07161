"""lctx.cost.calibrate: the per-machine cache (round trip, refresh, corrupt
files), the machine key, the device-kind presets, one small real measurement
on CPU, and experiments.calibrate as a subprocess."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lctx.cost import calibrate, calibrated, hardware
from lctx.cost.hardware import Calibration, HardwareSpec

REPO = Path(__file__).resolve().parent.parent
FAKE = Calibration(matmul_efficiency=0.5, memory_efficiency=0.25, collective_efficiency=0.75,
                   matmul_floor_s=2e-6, other_floor_s=1e-6, collective_latency_s=3e-5,
                   source="fake measurement")
# A cpu-local spec without measuring one (load_hardware('cpu-local') would).
CPU_SPEC = HardwareSpec(name=hardware.CPU_LOCAL, kind="cpu", peak_flops={"float32": 1e11},
                        hbm_bytes=1e10, hbm_bandwidth=1e10, interconnect_bandwidth=1e10,
                        host_bandwidth=1e10, collective_latency=1e-5)


@pytest.fixture
def fake_measure(monkeypatch, tmp_path):
  """LCTX_CACHE_DIR in tmp_path and `measure` replaced by a counter returning FAKE."""
  monkeypatch.setenv(calibrate.CACHE_ENV, str(tmp_path / "cache"))
  calls = []

  def measure(hw, *args, probes=None, **kwargs):
    calls.append(hw.name)
    if probes is not None:
      probes["gemm_flop_per_s"] = 1.0
    return FAKE

  monkeypatch.setattr(calibrate, "measure", measure)
  return calls


def same_numbers(a: Calibration, b: Calibration) -> bool:
  return {k: v for k, v in a.to_dict().items() if k != "source"} == {
      k: v for k, v in b.to_dict().items() if k != "source"}


def test_cache_round_trip(fake_measure, tmp_path):
  first = calibrate.load_or_measure(CPU_SPEC)
  path = calibrate.cache_path(hardware=CPU_SPEC.name)
  assert path == tmp_path / "cache" / "calibration" / f"{calibrate.machine_key()}--cpu-local.json"
  assert fake_measure == ["cpu-local"] and same_numbers(first, FAKE)
  assert first.source == f"fake measurement [cached in {path}]"
  record = json.loads(path.read_text())
  assert set(record) == {"version", "machine_key", "hardware", "created", "jax_version",
                         "calibration", "probes"}
  assert record["machine_key"] == calibrate.machine_key() and record["hardware"] == "cpu-local"
  assert record["calibration"] == FAKE.to_dict() and record["probes"] == {"gemm_flop_per_s": 1.0}
  assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary behind

  second = calibrate.load_or_measure(CPU_SPEC)
  assert fake_measure == ["cpu-local"]  # read, not measured
  assert same_numbers(second, FAKE) and second.source == f"fake measurement [read from {path}]"
  # The calibrated mode's cpu-local path reads the same cache.
  assert same_numbers(calibrated.for_hardware(CPU_SPEC), FAKE) and len(fake_measure) == 1


def test_refresh_measures_again(fake_measure):
  calibrate.load_or_measure(CPU_SPEC)
  _, _, cached = calibrate.load_or_measure_record(CPU_SPEC, refresh=True)
  assert not cached and len(fake_measure) == 2
  _, _, cached = calibrate.load_or_measure_record(CPU_SPEC)
  assert cached and len(fake_measure) == 2


@pytest.mark.parametrize("content, reason", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    (None, "hardware is 'h100-sxm', not 'cpu-local'"),  # measured for another spec
    ("bad-efficiency", "matmul_efficiency=2"),
])
def test_unusable_cache_is_measured_again_with_a_warning(fake_measure, caplog, content, reason):
  calibrate.load_or_measure(CPU_SPEC)
  path = calibrate.cache_path(hardware=CPU_SPEC.name)
  record = json.loads(path.read_text())
  if content is None:
    path.write_text(json.dumps(dict(record, hardware="h100-sxm")))
  elif content == "bad-efficiency":
    record["calibration"]["matmul_efficiency"] = 2
    path.write_text(json.dumps(record))
  else:
    path.write_text(content)
  with caplog.at_level(logging.WARNING, logger=calibrate.__name__):
    cal = calibrate.load_or_measure(CPU_SPEC)
  assert len(fake_measure) == 2 and same_numbers(cal, FAKE)
  assert any("unusable" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
  assert json.loads(path.read_text())["calibration"] == FAKE.to_dict()  # rewritten


def test_unwritable_cache_still_returns_the_measurement(fake_measure, monkeypatch, tmp_path,
                                                        caplog):
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setenv(calibrate.CACHE_ENV, str(blocker))  # a file where the directory goes
  with caplog.at_level(logging.WARNING, logger=calibrate.__name__):
    assert same_numbers(calibrate.load_or_measure(CPU_SPEC), FAKE)
  assert any("could not write" in r.getMessage() for r in caplog.records)


def test_machine_key_and_cache_dir(monkeypatch, tmp_path):
  key = calibrate.machine_key()
  assert key == calibrate.machine_key()
  assert re.fullmatch(r"[a-z0-9][a-z0-9-]*-[0-9a-f]{12}", key) and len(key) <= 93
  assert key.startswith("cpu-cpu-x")
  monkeypatch.delenv(calibrate.CACHE_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert calibrate.cache_dir() == tmp_path / ".cache" / "lctx"
  monkeypatch.setenv(calibrate.CACHE_ENV, str(tmp_path / "c"))
  assert calibrate.cache_path("k") == tmp_path / "c" / "calibration" / "k.json"
  assert calibrate.cache_path("k", "my spec") == tmp_path / "c" / "calibration" / "k--my-spec.json"


def test_presets_for_device_kinds(monkeypatch):
  for kind, preset in [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
                       ("NVIDIA B200", "b200"), ("NVIDIA A100-SXM4-80GB", "a100-80g-sxm"),
                       ("nvidia  a100-sxm4-40gb", "a100-40g-sxm"), ("TPU v5 lite", "tpu-v5e"),
                       ("TPU v5", "tpu-v5p"), ("cpu", "cpu-local")]:
    assert calibrate.preset_for_device_kind(kind) == preset
  assert calibrate.preset_for_device_kind("NVIDIA H200 NVL") is None  # other clocks: no preset
  known = set(hardware.list_hardware()) | {hardware.CPU_LOCAL}
  assert set(calibrate.DEVICE_KIND_PRESETS.values()) <= known
  assert calibrate.default_hardware() == "cpu-local"  # tests run on CPU

  import jax

  class Device:
    device_kind = "NVIDIA Imaginary 9000"

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
  with pytest.raises(ValueError, match=r"no hardware preset for device kind 'NVIDIA Imaginary "
                                       r"9000': name one with --hardware; allowed: \[.*'h200'"):
    calibrate.default_hardware()
  Device.device_kind = "NVIDIA H100 80GB HBM3"
  assert calibrate.default_hardware() == "h100-sxm"


def test_small_real_measurement_on_cpu():
  """The probes for real at small sizes, on the 8 CPU devices of conftest:
  efficiencies in (0, 1], floors and the collective latency positive."""
  import jax
  hw = hardware.calibrate_cpu(matmul_size=256, read_bytes=8 << 20, repeats=2)
  sizes = calibrate.ProbeSizes(gemm_m=64, gemm_k=256, gemm_chain=2, decode_m=8, decode_k=512,
                               decode_chain=2, stream_chain=2, latency_chain=4,
                               allreduce_bytes=1 << 16, allreduce_chain=2)
  probes = {}
  cal = calibrate.measure(hw, repeats=2, stream_bytes=4 << 20, extra=20, sizes=sizes,
                          probes=probes)
  for field in hardware.CALIBRATION_EFFICIENCIES:
    assert 0 < getattr(cal, field) <= 1, field
  assert cal.matmul_floor_s > 0 and cal.other_floor_s > 0
  assert "measured by lctx.cost.calibrate" in cal.source and "against cpu-local" in cal.source
  assert probes["devices"] == len(jax.local_devices()) and probes["dtype"] == "float32"
  assert probes["gemm_shape"] == [64, 256, 256] and probes["decode_gemm_shape"] == [8, 512, 512]
  assert probes["decode_gemm_bytes_per_s"] > 0 and probes["stream_bytes_per_s"] > 0
  # XLA does not fuse the floor chains away: one GEMM kernel per step, and the
  # softmax step takes its own kernels too.
  assert probes["matmul_floor_kernels_per_step"] >= 1
  assert probes["other_floor_kernels_per_step"] >= 1
  if probes["devices"] > 1:
    assert cal.collective_latency_s > 0 and probes["allreduce_bus_bytes_per_s"] > 0
  else:
    assert cal.collective_latency_s is None and cal.collective_efficiency == 1
  json.dumps(probes)  # cacheable as is


def test_measure_refuses_bad_arguments_before_measuring():
  with pytest.raises(ValueError, match="measure: extra=0; allowed: a positive integer"):
    calibrate.measure(CPU_SPEC, extra=0)
  with pytest.raises(ValueError, match=r"hardware 'h100-sxm' is a gpu, but jax's default "
                                       r"backend here is 'cpu'"):
    calibrate.measure(hardware.load_hardware("h100-sxm"))
  with pytest.raises(ValueError, match=r"ProbeSizes.gemm_k=0; allowed: a positive integer"):
    calibrate.ProbeSizes(**{**calibrate.CPU_SIZES.__dict__, "gemm_k": 0})


def run_calibrate(*args, cache):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", calibrate.CACHE_ENV: str(cache)}
  return subprocess.run([sys.executable, "-m", "experiments.calibrate", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_experiment_prints_the_cached_calibration(fake_measure, tmp_path):
  """experiments.calibrate in a subprocess (the same machine key: conftest's
  XLA_FLAGS travel with the environment) reads the cache this process wrote;
  bad --hardware values fail in one line."""
  calibrate.load_or_measure(CPU_SPEC)
  out = tmp_path / "cal.json"
  proc = run_calibrate(f"--json_out={out}", cache=tmp_path / "cache")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"read from {calibrate.cache_path(hardware=CPU_SPEC.name)}" in proc.stdout
  assert re.search(r"matmul_efficiency\s+0\.500\s+none", proc.stdout)
  assert re.search(r"collective_latency_s\s+30 us\s+none", proc.stdout)
  result = json.loads(out.read_text())
  assert result["from_cache"] and result["calibration"] == FAKE.to_dict()
  assert result["hardware_calibration"] is None and result["cache_path"] == str(
      calibrate.cache_path(hardware=CPU_SPEC.name))

  proc = run_calibrate("--hardware=h100-sxm", cache=tmp_path / "cache")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: --hardware=h100-sxm is a gpu, but jax's default backend is 'cpu'")
  proc = run_calibrate("--hardware=nope", cache=tmp_path / "cache")
  assert proc.returncode == 2 and "error: --hardware: hardware 'nope' is neither" in proc.stderr


def test_accelerator_path_times_bfloat16_against_its_peak(monkeypatch):
  """The GPU / TPU branch (bfloat16 GEMMs against the spec's bfloat16 peak),
  run on CPU with the backend's kind faked, at tiny sizes: it runs and
  divides by the right peak (the efficiencies themselves are meaningless)."""
  monkeypatch.setattr(calibrate, "backend_kind", lambda: "gpu")
  hw = hardware.load_hardware("h200")
  tiny = calibrate.ProbeSizes(gemm_m=32, gemm_k=64, gemm_chain=1, decode_m=8, decode_k=64,
                              decode_chain=1, stream_chain=1, latency_chain=1,
                              allreduce_bytes=1 << 12, allreduce_chain=1)
  probes = {}
  cal = calibrate.measure(hw, repeats=1, stream_bytes=1 << 16, extra=4, sizes=tiny,
                          probes=probes)
  assert probes["dtype"] == "bfloat16" and probes["peak_flops"] == hw.flops("bfloat16")
  assert cal.matmul_efficiency == pytest.approx(probes["gemm_flop_per_s"] / hw.flops("bfloat16"))
  assert "against h200" in cal.source and "bfloat16 GEMM 32x64x64" in cal.source
