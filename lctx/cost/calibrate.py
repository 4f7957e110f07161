"""Measured calibration of the machine at hand (this CPU, or a GPU / TPU
backend): the constants of lctx.cost.hardware.Calibration, cached per machine.

Each probe is a small function timing jitted programs after a warm-up
(medians of `repeats`, lctx.cost.hardware.median_time) and isolates what it
measures by difference: the time of a program doing 1 + k units of work minus
that of one doing 1, over k, so dispatch, launch and the first touch of an
output buffer cancel out. The compute dtype is float32 on CPU, bfloat16 on an
accelerator (the spec's peak for that dtype is the denominator).

- matmul_efficiency: FLOP/s of a model-shaped (prefill) GEMM [M, K] x [K, K]
  (CPU 512 x 1024 x 1024; accelerator 4096^3) / the spec's peak (which
  cpu-local measures at 2048^3), capped at 1;
- memory_efficiency: bytes read and written per second by a streaming
  elementwise pass (y = x / 2 + 1 over 256 MiB on CPU, 1 GiB on an
  accelerator) / the spec's HBM bandwidth (a read-only sum, for cpu-local),
  capped at 1. A decode-shaped GEMM ([8, K] x [K, K]) is timed too and its
  achieved bandwidth reported in the probes only (not fitted);
- matmul_floor_s: the time one more kernel adds to a chain of tiny (8 x 8)
  dependent GEMMs; other_floor_s: the same for a chain of tiny row-softmax
  numerators (a reduction and an elementwise kernel). Kernels are counted on
  the optimized module with lctx.cost.kernels, as the calibrated mode counts
  a model's;
- program_floor_s: one call of a jitted program taking DISPATCH_LEAVES tiny
  arrays (host dispatch, as each engine step pays it);
- compiled_kernels: True (what runs here is lctx's own compiled program, whose
  kernels run as XLA launched them and whose copies are real work);
- collective_latency_s: with more than one local device, the time one more
  all-reduce of one element per device adds inside a compiled loop; None
  (the spec's collective_latency) with one device;
- collective_efficiency: with more than one device, the all-reduce bus
  bandwidth (NCCL's busBw = 2(p-1)/p x bytes / time, the factor
  lctx.cost.metrics.RING_FACTORS charges) on a large per-device buffer / the
  spec's interconnect_bandwidth, capped at 1; 1 with one device.

`load_or_measure(hw)` caches the result as JSON under
`cache_dir()/calibration/<machine_key()>.json`; `python -m
experiments.calibrate` prints and refreshes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

from lctx.cost.hardware import CPU_LOCAL, Calibration, list_hardware, median_time

logger = logging.getLogger(__name__)

CACHE_ENV = "LCTX_CACHE_DIR"
# The Calibration fields `measure` sets; the others keep their defaults.
MEASURED_FIELDS = ("matmul_efficiency", "attention_efficiency", "memory_efficiency",
                   "collective_efficiency", "matmul_floor_s", "other_floor_s",
                   "collective_latency_s", "program_floor_s", "compiled_kernels")
# A model step's arguments: tiny's params and cache leaves (14 + 3), rounded up.
DISPATCH_LEAVES = 20
CACHE_VERSION = 4  # bump when the probes change meaning: older files are re-measured


@dataclasses.dataclass(frozen=True)
class ProbeSizes:
  """Problem sizes of the probes (elements unless named bytes). Each `*_chain`
  is k, the extra units of work the difference is taken over."""
  gemm_m: int  # prefill GEMM [gemm_m, gemm_k] x [gemm_k, gemm_k]
  gemm_k: int
  gemm_chain: int
  decode_m: int  # decode GEMM [decode_m, decode_k] x [decode_k, decode_k]
  decode_k: int
  decode_chain: int
  stream_chain: int  # extra streaming passes
  latency_chain: int  # extra tiny all-reduces
  allreduce_bytes: int  # per device, of the bandwidth all-reduce
  allreduce_chain: int

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"ProbeSizes.{f.name}={v!r}; allowed: a positive integer")


# CPU: the whole measure() stays well under 30 s on two cores; the decode
# weight (64 MiB fp32) exceeds the last-level cache, so it streams from RAM.
CPU_SIZES = ProbeSizes(gemm_m=512, gemm_k=1024, gemm_chain=4, decode_m=8, decode_k=4096,
                       decode_chain=4, stream_chain=4, latency_chain=32,
                       allreduce_bytes=16 << 20, allreduce_chain=4)
# Accelerator: a 4096^3 bf16 GEMM (~0.14 ms on an H100) and a 128 MiB decode
# weight (beyond any GPU's L2); 256 MiB all-reduces reach the bus bandwidth.
ACCELERATOR_SIZES = ProbeSizes(gemm_m=4096, gemm_k=4096, gemm_chain=16, decode_m=8,
                               decode_k=8192, decode_chain=32, stream_chain=8,
                               latency_chain=64, allreduce_bytes=256 << 20, allreduce_chain=8)
CPU_STREAM_BYTES, ACCELERATOR_STREAM_BYTES = 256 << 20, 1 << 30

# jax's device_kind (whitespace collapsed, lowercased) -> configs/hardware preset.
# Exact names only: a variant with other clocks or memory (H100 NVL, H200 NVL,
# A100 PCIe 40GB) has no preset and must be named with --hardware.
DEVICE_KIND_PRESETS = {
    "cpu": CPU_LOCAL,
    "nvidia h200": "h200",
    "nvidia h100 80gb hbm3": "h100-sxm",
    "nvidia h100 pcie": "h100-pcie",
    "nvidia b200": "b200",
    "nvidia a100-sxm4-80gb": "a100-80g-sxm",
    "nvidia a100-sxm4-40gb": "a100-40g-sxm",
    "nvidia a100 80gb pcie": "a100-80g-pcie",
    "amd instinct mi300x": "mi300x",
    "tpu v4": "tpu-v4",
    "tpu v5 lite": "tpu-v5e",
    "tpu v5e": "tpu-v5e",
    "tpu v5": "tpu-v5p",
    "tpu v5p": "tpu-v5p",
    "tpu v6 lite": "tpu-v6e",
    "tpu v6e": "tpu-v6e",
}


def preset_for_device_kind(kind: str) -> str | None:
  """The hardware name (a configs/hardware preset, or 'cpu-local' for 'cpu')
  of a jax device_kind, e.g. 'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB
  HBM3' -> 'h100-sxm', 'TPU v5 lite' -> 'tpu-v5e'; None when unknown."""
  return DEVICE_KIND_PRESETS.get(" ".join(str(kind).split()).lower())


