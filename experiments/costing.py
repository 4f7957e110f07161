"""Flag handling shared by the cost entry points (peak_analysis, shard_sweep)."""

from __future__ import annotations

import os

from absl import app

from experiments import cli


def require_devices(n: int, flag: str) -> None:
  """UsageError unless this process sees at least n devices; `flag` names the
  flag that asked for them (e.g. '--mesh=model:16')."""
  import jax
  if n > jax.device_count():
    raise app.UsageError(f"{flag} needs {n} devices; this process has {jax.device_count()} "
                         f"({cli.devices_hint(n)})")


def model(model: str, dtype: str):
  """The ModelConfig in `dtype`; a bad name is a UsageError listing the presets."""
  import lctx
  try:
    if model.lower().endswith(".gguf"):  # a GGUF file: the config in its metadata
      from lctx.gguf_import import read_gguf_config
      return read_gguf_config(model, param_dtype=dtype, dtype=dtype)
    return lctx.ModelConfig.resolve(model, param_dtype=dtype, dtype=dtype)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--model={model}: {e}") from e


def kv_heads(config, num_kv_heads: int, flag: str = "--kv_heads"):
  """`config` converted to `num_kv_heads` KV heads (lctx.convert.gqa_config,
  the config of lctx.mha_to_gqa's mean-pooled model); 0 = `config` as it is.
  A UsageError naming `flag` and the allowed divisors for a bad count."""
  if not num_kv_heads:
    return config
  from lctx import convert
  try:
    return convert.gqa_config(config, num_kv_heads)
  except ValueError as e:
    raise app.UsageError(f"{flag}={num_kv_heads}: {e}") from e


def hardware(hardware: str, dtype: str):
  """The HardwareSpec; a bad name is a UsageError listing the choices, and a spec
  without a peak for `dtype` is refused (cpu-local measures float32 and `dtype`)."""
  from lctx.cost.hardware import CPU_LOCAL, load_hardware
  try:  # cpu-local measures float32 and `dtype`
    spec = load_hardware(hardware, dtypes=(dtype,) if hardware == CPU_LOCAL else ())
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--hardware={hardware}: {e}") from e
  try:
    spec.flops(dtype)
  except ValueError as e:
    raise app.UsageError(f"--dtype={dtype} on --hardware={hardware}: {e}") from e
  return spec


def model_and_hardware(model_name: str, hardware_name: str, dtype: str):
  """(model(...), hardware(...))."""
  return model(model_name, dtype), hardware(hardware_name, dtype)


def check_contexts(contexts, flag: str) -> None:
  """UsageError for a context lctx cannot index (int32 positions)."""
  big = [T for T in contexts if T > cli.MAX_TOKENS]
  if big:
    raise app.UsageError(f"{flag}: {big} exceed{'s' if len(big) == 1 else ''} the "
                         f"{cli.MAX_TOKENS} tokens lctx's int32 positions can index")


def kv_replication_note(config, mesh: str) -> str | None:
  """A one-line note when a mesh's `model` axis exceeds the model's KV heads:
  each KV head (its cache slice and K/V projections) then lives on model / K
  devices (see lctx.sharding.Plan); None otherwise."""
  from lctx import sharding
  sizes = sharding.parse_mesh_spec(mesh)
  m, s, K = sizes["model"], sizes["seq"], config.num_kv_heads
  if m <= K:
    return None
  return (f"note: mesh {mesh}: the model axis ({m}) exceeds the {K} KV heads of "
          f"{config.name}; each KV head and its cache are replicated on {m // K} devices "
          f"(per-device cache = 1/{K * s} of a user's, not 1/{m * s})")


def quality_rows(flag, unmeasured: str) -> tuple[list[dict], str]:
  """(rows of the --quality_json `flag` (an absl FlagHolder), where they came
  from): no rows when its default file is missing (then every lossy
  `unmeasured`, e.g. "cache", is unmeasured); a UsageError naming the flag for
  a given path that is missing or malformed."""
  from lctx.quality import results
  path = flag.value
  try:
    rows = results.load_rows(path, required=bool(flag.present))
  except (OSError, ValueError) as e:
    raise app.UsageError(f"--quality_json={path}: {e}") from e
  return rows, (path if os.path.exists(path) else
                f"{path} (not found: every lossy {unmeasured} unmeasured)")
