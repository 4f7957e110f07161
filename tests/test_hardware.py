"""Hardware presets, validation and CPU calibration (lctx.cost.hardware)."""

import json
import math

import pytest

from lctx.cost.hardware import (FLOPS_DTYPES, NUMERIC_FIELDS, HardwareSpec, calibrate_cpu,
                                list_hardware, load_hardware)

PRESETS = ("a100-40g-sxm", "a100-80g-sxm", "a100-80g-pcie", "h100-sxm", "h100-pcie", "h200",
           "b200", "mi300x", "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e")

A100 = dict(name="x", kind="gpu", peak_flops={"bfloat16": 312e12}, hbm_bytes=80e9,
            hbm_bandwidth=2.039e12, interconnect_bandwidth=300e9, host_bandwidth=32e9,
            collective_latency=1.5e-5)


def test_list_hardware():
  assert sorted(PRESETS) == list_hardware()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_cites(name):
  hw = load_hardware(name)
  assert hw.name == name and hw.kind in ("gpu", "tpu")
  assert hw.flops("bfloat16") > 0 and set(hw.peak_flops_dict) <= set(FLOPS_DTYPES)
  # Every figure carries a citation.
  calibrated = {f"calibration.{f}" for f in hw.to_dict().get("calibration", {})}
  host = {"host_memory_bytes"} if hw.host_memory_bytes is not None else set()
  assert set(hw.sources_dict) == {"peak_flops", *NUMERIC_FIELDS} | calibrated | host
  assert hash(hw) == hash(load_hardware(name))
  # B_crit = FLOP/s / bandwidth lies in a sane range for every accelerator.
  assert 50 < hw.flops("bfloat16") / hw.hbm_bandwidth < 700
  # Links are one direction of one device's links, and each file says so; a
  # collective's fixed latency is microseconds (NCCL/RCCL/ICI small messages).
  assert "per direction" in hw.sources_dict["interconnect_bandwidth"]
  assert 3e10 <= hw.interconnect_bandwidth <= 1e12
  assert 1e-6 <= hw.collective_latency <= 1e-4


@pytest.mark.parametrize("name, per_direction", [
    ("a100-40g-sxm", 300e9), ("a100-80g-sxm", 300e9), ("h100-sxm", 450e9), ("h200", 450e9),
    ("b200", 900e9), ("mi300x", 448e9)])
def test_interconnect_is_half_the_bidirectional_datasheet_figure(name, per_direction):
  """NVLink 600 / 900 / 1800 GB/s and Infinity Fabric 896 GB/s are both
  directions together; a ring sends at the per-direction rate."""
  assert load_hardware(name).interconnect_bandwidth == per_direction


@pytest.mark.parametrize("name, per_direction", [
    ("a100-80g-pcie", 32e9), ("h100-pcie", 64e9),  # PCIe: an NVLink bridge joins pairs only
    ("tpu-v4", 2 * 45e9), ("tpu-v5e", 200e9 / 2), ("tpu-v5p", 600e9 / 3), ("tpu-v6e", 400e9 / 2)])
def test_interconnect_is_what_a_one_axis_collective_gets(name, per_direction):
  """Beyond 2 PCIe GPUs a ring crosses PCIe; on a TPU torus a collective along
  one mesh axis uses 2 of the chip's links (4 on v5e/v6e, 6 on v4/v5p)."""
  assert load_hardware(name).interconnect_bandwidth == per_direction


def test_a100_matches_framework():
  hw = load_hardware("a100-80g-sxm")
  assert (hw.flops("bfloat16"), hw.hbm_bandwidth, hw.hbm_bytes) == (312e12, 2.039e12, 80e9)
  assert hw.interconnect_bandwidth == 300e9 and hw.host_bandwidth == 32e9  # per direction
  assert hw.collective_latency == 1.5e-5
  assert round(hw.flops("bfloat16") / hw.hbm_bandwidth) == 153  # FRAMEWORK.md: about 150


def test_load_from_path_roundtrip(tmp_path):
  hw = load_hardware("h100-sxm")
  path = tmp_path / "mine.json"
  path.write_text(json.dumps(hw.replace(name="mine").to_dict()))
  assert load_hardware(str(path)) == hw.replace(name="mine")


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="not-a-chip") as e:
    load_hardware("not-a-chip")
  assert all(name in str(e.value) for name in PRESETS + ("cpu-local",))


def test_flops_unknown_dtype():
  with pytest.raises(ValueError, match=r"float64.*available: \['bfloat16', 'float16'"):
    load_hardware("a100-80g-sxm").flops("float64")
  with pytest.raises(ValueError, match="float32"):
    load_hardware("tpu-v5e").flops("float32")  # the MXU has no native fp32 peak listed


@pytest.mark.parametrize("change, match", [
    (dict(hbm_bytes=0), "hbm_bytes"),
    (dict(hbm_bandwidth=-1.0), "hbm_bandwidth"),
    (dict(host_bandwidth=float("nan")), "host_bandwidth"),
    (dict(interconnect_bandwidth="600e9"), "interconnect_bandwidth"),
    (dict(collective_latency=-1e-5), "collective_latency"),
    (dict(collective_latency=float("inf")), "collective_latency"),
    (dict(collective_latency="15us"), "collective_latency"),
    (dict(hbm_bytes=True), "hbm_bytes"),
    (dict(kind="fpga"), r"kind.*allowed: \('gpu', 'tpu', 'cpu'\)"),
    (dict(name=""), "name"),
    (dict(peak_flops={}), "peak_flops"),
    (dict(peak_flops={"float64": 1e12}), "float64.*allowed"),
    (dict(peak_flops={"bfloat16": 0}), "peak_flops"),
    (dict(sources={"speed": "x"}), "sources key 'speed'"),
])
def test_bad_field(change, match):
  with pytest.raises(ValueError, match=match):
    HardwareSpec(**{**A100, **change})


def test_from_dict_missing_and_unknown_fields():
  with pytest.raises(ValueError, match=r"missing required field\(s\) \['hbm_bandwidth'\]"):
    HardwareSpec.from_dict({k: v for k, v in A100.items() if k != "hbm_bandwidth"})
  with pytest.raises(ValueError, match=r"missing required field\(s\) \['collective_latency'\]"):
    HardwareSpec.from_dict({k: v for k, v in A100.items() if k != "collective_latency"})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['tdp'\]"):
    HardwareSpec.from_dict({**A100, "tdp": 400})


def test_calibrate_cpu_small():
  hw = calibrate_cpu(matmul_size=256, read_bytes=16 << 20, repeats=3)
  assert hw.name == "cpu-local" and hw.kind == "cpu"
  values = [hw.flops("float32"), *(getattr(hw, f) for f in NUMERIC_FIELDS)]
  assert all(math.isfinite(v) and v > 0 for v in values)
  assert hw.hbm_bytes > 16 << 20
  assert "measured by calibrate_cpu on" in hw.sources_dict["peak_flops"]
  # Eight fake CPU devices (conftest): the latency of one psum across them, measured.
  assert "psum" in hw.sources_dict["collective_latency"] and hw.collective_latency < 0.1
  with pytest.raises(ValueError, match="matmul_size"):
    calibrate_cpu(matmul_size=0)