def default_hardware() -> str:
  """The hardware name for this process's default backend: 'cpu-local' on CPU,
  else preset_for_device_kind of its first device. Raises ValueError naming
  the device kind and the presets when there is no preset for it."""
  import jax
  if jax.default_backend() == "cpu":
    return CPU_LOCAL
  kind = jax.local_devices()[0].device_kind
  name = preset_for_device_kind(kind)
  if name is None:
    raise ValueError(f"no hardware preset for device kind {kind!r}: name one with "
                     f"--hardware; allowed: {list_hardware() + [CPU_LOCAL]}")
  return name


def backend_kind() -> str:
  """'cpu', 'tpu' or 'gpu' (CUDA or ROCm): the HardwareSpec.kind of this
  process's default backend."""
  import jax
  backend = jax.default_backend()
  return backend if backend in ("cpu", "tpu") else "gpu"


# ---- the cache --------------------------------------------------------------------------------

def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown-cpu"


def machine_key() -> str:
  """This machine and backend as a filesystem-safe name: a readable slug of
  the jax backend, device kind, local device count, hostname and CPU model
  (lowercase [a-z0-9-], at most 80 characters) plus the first 12 hex digits of
  the SHA-256 of all of them (so truncation never merges two machines)."""
  import jax
  devices = jax.local_devices()
  parts = [jax.default_backend(), devices[0].device_kind, f"x{len(devices)}",
           socket.gethostname(), _cpu_model()]
  slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:80].rstrip("-")
  digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
  return f"{slug}-{digest}"


