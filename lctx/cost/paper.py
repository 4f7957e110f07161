"""The paper's reported figures (FRAMEWORK.md T1-T15) next to lctx's closed form.

Each target is recomputed from lctx.cost.analytic under the paper's
conventions (34e9 parameters, decimal contexts, bf16, A100 80GB) and shown
with the figure the paper prints (or FRAMEWORK.md derives) and the difference.
"""

from __future__ import annotations

import dataclasses

from lctx.config import ModelConfig
from lctx.cost import analytic
from lctx.cost.analytic import GiB

BF16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Target:
  id: str
  quantity: str
  paper: float  # as printed by the paper, or derived in FRAMEWORK.md
  ours: float
  unit: str

  @property
  def diff_percent(self) -> float:
    return 100 * (self.ours - self.paper) / self.paper if self.paper else 0.0


def targets(config: ModelConfig, hw, host_bandwidth: float = 32e9) -> list[Target]:
  """T1-T15 for Yi-34B on an A100-80GB-class spec (hw: HardwareSpec or stand-in)."""
  kv = lambda T: analytic.kv_bytes_per_user(config, T, BF16)
  conc = lambda T, g, unit: analytic.concurrency(config, T, hw, g, BF16, "paper", unit=unit).users
  mha = config.replace(num_kv_heads=config.num_heads)
  return [
      Target("T1", "KV bytes/token", 245_760, analytic.kv_bytes_per_token(config, BF16), "B"),
      Target("T2", "KV at 100K", 22.888, kv(100_000) / GiB, "GiB"),
      Target("T3", "KV at 4K", 0.9155, kv(4_000) / GiB, "GiB"),
      Target("T4", "KV at 50K", 12.288, kv(50_000) / 1e9, "GB"),
      Target("T5", "weights", 68.0, analytic.weight_bytes(config, BF16, "paper") / 1e9, "GB"),
      Target("T6", "prefill 4K, 1 GPU", 0.89,
             analytic.prefill_seconds(config, 4_000, hw, 1, BF16, "paper"), "s"),
      Target("T7", "prefill 50K, 1 GPU", 14.1,
             analytic.prefill_seconds(config, 50_000, hw, 1, BF16, "paper"), "s"),
      Target("T8", "decode 50K, 4 GPUs", 9.8,
             1e3 * analytic.decode_step_seconds(config, 1, 50_000, hw, 4, BF16, "paper"), "ms"),
      Target("T9", "decode 4K, 4 GPUs", 8.5,
             1e3 * analytic.decode_step_seconds(config, 1, 4_000, hw, 4, BF16, "paper"), "ms"),
      Target("T10", "concurrency 50K, 1 GPU (GiB)", 1, conc(50_000, 1, "GiB"), "users"),
      Target("T11", "concurrency 50K, 4 GPUs", 20, conc(50_000, 4, "GB"), "users"),
      Target("T12", "concurrency 100K, 2 GPUs (GiB)", 4, conc(100_000, 2, "GiB"), "users"),
      Target("T12", "concurrency 4K, 2 GPUs (GiB)", 100, conc(4_000, 2, "GiB"), "users"),
      Target("T13", "context switch 50K, 2 users", 0.768,
             analytic.context_switch_seconds(config, 50_000, host_bandwidth, BF16), "s"),
      Target("T14", "concurrency 50K, 8 GPUs", 46, conc(50_000, 8, "GB"), "users"),
      Target("T15", "MHA KV bytes/token", 1_720_320, analytic.kv_bytes_per_token(mha, BF16), "B"),
  ]


def format_targets(rows: list[Target]) -> str:
  lines = [f"{'':4} {'quantity':38} {'paper':>12} {'lctx':>12} {'diff':>7}"]
  for t in rows:
    lines.append(f"{t.id:4} {t.quantity:38} {t.paper:>12.5g} {t.ours:>12.5g} "
                 f"{t.diff_percent:>6.1f}% {t.unit}")
  return "\n".join(lines)
