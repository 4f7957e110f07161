"""Measured calibration of the machine at hand (the CPU here; the same probes
run on a GPU backend): the constants of lctx.cost.calibrated.Calibration.

Each probe times jitted programs after a warm-up (medians of `repeats`), and
isolates what it measures by difference: a floor is the time one more kernel
adds to a chain of dependent tiny kernels inside one program, so dispatch and
launch of the program itself cancel out.

- matmul_efficiency: FLOP/s of a model-shaped fp32 GEMM ([512, 1024] x
  [1024, 1024]) / the spec's peak (which cpu-local measures at 2048^3);
- memory_efficiency: bytes read and written by a streaming elementwise kernel
  (y = x / 2 + 1 over 256 MiB, 8 passes in one program) per second / the spec's HBM bandwidth (a read-only
  sum, for cpu-local), capped at 1;
- matmul_floor_s: the time one more tiny (8 x 8) dependent GEMM adds;
- other_floor_s: the time one more tiny elementwise kernel adds (fusion
  prevented by optimization barriers);
- collective_efficiency: 1 (a CPU host's collectives are memory copies; the
  spec's measured latency already covers their cost).
"""

from __future__ import annotations

import datetime

from lctx.cost.calibrated import Calibration
from lctx.cost.hardware import median_time


def _per_extra(make, x, extra: int, repeats: int) -> float:
  """(time of make(1 + extra) - time of make(1)) / extra, at least 1e-9 s."""
  slow = median_time(make(1 + extra), x, repeats=repeats)
  fast = median_time(make(1), x, repeats=repeats)
  return max((slow - fast) / extra, 1e-9)


def measure(hw, repeats: int = 7, stream_bytes: int = 256 << 20, extra: int = 200) -> Calibration:
  """The Calibration of this process's default backend against spec `hw`
  (whose float32 peak and HBM bandwidth the efficiencies divide by).
  Raises ValueError for a non-positive argument."""
  import jax
  import jax.numpy as jnp

  for name, value in (("repeats", repeats), ("stream_bytes", stream_bytes), ("extra", extra)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"measure: {name}={value!r}; allowed: a positive integer")
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (512, 1024), jnp.float32)
  b = jax.random.normal(key, (1024, 1024), jnp.float32)
  gemm = 2 * 512 * 1024 * 1024 / median_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
  del a, b

  # Passes inside one program reuse one buffer: a fresh output per call would
  # time the OS's first touch of new pages, not the memory.
  x, passes = jnp.ones((stream_bytes // 4,), jnp.float32), 8
  sweep = jax.jit(lambda v: jax.lax.fori_loop(0, passes, lambda _, u: 0.5 * u + 1, v))
  stream = passes * 2 * x.nbytes / median_time(sweep, x, repeats=repeats)
  del x

  def dots(n):
    def f(m):
      for _ in range(n):
        m = jax.lax.optimization_barrier(m @ m * 0.5)
      return m
    return jax.jit(f)

  def elementwise(n):
    def f(v):
      for _ in range(n):
        v = jax.lax.optimization_barrier(v * 0.5 + 1)
      return v
    return jax.jit(f)

  tiny = jnp.eye(8, dtype=jnp.float32)
  stamp = (f"measured by lctx.cost.calibrate on {datetime.date.today().isoformat()} "
           f"({jax.default_backend()}, {jax.devices()[0].device_kind}), medians of {repeats}")
  return Calibration(
      matmul_efficiency=min(gemm / hw.flops("float32"), 1.0),
      memory_efficiency=min(stream / hw.hbm_bandwidth, 1.0),
      collective_efficiency=1.0,
      matmul_floor_s=_per_extra(dots, tiny, extra, repeats),
      other_floor_s=_per_extra(elementwise, tiny[0], extra, repeats),
      source=f"{stamp}: GEMM 512x1024x1024 {gemm / 1e9:.1f} GFLOP/s, stream "
             f"{stream / 1e9:.1f} GB/s, floors by difference over {extra} tiny kernels")