def cache_dir() -> Path:
  """$LCTX_CACHE_DIR when set (and non-empty), else ~/.cache/lctx."""
  env = os.environ.get(CACHE_ENV, "").strip()
  return Path(env).expanduser() if env else Path.home() / ".cache" / "lctx"


def cache_path(key: str | None = None, hardware: str | None = None) -> Path:
  """<cache_dir()>/calibration/<key or machine_key()>[--<hardware>].json: one
  file per machine (device count included) and spec measured against."""
  name = key or machine_key()
  if hardware:
    name += "--" + re.sub(r"[^A-Za-z0-9._-]+", "-", hardware)
  return cache_dir() / "calibration" / f"{name}.json"


def read_record(hw, path: Path) -> dict | None:
  """The cache record at `path` for spec `hw`, its calibration checked; None
  when absent, and None with a logged warning when it cannot be used
  (unreadable, not JSON, another machine key, hardware or cache version, or
  an invalid calibration): the caller re-measures and overwrites it."""
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    for field, want in (("version", CACHE_VERSION), ("machine_key", path.stem.split("--")[0]),
                        ("hardware", hw.name)):
      if record.get(field) != want:
        raise ValueError(f"{field} is {record.get(field)!r}, not {want!r}")
    Calibration.from_dict(record["calibration"])
  except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
    logger.warning("calibration cache %s unusable (%s): measuring again", path, e)
    return None
  return record


def _write_atomic(path: Path, record: dict) -> None:
  """Writes JSON to a temporary file beside `path`, then renames it over
  `path`: a concurrent reader sees the old file or the new one, never half."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
  try:
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    with os.fdopen(fd, "w") as f:
      json.dump(record, f, indent=1)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def load_or_measure_record(hw, refresh: bool = False) -> tuple[dict, Path, bool]:
  """(record, its path, whether it came from the cache) for spec `hw` on this
  machine: the cached record unless `refresh` or unusable (read_record), else
  one measured now (`measure`, default sizes) and written atomically. The
  record: {"version", "machine_key", "hardware", "created" (ISO 8601, UTC),
  "jax_version", "calibration": Calibration.to_dict(), "probes": measure's
  raw numbers}. A cache that cannot be written logs a warning and the
  measurement is still returned."""
  import jax
  key = machine_key()
  path = cache_path(key, hw.name)
  if not refresh:
    record = read_record(hw, path)
    if record is not None:
      return record, path, True
  logger.info("measuring the calibration of %s on %s (cache: %s)", hw.name, key, path)
  probes: dict[str, Any] = {}
  cal = measure(hw, probes=probes)
  record = {"version": CACHE_VERSION, "machine_key": key, "hardware": hw.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax_version": jax.__version__, "calibration": cal.to_dict(), "probes": probes}
  try:
    _write_atomic(path, record)
  except OSError as e:
    logger.warning("could not write the calibration cache %s (%s): using it uncached", path, e)
    record["not_cached"] = str(e)
  return record, path, False


def load_or_measure(hw, refresh: bool = False) -> Calibration:
  """This machine's Calibration against spec `hw`: cached (see
  load_or_measure_record; `refresh` re-measures), its `source` naming the
  cache file."""
  record, path, cached = load_or_measure_record(hw, refresh)
  cal = Calibration.from_dict(record["calibration"])
  status = ("read from" if cached else
            "not cached: could not write" if "not_cached" in record else "cached in")
  return dataclasses.replace(cal, source=f"{cal.source} [{status} {path}]")


# ---- the probes -------------------------------------------------------------------------------

def _by_difference(make, args, chain: int, repeats: int) -> float:
  """(time of make(1 + chain)(*args) - time of make(1)(*args)) / chain: the
  seconds one more unit of work adds; at least 1e-9."""
  slow = median_time(make(1 + chain), *args, repeats=repeats)
  fast = median_time(make(1), *args, repeats=repeats)
  return max((slow - fast) / chain, 1e-9)


def _gemm_chain(m: int, k: int, dtype, chain: int, repeats: int) -> float:
  """Seconds of one [m, k] x [k, k] GEMM in a chain of dependent ones (the
  weight scaled by 1/sqrt(k) so values stay O(1))."""
  import jax
  import jax.numpy as jnp
  key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (m, k), dtype)
  w = (jax.random.normal(key_w, (k, k), jnp.float32) / k**0.5).astype(dtype)

  def make(n):
    def f(x, w):
      for _ in range(n):  # unrolled: no loop overhead per GEMM on an accelerator
        x = x @ w
      return x
    return jax.jit(f)

  return _by_difference(make, (x, w), chain, repeats)


def _stream(nbytes: int, chain: int, repeats: int) -> float:
  """Bytes read and written per second by y = x / 2 + 1 over an fp32 buffer
  of `nbytes`. Passes inside one program reuse one buffer: a fresh output per
  call would time the OS's first touch of new pages, not the memory."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)

  def make(passes):
    return jax.jit(lambda v: jax.lax.fori_loop(0, passes, lambda _, u: 0.5 * u + 1, v))

  return 2 * x.nbytes / _by_difference(make, (x,), chain, repeats)


