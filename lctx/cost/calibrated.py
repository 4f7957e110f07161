"""The calibrated cost mode: the roofline with efficiencies and per-kernel floors.

The roofline (metrics.roofline_seconds) charges each op max(FLOPs / peak,
bytes / bandwidth) at datasheet peaks: the paper's theoretical bound. Real
steps run slower for reasons neither tensor parallelism nor KV compression
removes: GEMMs reach a fraction of peak, memory-bound kernels a fraction of
the bandwidth, every kernel pays a fixed launch/prologue time, and collectives
a latency and a fraction of the link bandwidth. The calibrated mode charges,
per op of the compiled program,

    max(dot FLOPs / (eta x peak) + other FLOPs / peak,
        bytes / (eta_memory x HBM bandwidth))

(eta: attention_efficiency for ops under the model's attention scope,
matmul_efficiency for the rest), plus, per kernel of the optimized program
(lctx.cost.kernels), a floor by class (matmul, attention, other; the CPU's
convert-only kernels take none), plus per collective

    latency + f(p) x bytes / (eta_collective x link bandwidth)

(f the ring factor of metrics.RING_FACTORS; latency the calibration's
collective_latency_s, else the spec's collective_latency; a collective's
latency is its floor, so collectives take no kernel floor), plus once per run
program_floor_s (the host's dispatch), plus, when the calibration says the
machine runs the compiled program itself (compiled_kernels: a measured
calibration of lctx's own program, not a serving engine's), the kernels as XLA
launches them (lctx.cost.kernels.kernel_profile) and its copy and convert
kernels' bytes at the memory efficiency. With every efficiency 1, every floor
0 and compiled_kernels False it is the roofline exactly (tested).
"""

from __future__ import annotations

from lctx.cost import hlo
from lctx.cost.hardware import Calibration
from lctx.cost.metrics import collective_seconds


ROOFLINE = Calibration(source="the roofline: datasheet peaks, no floors")


def calibrated_seconds(costs: hlo.Costs, hw, dtype: str, cal: Calibration) -> float:
  """Predicted seconds of one run of a program with per-device `costs` (from
  hlo.analyze, kernel counts included) on hardware `hw` computing in `dtype`
  (module docstring). Raises ValueError when floors are set and the costs
  carry no kernel counts."""
  from lctx.model.attention import SCOPE
  peak, bw = hw.flops(dtype), hw.hbm_bandwidth
  gemm = cal.matmul_efficiency_for(dtype)
  compute = 0.0
  for name, (flops, nbytes, _, dot) in costs.ops.items():
    eta = cal.attention_efficiency if f"/{SCOPE}/" in name else gemm
    # dot FLOPs run at eta x peak, the rest (elementwise) at peak.
    compute += max((flops + dot * (1 / eta - 1)) / peak, nbytes / (cal.memory_efficiency * bw))
  floors = {"matmul": cal.matmul_floor_s, "attention": cal.attention_floor_s,
            "other": cal.other_floor_s}
  kernels = costs.kernels_compiled if cal.compiled_kernels else costs.kernels
  if any(floors.values()) and not kernels:
    raise ValueError("kernel floors need the program's kernel counts (hlo.analyze sets "
                     "Costs.kernels from the optimized module); these costs have none")
  launch = (sum(kernels.get(k, 0.0) * floor for k, floor in floors.items())
            + cal.program_floor_s)
  if cal.compiled_kernels:
    compute += costs.copy_bytes / (cal.memory_efficiency * bw)
  comm = sum(count * collective_seconds(kind, nbytes, p, hw, cal.collective_latency_s,
                                        cal.collective_efficiency)
             for kind, nbytes, p, count in costs.collective_ops)
  return compute + launch + comm


def for_hardware(hw) -> Calibration:
  """The calibration of spec `hw`: its hardware file's sourced block; for
  'cpu-local', this machine's measured calibration (lctx.cost.calibrate,
  cached per machine); else ROOFLINE-equivalent values whose `source` says the
  spec has none (callers print it: calibrated then equals the roofline)."""
  from lctx.cost.hardware import CPU_LOCAL
  if hw.calibration is not None:
    return hw.calibration
  if hw.name == CPU_LOCAL:
    from lctx.cost import calibrate
    return calibrate.load_or_measure(hw)
  return Calibration(source=f"none: {hw.name} has no sourced calibration block, so its "
                            "calibrated figures equal the roofline")
