"""Flag handling shared by the cost entry points (peak_analysis, shard_sweep)."""

from __future__ import annotations

from absl import app


def require_devices(n: int) -> None:
  """UsageError unless this process sees at least n devices."""
  import jax
  if n > jax.device_count():
    raise app.UsageError(f"--num_devices up to {n} needs that many devices; this process has "
                         f"{jax.device_count()} (on CPU set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n})")


def model_and_hardware(model: str, hardware: str, dtype: str):
  """(ModelConfig in `dtype`, HardwareSpec), bad names as UsageErrors listing the choices."""
  import lctx
  from lctx.cost.hardware import load_hardware
  try:
    return (lctx.ModelConfig.resolve(model, param_dtype=dtype, dtype=dtype),
            load_hardware(hardware))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