def _dispatch(leaves: int, repeats: int) -> float:
  """Seconds one call of a jitted program costs from the host: a program that
  takes `leaves` tiny arrays (a model step takes its params and cache leaves)
  and does next to nothing."""
  import jax
  import jax.numpy as jnp
  tree = [jnp.full((8,), float(i), jnp.float32) for i in range(leaves)]
  return median_time(jax.jit(lambda t: t[0] + t[-1]), tree, repeats=repeats)


def _kernels(fn, args) -> float:
  """Kernels (every class but collectives, lctx.cost.kernels) one run of the
  jitted `fn` launches, counted on the optimized module it runs."""
  from lctx.cost.kernels import kernel_counts
  counts = kernel_counts(fn.lower(*args).compile().as_text())
  return sum(v for k, v in counts.items() if k != "collective")


def _kernel_difference(long, short, args) -> float | None:
  """_kernels(long) - _kernels(short); None, with a warning, when the
  backend's optimized module does not parse (lctx.cost.hlo reads XLA:CPU's)."""
  try:
    return _kernels(long, args) - _kernels(short, args)
  except Exception as e:  # pylint: disable=broad-except
    logger.warning("calibration floor probe: cannot count kernels on this backend (%s: %s)",
                   type(e).__name__, e)
    return None


def _floor(make, args, extra: int, repeats: int) -> tuple[float, float]:
  """(seconds one more kernel adds, kernels per step) for a chain `make(n)` of
  n dependent tiny steps: the time difference between 1 + extra steps and 1,
  over the difference in kernels the optimized modules launch (XLA's fusion
  decides how many a step takes, and lctx.cost.kernels counts a model's the
  same way). Falls back to one kernel per step, with a warning, when XLA
  fused the whole chain or its kernels cannot be counted."""
  long, short = make(1 + extra), make(1)
  kernels = _kernel_difference(long, short, args)
  if kernels is not None and kernels <= 0:
    logger.warning("calibration floor probe: XLA fused %d steps into no extra kernels",
                   extra)
  if not kernels or kernels <= 0:
    kernels = extra  # one per step
  slow = median_time(long, *args, repeats=repeats)
  fast = median_time(short, *args, repeats=repeats)
  return max((slow - fast) / kernels, 1e-9), kernels / extra


