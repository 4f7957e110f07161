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


def kv_replication_note(config, mesh: str) -> str | None:
  """A one-line note when a mesh's `model` axis exceeds the model's KV heads:
  each KV head (its cache slice and K/V projections) then lives on model / K
  devices (see lctx.sharding.Plan); None otherwise."""
  from lctx import sharding
  m, K = sharding.parse_mesh_spec(mesh)["model"], config.num_kv_heads
  if m <= K:
    return None
  return (f"note: mesh {mesh}: the model axis ({m}) exceeds the {K} KV heads of "
          f"{config.name}; each KV head and its cache are replicated on {m // K} devices "
          f"(per-device cache = 1/{K} of a user's, not 1/{m})")
