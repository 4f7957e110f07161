"""What every entry point shares: short errors, early input checks, fake CPU devices.

- `run(main)` replaces `app.run(main)`: a bad flag value, a stray positional
  argument or an `app.UsageError` raised by main prints one line,
  `error: <reason>`, to stderr and exits with status 2 (absl would print the
  module's docstring and every flag's help first).
- `check_output_paths` checks, before any work, that each output file flag
  can be written (its directory exists and is writable).
- `want_cpu_devices(n)` makes the host platform show n devices (XLA_FLAGS),
  before jax starts, so `--mesh` works on CPU without setting XLA_FLAGS.

Nothing here imports jax: entry points call these before jax initializes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from absl import app, flags

EXIT_USAGE = 2
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MAX_TOKENS = 2**31 - 1  # lctx's positions and lengths are int32


def fail(reason) -> None:
  """Prints `error: <reason>` to stderr and exits with status 2."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {reason}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USAGE)


def warn(message: str) -> None:
  """`warning: <message>` on stdout, with the run's other output (stderr's first
  line stays the reason when a run then fails)."""
  print(f"warning: {message}", flush=True)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a bad value, a failed validator
    fail(str(e).replace("\n", " "))


def run(main) -> None:
  """app.run(main) with one-line usage errors (see the module docstring)."""

  def checked(argv):
    # jax logs an INFO line per absent backend (TPU, ...) when it starts: it
    # would come before an error raised after that.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected positional argument(s) {argv[1:]}: every input is a "
                             f"flag (--name=value)")
      return main(argv)
    except app.UsageError as e:
      fail(e)

  app.run(checked, flags_parser=_parse_flags)


def check_output_paths(**paths: str | None) -> None:
  """UsageError unless every given path (flag name -> path, None = unset) can be
  written: not a directory, its directory exists and is writable; a *plot_out
  path's suffix must be a format matplotlib writes."""
  for name, path in paths.items():
    if not path:
      continue
    p = Path(path)
    parent = p.parent
    if p.is_dir():
      raise app.UsageError(f"--{name}={path}: is a directory; give a file path")
    if not parent.is_dir():
      raise app.UsageError(f"--{name}={path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
      raise app.UsageError(f"--{name}={path}: not writable")
    if name.endswith("plot_out"):  # matplotlib picks the format from the suffix
      from matplotlib.backends.backend_agg import FigureCanvasAgg
      kinds = FigureCanvasAgg.get_supported_filetypes()
      if p.suffix.lstrip(".").lower() not in kinds:
        raise app.UsageError(f"--{name}={path}: allowed suffixes (matplotlib): "
                             f"{', '.join('.' + k for k in sorted(kinds))}")


def mesh_size(spec: str) -> int | None:
  """Devices a mesh spec ('data:2,model:4') names; None when it does not parse
  (lctx.sharding.parse_mesh_spec reports why later). jax-free."""
  sizes = []
  for part in filter(None, (p.strip() for p in str(spec).split(","))):
    _, _, size = part.partition(":")
    if not size.isdigit():
      return None
    sizes.append(int(size))
  return math.prod(sizes) if sizes else None


def mesh_axis_size(spec: str, axis: str) -> int:
  """The size of one axis of a mesh spec that mesh_size parses (1 when the
  spec does not name it). jax-free."""
  sizes = [part.strip().partition(":") for part in str(spec).split(",") if part.strip()]
  return math.prod(int(size) for name, _, size in sizes if name.strip() == axis)


def want_cpu_devices(n: int) -> None:
  """Lets the host (CPU) platform show `n` devices, by adding
  --xla_force_host_platform_device_count to XLA_FLAGS, unless XLA_FLAGS already
  sets a count (the user's wins), JAX_PLATFORMS leaves out cpu, or jax's
  backends have already started (too late). Harmless where jax runs on an
  accelerator: only the host platform's device count changes."""
  current = os.environ.get("XLA_FLAGS", "")
  if n <= 1 or DEVICE_COUNT_FLAG in current:
    return
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms and "cpu" not in [p.strip() for p in platforms.split(",")]:
    return
  if "jax" in sys.modules:
    try:
      from jax._src import xla_bridge
      if xla_bridge.backends_are_initialized():
        return
    except (ImportError, AttributeError):
      pass
  os.environ["XLA_FLAGS"] = f"{current} {DEVICE_COUNT_FLAG}={n}".strip()


def devices_hint(n: int) -> str:
  """How to get n devices, for an error message."""
  current = os.environ.get("XLA_FLAGS", "")
  if DEVICE_COUNT_FLAG in current:
    return f"XLA_FLAGS={current!r} sets the CPU device count: raise it to {n} or unset it"
  return f"on CPU, XLA_FLAGS={DEVICE_COUNT_FLAG}={n} gives {n} devices"


def warn_beyond_positions(config, contexts, what: str = "context") -> None:
  """A warning naming the contexts beyond the model's max_position_embeddings."""
  beyond = [T for T in contexts if T > config.max_position_embeddings]
  if beyond:
    named = f"{what} {beyond[0]} exceeds" if len(beyond) == 1 else f"{what}s {beyond} exceed"
    warn(f"{named} the max_position_embeddings ({config.max_position_embeddings}) of "
         f"{config.name}: the model was not trained for those positions (running anyway)")


def available_memory_bytes() -> int | None:
  """Host memory a new allocation can get: MemAvailable from /proc/meminfo
  (free memory plus reclaimable caches), else os.sysconf's free pages; capped by
  a cgroup v2 memory limit when one is set. None when nothing can be read."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
          break
  except (OSError, ValueError, IndexError):
    pass
  if avail is None:
    try:
      avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
      return None
  try:
    limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    if limit != "max":
      used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
      avail = min(avail, max(int(limit) - used, 0))
  except (OSError, ValueError):
    pass
  return avail


def gb(x: float) -> str:
  """Decimal GB, or MB below 1 GB."""
  return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB"