def _floors(dtype, extra: int, repeats: int) -> tuple[float, float, float, float]:
  """(matmul floor s, matmul kernels per step, other floor s, other kernels
  per step) from chains of tiny dependent steps on 8 x 8 tiles: a GEMM by a
  permutation matrix (values stay put, no epilogue to fuse), resp. a row
  softmax numerator exp(v - max(v)) (a reduction and an elementwise kernel on
  CPU, as in a model's norms and softmaxes; values stay in (0, 1]).
  Optimization barriers would not do: XLA removes them before fusion and
  fuses an elementwise chain into one kernel."""
  import jax
  import jax.numpy as jnp

  def chain(step):
    def make(n):
      def f(v, *rest):
        for _ in range(n):
          v = step(v, *rest)
        return v
      return jax.jit(f)
    return make

  tile = jax.random.normal(jax.random.PRNGKey(0), (8, 8), jnp.float32).astype(dtype)
  perm = jnp.roll(jnp.eye(8, dtype=dtype), 1, axis=1)
  matmul = _floor(chain(lambda m, w: m @ w), (tile, perm), extra, repeats)
  other = _floor(chain(lambda v: jnp.exp(v - jnp.max(v, axis=1, keepdims=True))), (tile,),
                 extra, repeats)
  return matmul + other


