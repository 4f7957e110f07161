"""The calibrated cost mode: the roofline with efficiencies and per-kernel floors.

The roofline (metrics.roofline_seconds) charges each op max(FLOPs / peak,
bytes / bandwidth) at datasheet peaks: the paper's theoretical bound. Real
steps run slower for reasons neither tensor parallelism nor KV compression
removes: GEMMs reach a fraction of peak, memory-bound kernels a fraction of
the bandwidth, every kernel pays a fixed launch/prologue time, and collectives
a latency and a fraction of the link bandwidth. The calibrated mode charges,
per op of the compiled program,

    max(dot FLOPs / (eta_matmul x peak) + other FLOPs / peak,
        bytes / (eta_memory x HBM bandwidth))

plus, per kernel of the optimized program (lctx.cost.kernels), a floor by
class (matmul or other), plus per collective

    collective_latency + f(p) x bytes / (eta_collective x link bandwidth)

(f the ring factor of metrics.RING_FACTORS; a collective's latency is its
floor, so collectives take no kernel floor). With every efficiency 1 and
every floor 0 it is the roofline exactly (tested).
"""

from __future__ import annotations

import dataclasses
import math

from lctx.cost import hlo
from lctx.cost.metrics import RING_FACTORS


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Efficiencies (achieved / peak, in (0, 1]) and kernel floors (s) of one
  machine; `source` says where each number comes from. Raises ValueError for
  an efficiency outside (0, 1] or a negative or non-finite floor."""
  matmul_efficiency: float = 1.0
  memory_efficiency: float = 1.0
  collective_efficiency: float = 1.0
  matmul_floor_s: float = 0.0  # per GEMM / attention kernel
  other_floor_s: float = 0.0  # per elementwise / reduction / copy kernel
  source: str = ""

  def __post_init__(self):
    for f in ("matmul_efficiency", "memory_efficiency", "collective_efficiency"):
      v = getattr(self, f)
      if not (isinstance(v, (int, float)) and 0 < v <= 1):
        raise ValueError(f"Calibration.{f}={v!r}; allowed: a number in (0, 1]")
    for f in ("matmul_floor_s", "other_floor_s"):
      v = getattr(self, f)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"Calibration.{f}={v!r}; allowed: a finite number of seconds >= 0")


ROOFLINE = Calibration(source="the roofline: datasheet peaks, no floors")


def calibrated_seconds(costs: hlo.Costs, hw, dtype: str, cal: Calibration) -> float:
  """Predicted seconds of one run of a program with per-device `costs` (from
  hlo.analyze, kernel counts included) on hardware `hw` computing in `dtype`.
  Raises ValueError when floors are set and the costs carry no kernel counts."""
  peak, bw = hw.flops(dtype), hw.hbm_bandwidth
  slow = 1 / cal.matmul_efficiency - 1  # extra time per dot FLOP, in peak-FLOP units
  compute = sum(max((flops + dot * slow) / peak, nbytes / (cal.memory_efficiency * bw))
                for flops, nbytes, _, dot in costs.ops.values())
  if (cal.matmul_floor_s or cal.other_floor_s) and not costs.kernels:
    raise ValueError("kernel floors need the program's kernel counts (hlo.analyze sets "
                     "Costs.kernels from the optimized module); these costs have none")
  floors = (costs.kernels.get("matmul", 0.0) * cal.matmul_floor_s
            + costs.kernels.get("other", 0.0) * cal.other_floor_s)
  comm = sum(count * (hw.collective_latency + RING_FACTORS[kind](p) * nbytes
                      / (cal.collective_efficiency * hw.interconnect_bandwidth))
             for kind, nbytes, p, count in costs.collective_ops if p > 1)
  return compute + floors + comm
