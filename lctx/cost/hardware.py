"""Accelerator specs for the cost model: peak FLOP/s, HBM size and bandwidth, links.

Presets live in configs/hardware/<name>.json (datasheet figures, each with a
citation in `sources`). Units: FLOP/s, bytes (decimal), bytes/s. Link
bandwidths are per device: `interconnect_bandwidth` is the vendor's aggregate
device-to-device figure (NVLink / Infinity Fabric / ICI, both directions),
`host_bandwidth` is one direction of the host link (PCIe).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "hardware"

KINDS = ("gpu", "tpu", "cpu")
FLOPS_DTYPES = ("float32", "float16", "bfloat16", "float8", "int8")
NUMERIC_FIELDS = ("hbm_bytes", "hbm_bandwidth", "interconnect_bandwidth", "host_bandwidth")
REQUIRED_FIELDS = ("name", "kind", "peak_flops") + NUMERIC_FIELDS
CPU_LOCAL = "cpu-local"  # measured at load time, see calibrate_cpu


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
  """One device. Mappings are stored as sorted (key, value) tuples so the spec
  stays hashable; pass dicts, read them back with `peak_flops_dict` / `sources_dict`."""

  name: str
  kind: str
  peak_flops: tuple[tuple[str, float], ...]  # dtype -> dense FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float
  interconnect_bandwidth: float
  host_bandwidth: float
  sources: tuple[tuple[str, str], ...] = ()  # field -> citation

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"HardwareSpec.name must be a non-empty string, got {self.name!r}")
    if self.kind not in KINDS:
      raise ValueError(f"HardwareSpec.kind {self.kind!r} not allowed; allowed: {KINDS}")
    flops = _pairs(self.peak_flops, "peak_flops")
    if not flops:
      raise ValueError(f"HardwareSpec.peak_flops must name at least one of {FLOPS_DTYPES}")
    for dtype, value in flops:
      if dtype not in FLOPS_DTYPES:
        raise ValueError(f"HardwareSpec.peak_flops dtype {dtype!r} not allowed; "
                         f"allowed: {FLOPS_DTYPES}")
      _check_positive(f"peak_flops[{dtype!r}]", value)
    object.__setattr__(self, "peak_flops", tuple((k, float(v)) for k, v in flops))
    for field in NUMERIC_FIELDS:
      _check_positive(field, getattr(self, field))
      object.__setattr__(self, field, float(getattr(self, field)))
    sources = _pairs(self.sources, "sources")
    allowed = REQUIRED_FIELDS[1:]
    for field, text in sources:
      if field not in allowed:
        raise ValueError(f"HardwareSpec.sources key {field!r} not allowed; allowed: {allowed}")
      if not isinstance(text, str):
        raise ValueError(f"HardwareSpec.sources[{field!r}] must be a string, got {text!r}")
    object.__setattr__(self, "sources", sources)

  def flops(self, dtype: str) -> float:
    """Dense peak FLOP/s for `dtype`."""
    table = self.peak_flops_dict
    if dtype not in table:
      raise ValueError(f"hardware {self.name!r} has no peak_flops for dtype {dtype!r}; "
                       f"available: {sorted(table)}")
    return table[dtype]

  @property
  def peak_flops_dict(self) -> dict[str, float]:
    return dict(self.peak_flops)

  @property
  def sources_dict(self) -> dict[str, str]:
    return dict(self.sources)

  def replace(self, **changes) -> "HardwareSpec":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["peak_flops"], d["sources"] = self.peak_flops_dict, self.sources_dict
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "HardwareSpec":
    missing = [k for k in REQUIRED_FIELDS if k not in d]
    if missing:
      raise ValueError(f"hardware spec is missing required field(s) {missing}")
    allowed = REQUIRED_FIELDS + ("sources",)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
      raise ValueError(f"hardware spec has unknown field(s) {unknown}; allowed: {allowed}")
    return cls(**d)


def list_hardware() -> list[str]:
  """Preset names in configs/hardware ('cpu-local' is measured, not listed)."""
  return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_hardware(name_or_path: str | os.PathLike) -> HardwareSpec:
  """A preset name, 'cpu-local' (measured now), or a path to a spec .json."""
  name = str(name_or_path)
  if name == CPU_LOCAL:
    return calibrate_cpu()
  if name in list_hardware():
    path = PRESET_DIR / f"{name}.json"
  elif os.path.isfile(name):
    path = Path(name)
  else:
    raise ValueError(f"hardware {name!r} is neither a preset nor a file; "
                     f"allowed: {list_hardware() + [CPU_LOCAL]}")
  with open(path) as f:
    d = json.load(f)
  if not isinstance(d, dict):
    raise ValueError(f"hardware file {path} must hold a JSON object")
  return HardwareSpec.from_dict(d)


def calibrate_cpu(matmul_size: int = 2048, read_bytes: int = 1 << 30,
                  repeats: int = 5) -> HardwareSpec:
  """Measures this machine: fp32 matmul FLOP/s and memory read bandwidth (medians
  of `repeats` timed runs after a warm-up). RAM stands in for HBM, and the same
  memory serves as interconnect and host link, so both take the read bandwidth."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  for field, value in (("matmul_size", matmul_size), ("read_bytes", read_bytes),
                       ("repeats", repeats)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"calibrate_cpu {field} must be a positive integer, got {value!r}")

  def median_time(fn, *args):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return max(float(np.median(times)), 1e-9)

  n = matmul_size
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  matmul_flops = 2 * n**3 / median_time(jax.jit(jnp.matmul), a, b)

  buf = jnp.ones((max(read_bytes // 4, 1),), jnp.float32)
  nbytes = buf.nbytes
  read_bw = nbytes / median_time(jax.jit(jnp.sum), buf)
  del buf

  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  stamp = f"measured by calibrate_cpu on {datetime.date.today().isoformat()}"
  return HardwareSpec(
      name=CPU_LOCAL, kind="cpu", peak_flops={"float32": matmul_flops}, hbm_bytes=ram,
      hbm_bandwidth=read_bw, interconnect_bandwidth=read_bw, host_bandwidth=read_bw,
      sources={
          "peak_flops": f"{stamp}: jit fp32 matmul {n}x{n}, median of {repeats}",
          "hbm_bytes": "physical RAM from os.sysconf",
          "hbm_bandwidth": f"{stamp}: jit sum over {nbytes} B, median of {repeats}",
          "interconnect_bandwidth": "same as hbm_bandwidth (one memory on a CPU host)",
          "host_bandwidth": "same as hbm_bandwidth (one memory on a CPU host)",
      })


def _pairs(value, field: str) -> tuple[tuple[str, Any], ...]:
  """A mapping or iterable of pairs -> sorted tuple of (str, value) pairs."""
  items = value.items() if isinstance(value, Mapping) else value
  try:
    pairs = tuple((k, v) for k, v in items)
  except (TypeError, ValueError):
    raise ValueError(f"HardwareSpec.{field} must be a mapping, got {value!r}") from None
  if any(not isinstance(k, str) for k, _ in pairs) or len({k for k, _ in pairs}) < len(pairs):
    raise ValueError(f"HardwareSpec.{field} keys must be distinct strings, got {value!r}")
  return tuple(sorted(pairs))


def _check_positive(field: str, value) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise ValueError(f"HardwareSpec.{field} must be a positive finite number, got {value!r}")