def _allreduce_seconds(devices, per_device_elems: int, chain: int, repeats: int) -> float:
  """Seconds one more all-reduce (psum) of `per_device_elems` fp32 per device
  over `devices` adds inside a compiled loop. The loop state starts sharded
  (not replicated), so XLA cannot fold the repeated psum into a multiply; it
  is zeros, so the values stay finite."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh, spec = Mesh(np.array(devices), ("d",)), PartitionSpec("d")

  def make(trips):
    body = lambda x: jax.lax.fori_loop(0, trips, lambda _, v: jax.lax.psum(v, "d"), x)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec,
                                 check_vma=False))

  x = jax.device_put(jnp.zeros((len(devices) * per_device_elems,), jnp.float32),
                     NamedSharding(mesh, spec))
  return _by_difference(make, (x,), chain, repeats)


def measure(hw, repeats: int = 7, stream_bytes: int | None = None, extra: int = 200, *,
            sizes: ProbeSizes | None = None, probes: dict | None = None) -> Calibration:
  """The Calibration of this process's default backend against spec `hw`
  (efficiencies divide by its float32 peak on CPU, bfloat16 on an accelerator,
  its HBM and interconnect bandwidths). `repeats`: timed runs per median;
  `stream_bytes`: the streaming buffer (default 256 MiB on CPU, 1 GiB on an
  accelerator); `extra`: the tiny steps the floors are differenced over;
  `sizes`: the other probes' sizes (default CPU_SIZES / ACCELERATOR_SIZES).
  When `probes` is a dict, it is filled with the raw measured numbers
  (JSON-serializable; seconds, bytes/s, FLOP/s). Collectives run over all
  local devices of the backend. Raises ValueError for a non-positive argument
  or a spec whose kind is not this backend's, before measuring anything."""
  import jax
  import jax.numpy as jnp

  for name, value in (("repeats", repeats), ("stream_bytes", stream_bytes), ("extra", extra)):
    if value is None and name == "stream_bytes":
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"measure: {name}={value!r}; allowed: a positive integer")
  kind = backend_kind()
  if hw.kind != kind:
    raise ValueError(f"measure: hardware {hw.name!r} is a {hw.kind}, but jax's default "
                     f"backend here is {jax.default_backend()!r} ({kind}); measure on that "
                     f"hardware or name one of kind {kind!r}")
  on_cpu = kind == "cpu"
  sizes = sizes or (CPU_SIZES if on_cpu else ACCELERATOR_SIZES)
  stream_bytes = stream_bytes or (CPU_STREAM_BYTES if on_cpu else ACCELERATOR_STREAM_BYTES)
  dtype_name = "float32" if on_cpu else "bfloat16"
  dtype, peak = jnp.dtype(dtype_name), hw.flops(dtype_name)
  devices = jax.local_devices()

  s = sizes
  gemm_s = _gemm_chain(s.gemm_m, s.gemm_k, dtype, s.gemm_chain, repeats)
  gemm = 2 * s.gemm_m * s.gemm_k * s.gemm_k / gemm_s
  decode_s = _gemm_chain(s.decode_m, s.decode_k, dtype, s.decode_chain, repeats)
  decode_bytes = (s.decode_k * s.decode_k + 2 * s.decode_m * s.decode_k) * dtype.itemsize
  stream = _stream(stream_bytes, s.stream_chain, repeats)
  matmul_floor, matmul_per_step, other_floor, other_per_step = _floors(dtype, extra, repeats)
  dispatch = _dispatch(DISPATCH_LEAVES, repeats)

  p = len(devices)
  latency = busbw = None
  if p > 1:
    latency = _allreduce_seconds(devices, 1, s.latency_chain, repeats)
    elems = max(s.allreduce_bytes // 4, 1)
    busbw = 2 * (p - 1) / p * 4 * elems / _allreduce_seconds(devices, elems, s.allreduce_chain,
                                                             repeats)
  collective = 1.0 if busbw is None else min(busbw / hw.interconnect_bandwidth, 1.0)

  device = f"{jax.default_backend()}, {devices[0].device_kind} x{p}"
  if probes is not None:
    probes.update({
        "backend": jax.default_backend(), "device_kind": devices[0].device_kind, "devices": p,
        "dtype": dtype_name, "repeats": repeats, "sizes": dataclasses.asdict(s),
        "peak_flops": peak, "hbm_bandwidth": hw.hbm_bandwidth,
        "interconnect_bandwidth": hw.interconnect_bandwidth,
        "gemm_shape": [s.gemm_m, s.gemm_k, s.gemm_k], "gemm_s": gemm_s, "gemm_flop_per_s": gemm,
        "decode_gemm_shape": [s.decode_m, s.decode_k, s.decode_k], "decode_gemm_s": decode_s,
        "decode_gemm_bytes_per_s": decode_bytes / decode_s,
        "decode_gemm_bandwidth_fraction": decode_bytes / decode_s / hw.hbm_bandwidth,
        "stream_bytes": stream_bytes, "stream_bytes_per_s": stream,
        "floor_chain_steps": extra, "matmul_floor_s": matmul_floor,
        "matmul_floor_kernels_per_step": matmul_per_step, "other_floor_s": other_floor,
        "other_floor_kernels_per_step": other_per_step, "collective_latency_s": latency,
        "program_floor_s": dispatch, "program_floor_leaves": DISPATCH_LEAVES,
        "allreduce_bytes": s.allreduce_bytes if p > 1 else None,
        "allreduce_bus_bytes_per_s": busbw})
  collectives = ("one device: collectives not measured" if p == 1 else
                 f"all-reduce over {p} devices {latency * 1e6:.1f} us + bus "
                 f"{busbw / 1e9:.2f} GB/s at {s.allreduce_bytes / 2**20:.3g} MiB")
  return Calibration(
      matmul_efficiency=min(gemm / peak, 1.0),
      # lctx's attention runs as ordinary GEMMs here (no fused kernel is
      # measured), so its contractions get the GEMM's efficiency.
      attention_efficiency=min(gemm / peak, 1.0),
      memory_efficiency=min(stream / hw.hbm_bandwidth, 1.0),
      collective_efficiency=collective,
      matmul_floor_s=matmul_floor,
      other_floor_s=other_floor,
      collective_latency_s=latency,
      program_floor_s=dispatch,
      compiled_kernels=True,  # what runs here is lctx's own compiled program
      source=f"measured by lctx.cost.calibrate on {datetime.date.today().isoformat()} "
             f"({device}) against {hw.name}, medians of {repeats}: {dtype_name} GEMM "
             f"{s.gemm_m}x{s.gemm_k}x{s.gemm_k} {gemm / 1e9:.1f} GFLOP/s, stream "
             f"{stream / 1e9:.1f} GB/s, floors by difference over {extra} tiny steps, "
             f"{collectives}")
