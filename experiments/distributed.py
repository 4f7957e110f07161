"""--distributed and its flags, shared by the experiment entry points.

On a cluster (TPU pods, SLURM GPU nodes) `--distributed` alone is enough:
jax.distributed.initialize() finds the coordinator itself. For local runs
(several processes on one machine, CPU devices, gloo collectives) pass
--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I.
"""

from __future__ import annotations

from absl import app, flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() before anything else "
    "(multi-host: every process runs the same command).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (local multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)


def maybe_initialize() -> None:
  """Joins the multi-process job when --distributed is set (before any jax computation)."""
  if not _DISTRIBUTED.value:
    for name in ("coordinator_address", "num_processes", "process_id"):
      if flags.FLAGS[name].present:
        raise app.UsageError(f"--{name} needs --distributed")
    return
  import jax
  # CPU devices of several processes talk through gloo (no effect on GPU/TPU);
  # set before the backends start, as initialize() must come first too.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except ValueError as e:  # e.g. no coordinator address off a cluster
    raise app.UsageError(f"--distributed: {e} (give --coordinator_address, --num_processes "
                         f"and --process_id, or run under a cluster that sets them)") from e


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0
