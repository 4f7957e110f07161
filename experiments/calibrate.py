"""This machine's calibration of the calibrated cost mode, measured and cached.

  python -m experiments.calibrate [--hardware=NAME] [--refresh] [--json_out=cal.json]

Measures (lctx.cost.calibrate: GEMM efficiency at a prefill shape, streaming
bandwidth, per-kernel floors, and the all-reduce latency and bus bandwidth
over the local devices when there are several) against the hardware spec,
caches the result per machine (`$LCTX_CACHE_DIR`, else ~/.cache/lctx, under
calibration/<machine key>.json) and prints it beside the hardware file's
sourced calibration. A cached result is printed as is; --refresh measures
again. The default hardware is 'cpu-local' on CPU, and on a GPU / TPU the
preset of its device kind (lctx.cost.calibrate.preset_for_device_kind).
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import cli

_HARDWARE = flags.DEFINE_string(
    "hardware", None, "The spec the efficiencies divide by: a preset, 'cpu-local' or a spec "
    ".json, of this backend's kind. Default: 'cpu-local' on CPU, else the preset of the "
    "device kind.")
_REFRESH = flags.DEFINE_bool("refresh", False, "Measure again even when a cached calibration "
                             "exists (and overwrite it).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the cache record, the hardware "
                                "file's calibration and the cache path here as JSON.")


def _value(field: str, value) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value)
  if field.endswith("_s"):
    return f"{value * 1e6:.3g} us"
  return f"{value:.3f}"


def probe_lines(probes: dict) -> list[str]:
  """The raw probes worth reading beside the calibration (those present)."""
  lines = []
  try:
    lines.append(f"{probes['dtype']} GEMM {'x'.join(map(str, probes['gemm_shape']))}: "
                 f"{probes['gemm_flop_per_s'] / 1e9:.1f} GFLOP/s of the spec's "
                 f"{probes['peak_flops'] / 1e9:.1f}; stream {probes['stream_bytes_per_s'] / 1e9:.1f}"
                 f" GB/s of its HBM {probes['hbm_bandwidth'] / 1e9:.1f}")
    m, k, n = probes["decode_gemm_shape"]
    lines.append(f"decode-shaped GEMM {m}x{k}x{n}: {probes['decode_gemm_bytes_per_s'] / 1e9:.1f} "
                 f"GB/s ({probes['decode_gemm_bandwidth_fraction']:.2f} of the spec's HBM "
                 f"bandwidth; reported, not fitted)")
    if probes.get("allreduce_bus_bytes_per_s"):
      lines.append(f"all-reduce over {probes['devices']} devices: bus "
                   f"{probes['allreduce_bus_bytes_per_s'] / 1e9:.2f} GB/s at "
                   f"{probes['allreduce_bytes'] / 2**20:.3g} MiB of the spec's link "
                   f"{probes['interconnect_bandwidth'] / 1e9:.1f} GB/s")
  except (KeyError, TypeError, ValueError):  # an older or partial record: print what parsed
    pass
  return lines


def main(argv):
  del argv  # cli.run refuses positional arguments
  cli.check_output_paths(json_out=_JSON_OUT.value)
  # The CPU cost entry points (peak_analysis, shard_sweep, validate_cost
  # --machine) run with at least 8 fake CPU devices; measure the same machine.
  cli.want_cpu_devices(8)
  import jax

  from lctx.cost import calibrate, hardware
  try:
    name = _HARDWARE.value or calibrate.default_hardware()
    hw = hardware.load_hardware(name)
  except ValueError as e:
    raise app.UsageError(f"--hardware: {e}" if _HARDWARE.value else str(e)) from e
  if hw.kind != calibrate.backend_kind():
    raise app.UsageError(f"--hardware={name} is a {hw.kind}, but jax's default backend is "
                         f"{jax.default_backend()!r}: name hardware of kind "
                         f"{calibrate.backend_kind()!r}")
  devices = jax.local_devices()
  print(f"machine {calibrate.machine_key()}: {jax.default_backend()}, "
        f"{devices[0].device_kind} x{len(devices)}, jax {jax.__version__}; hardware {hw.name}")
  record, path, cached = calibrate.load_or_measure_record(hw, refresh=_REFRESH.value)
  measured = hardware.Calibration.from_dict(record["calibration"])
  sourced = hw.calibration
  status = ("read from" if cached else "measured now, NOT cached (could not write)"
            if "not_cached" in record else "measured now, cached in")
  print(f"{status} {path} "
        f"(created {record['created']}){'; --refresh measures again' if cached else ''}")
  print(f"  {'field':26s} {'measured':>12s} {'hardware file':>14s}")
  for field in hardware.CALIBRATION_FIELDS:
    theirs = "none" if sourced is None else _value(field, getattr(sourced, field))
    ours = _value(field, getattr(measured, field))
    if field not in calibrate.MEASURED_FIELDS:
      ours = f"({ours})"  # not probed: the default
    print(f"  {field:26s} {ours:>12s} {theirs:>14s}")
  print("  (parenthesized: not probed, the default)")
  print(f"  measured: {measured.source}")
  print(f"  hardware file: {sourced.source if sourced else f'{hw.name} has no calibration block'}")
  for line in probe_lines(record.get("probes") or {}):
    print(f"  {line}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({**record, "cache_path": str(path), "from_cache": cached,
                 "hardware_calibration": None if sourced is None else sourced.to_dict()},
                f, indent=1)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
