"""Accelerator specs for the cost model: peak FLOP/s, HBM size and bandwidth, links.

Presets live in configs/hardware/<name>.json (datasheet figures, each with a
citation in `sources`). Units: FLOP/s, bytes (decimal), bytes/s, seconds. Link
bandwidths are per device and per direction: `interconnect_bandwidth` is what
one device can send (and, at the same time, receive) over its device-to-device
links (NVLink / Infinity Fabric / ICI; half the vendors' "bidirectional"
aggregate, e.g. 300e9 for an A100's 600 GB/s NVLink), `host_bandwidth` is one
direction of the host link (PCIe). `collective_latency` is the fixed cost of
one collective on that system (the small-message latency of an all-reduce over
its devices, NCCL / RCCL / ICI), paid once per collective whatever its size
(see lctx.cost.metrics.roofline_seconds).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Mapping

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "hardware"

KINDS = ("gpu", "tpu", "cpu")
FLOPS_DTYPES = ("float32", "float16", "bfloat16", "float8", "int8")
NUMERIC_FIELDS = ("hbm_bytes", "hbm_bandwidth", "interconnect_bandwidth", "host_bandwidth",
                  "collective_latency")
REQUIRED_FIELDS = ("name", "kind", "peak_flops") + NUMERIC_FIELDS
CPU_LOCAL = "cpu-local"  # measured at load time, see calibrate_cpu
CPU_DTYPES = ("float32", "bfloat16", "float16")  # what calibrate_cpu can measure
CPU_COLLECTIVE_LATENCY = 1e-5  # s; cpu-local's stand-in when it has one CPU device only


def np_bool_types() -> tuple[type, ...]:
  """numpy's bool scalar type (a number to numbers.Real checks), if numpy is here."""
  try:
    import numpy as np
    return (np.bool_,)
  except ImportError:
    return ()


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What one machine achieves of its spec (lctx.cost.calibrated): efficiencies
  (achieved / peak, in (0, 1]), per-kernel floors in seconds, and optionally
  the latency of one collective in seconds (None: the spec's
  collective_latency). `source` says where the numbers come from. Raises
  ValueError naming the field for an efficiency outside (0, 1] or a negative,
  non-finite or non-numeric floor or latency."""
  matmul_efficiency: float = 1.0  # GEMMs, of peak FLOP/s
  float8_matmul_efficiency: float | None = None  # fp8 GEMMs, of the fp8 peak; None: as above
  attention_efficiency: float = 1.0  # attention's contractions (QK^T, PV), of peak FLOP/s
  memory_efficiency: float = 1.0  # of HBM bandwidth
  collective_efficiency: float = 1.0  # of interconnect_bandwidth (per direction)
  matmul_floor_s: float = 0.0  # per GEMM kernel
  attention_floor_s: float = 0.0  # per fused attention kernel
  other_floor_s: float = 0.0  # per elementwise / reduction kernel
  collective_latency_s: float | None = None  # per collective; None: the spec's
  program_floor_s: float = 0.0  # per run of a program (dispatch from the host)
  # What runs on this machine: lctx's compiled program as XLA built it (True:
  # its kernels as launched, attention and XLA's loops trip by trip, and its
  # copy/convert kernels' bytes) or a serving engine's fused kernels (False:
  # one kernel per attention call, no copies).
  compiled_kernels: bool = False
  source: str = dataclasses.field(default="", compare=False)  # provenance, not a value

  def __post_init__(self):
    for f in CALIBRATION_EFFICIENCIES + ("float8_matmul_efficiency",):
      v = getattr(self, f)
      if v is None and f == "float8_matmul_efficiency":
        continue
      if isinstance(v, (bool, np_bool_types())) or not (isinstance(v, numbers.Real) and 0 < v <= 1):
        raise ValueError(f"Calibration.{f}={v!r}; allowed: a number in (0, 1]")
    for f in CALIBRATION_FLOORS + ("collective_latency_s",):
      v = getattr(self, f)
      if v is None and f == "collective_latency_s":
        continue
      if (isinstance(v, (bool, np_bool_types())) or not isinstance(v, numbers.Real)
          or not math.isfinite(v) or v < 0):
        raise ValueError(f"Calibration.{f}={v!r}; allowed: a finite number of seconds >= 0")
    if isinstance(self.compiled_kernels, np_bool_types()):
      object.__setattr__(self, "compiled_kernels", bool(self.compiled_kernels))
    if not isinstance(self.compiled_kernels, bool):
      raise ValueError(f"Calibration.compiled_kernels={self.compiled_kernels!r}; "
                       "allowed: True, False")
    if not isinstance(self.source, str):
      raise ValueError(f"Calibration.source={self.source!r}; allowed: a string")

  def matmul_efficiency_for(self, dtype: str) -> float:
    """The GEMM efficiency of a program computing in `dtype`."""
    if dtype == "float8" and self.float8_matmul_efficiency is not None:
      return self.float8_matmul_efficiency
    return self.matmul_efficiency

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
    """Raises ValueError naming unknown keys."""
    allowed = tuple(f.name for f in dataclasses.fields(cls))
    if not isinstance(d, Mapping):
      raise ValueError(f"calibration must be a mapping of {allowed}, got {d!r}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
      raise ValueError(f"calibration has unknown field(s) {unknown}; allowed: {allowed}")
    return cls(**d)


CALIBRATION_EFFICIENCIES = ("matmul_efficiency", "attention_efficiency", "memory_efficiency",
                            "collective_efficiency")
CALIBRATION_FLOORS = ("matmul_floor_s", "attention_floor_s", "other_floor_s", "program_floor_s")
CALIBRATION_FIELDS = (CALIBRATION_EFFICIENCIES + ("float8_matmul_efficiency",) + CALIBRATION_FLOORS
                      + ("collective_latency_s", "compiled_kernels"))


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
  """One device. Mappings are stored as sorted (key, value) tuples so the spec
  stays hashable; pass dicts, read them back with `peak_flops_dict` / `sources_dict`."""

  name: str
  kind: str
  peak_flops: tuple[tuple[str, float], ...]  # dtype -> dense FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float
  interconnect_bandwidth: float  # bytes/s per device, one direction
  host_bandwidth: float  # bytes/s per device, one direction
  collective_latency: float  # seconds per collective
  sources: tuple[tuple[str, str], ...] = ()  # field (or 'calibration.<field>') -> citation
  # What this hardware achieves of the peaks above, from cited measurements
  # (configs/hardware 'calibration' blocks); None: no sourced calibration.
  calibration: Calibration | None = None
  # Host (CPU) memory per device that can hold offloaded KV caches, bytes;
  # None: not stated (offload's concurrency is then bounded by HBM only).
  host_memory_bytes: float | None = None

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
    if isinstance(self.calibration, Mapping):
      object.__setattr__(self, "calibration", Calibration.from_dict(self.calibration))
    if self.calibration is not None and not isinstance(self.calibration, Calibration):
      raise ValueError(f"HardwareSpec.calibration must be a Calibration, a mapping or None, "
                       f"got {self.calibration!r}")
    if self.host_memory_bytes is not None:
      _check_positive("host_memory_bytes", self.host_memory_bytes)
      object.__setattr__(self, "host_memory_bytes", float(self.host_memory_bytes))
    sources = _pairs(self.sources, "sources")
    allowed = REQUIRED_FIELDS[1:] + ("host_memory_bytes",) + tuple(
        f"calibration.{f}" for f in CALIBRATION_FIELDS)
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
    if self.calibration is None:
      del d["calibration"]
    else:
      default = Calibration()  # a file states what differs from the defaults
      d["calibration"] = {k: v for k, v in self.calibration.to_dict().items()
                          if k != "source" and v != getattr(default, k)}
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "HardwareSpec":
    missing = [k for k in REQUIRED_FIELDS if k not in d]
    if missing:
      raise ValueError(f"hardware spec is missing required field(s) {missing}")
    allowed = REQUIRED_FIELDS + ("sources", "calibration", "host_memory_bytes")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
      raise ValueError(f"hardware spec has unknown field(s) {unknown}; allowed: {allowed}")
    d = dict(d)
    if isinstance(d.get("calibration"), Mapping):
      block = d["calibration"]
      if "source" in block:
        raise ValueError("hardware spec calibration: cite each value in 'sources' as "
                         "'calibration.<field>', not in a 'source' key")
      d["calibration"] = Calibration.from_dict(dict(
          block, source=f"{d['name']} hardware file, each value cited in its sources"))
    return cls(**d)


def list_hardware() -> list[str]:
  """Preset names in configs/hardware ('cpu-local' is measured, not listed)."""
  return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_hardware(name_or_path: str | os.PathLike,
                  dtypes: tuple[str, ...] | list[str] = ()) -> HardwareSpec:
  """A preset name, 'cpu-local' (measured now), or a path to a spec .json.

  `dtypes`: the dtypes the caller will ask `flops` for, checked first: a preset
  or file without a peak for one of them is a ValueError naming the ones it
  has; 'cpu-local' measures float32 and each of them (ValueError, before any
  measuring, for a dtype calibrate_cpu cannot measure)."""
  name = str(name_or_path)
  dtypes = tuple(dtypes)
  for dtype in dtypes:
    if dtype not in FLOPS_DTYPES:
      raise ValueError(f"dtype {dtype!r} not allowed; allowed: {FLOPS_DTYPES}")
  if name == CPU_LOCAL:
    return calibrate_cpu(dtypes=tuple(dict.fromkeys(("float32",) + dtypes)))
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
  spec = HardwareSpec.from_dict(d)
  if spec.calibration is not None:  # say which file, and how much of it is cited
    block = spec.to_dict().get("calibration", {})
    cited = [f for f in block if f"calibration.{f}" in spec.sources_dict]
    what = ("every value the default (the roofline)" if not block else
            f"{len(cited)} of its {len(block)} values cited in the file's sources")
    shown = f"configs/hardware/{path.name}" if path.parent == PRESET_DIR else str(path)
    spec = spec.replace(calibration=dataclasses.replace(
        spec.calibration, source=f"{shown} calibration block: {what}"))
  for dtype in dtypes:
    spec.flops(dtype)  # ValueError listing the dtypes it has
  return spec


def median_time(fn, *args, repeats: int) -> float:
  """Median seconds of fn(*args) (blocked on its result) over `repeats` runs
  after one warm-up run (which also compiles), at least 1e-9."""
  import jax
  import numpy as np
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return max(float(np.median(times)), 1e-9)


def calibrate_cpu(matmul_size: int = 2048, read_bytes: int = 1 << 30,
                  repeats: int = 5, dtypes: tuple[str, ...] = ("float32",)) -> HardwareSpec:
  """Measures this machine: matmul FLOP/s in each of `dtypes` (any of
  CPU_DTYPES, checked before measuring; the spec has a peak for these only),
  memory read bandwidth and the latency of one all-reduce across its CPU
  devices (medians of `repeats` timed runs after a warm-up). RAM stands in for HBM, and the same memory serves as
  interconnect and host link, so both take the read bandwidth. The collective
  latency is the time one more psum of a tiny array over all local CPU devices
  adds inside a compiled loop (XLA's in-process CPU collectives: a rendezvous of
  the device threads); with a single CPU device nothing is exchanged and
  CPU_COLLECTIVE_LATENCY stands in."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  for field, value in (("matmul_size", matmul_size), ("read_bytes", read_bytes),
                       ("repeats", repeats)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"calibrate_cpu {field} must be a positive integer, got {value!r}")
  if isinstance(dtypes, str) or not dtypes or any(d not in CPU_DTYPES for d in dtypes):
    raise ValueError(f"calibrate_cpu dtypes must be a non-empty sequence of {CPU_DTYPES} (the "
                     f"dtypes it can measure a matmul in), got {dtypes!r}")
  dtypes = tuple(dict.fromkeys(dtypes))

  median = lambda fn, *args: median_time(fn, *args, repeats=repeats)
  n = matmul_size
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  peak_flops = {}
  for dtype in dtypes:
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    peak_flops[dtype] = 2 * n**3 / median(jax.jit(jnp.matmul), a, b)
  del a, b

  buf = jnp.ones((max(read_bytes // 4, 1),), jnp.float32)
  nbytes = buf.nbytes
  read_bw = nbytes / median(jax.jit(jnp.sum), buf)
  del buf

  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  stamp = f"measured by calibrate_cpu on {datetime.date.today().isoformat()}"
  try:
    devices = jax.devices("cpu")
  except RuntimeError:  # no CPU backend initialized (JAX_PLATFORMS names another)
    devices = []
  if len(devices) > 1:
    # The extra time of `extra` more dependent psums inside one compiled loop,
    # per psum: the program's dispatch cancels out.
    from jax.sharding import Mesh, PartitionSpec
    mesh, extra = Mesh(np.array(devices), ("d",)), 32

    def chain(trips):
      body = lambda x: jax.lax.fori_loop(
          0, trips, lambda _, v: jax.lax.psum(v, "d") / len(devices), x)
      return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("d"),
                                   out_specs=PartitionSpec("d"), check_vma=False))

    x = jnp.ones((len(devices),), jnp.float32)
    latency = max((median(chain(1 + extra), x) - median(chain(1), x)) / extra, 1e-9)
    latency_source = (f"{stamp}: one more psum of {len(devices)} floats over {len(devices)} "
                      f"CPU devices inside a compiled loop, median of {repeats}")
  else:
    latency = CPU_COLLECTIVE_LATENCY
    latency_source = ("assumed: at most one CPU device, nothing to measure (a collective "
                      "over one device costs nothing in roofline_seconds)")
  return HardwareSpec(
      name=CPU_LOCAL, kind="cpu", peak_flops=peak_flops, hbm_bytes=ram,
      hbm_bandwidth=read_bw, interconnect_bandwidth=read_bw, host_bandwidth=read_bw,
      collective_latency=latency,
      sources={
          "peak_flops": f"{stamp}: jit {'/'.join(dtypes)} matmul {n}x{n}, median of {repeats}",
          "hbm_bytes": "physical RAM from os.sysconf",
          "hbm_bandwidth": f"{stamp}: jit sum over {nbytes} B, median of {repeats}",
          "interconnect_bandwidth": "same as hbm_bandwidth (one memory on a CPU host, "
                                    "per direction)",
          "host_bandwidth": "same as hbm_bandwidth (one memory on a CPU host)",
          "collective_latency": latency_source,
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
