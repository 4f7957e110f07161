"""The four long-context metrics for a model on a device, closed form next to compiled HLO.

  python -m experiments.peak_analysis            # yi-34b on A100 80GB, 1/2/4/8 GPUs
  python -m experiments.peak_analysis --hardware=h100-sxm --contexts=4000,1000000 \\
      --json_out=out.json --plot_out=out.png

For every context length and tensor-parallel device count it compiles lctx's
prefill and decode programs from abstract shapes (nothing is allocated) and
reads per-device costs from their partitioned HLO (`hlo` rows), beside the
framework's closed form (`analytic` rows, --convention exact or paper).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

from experiments import costing, distributed

_MODEL = flags.DEFINE_string("model", "yi-34b", "Preset name or config.json path.")
_HARDWARE = flags.DEFINE_string("hardware", "a100-80g-sxm", "Hardware preset (configs/hardware) "
                                "or spec json, or cpu-local (measured).")
_NUM_DEVICES = flags.DEFINE_list("num_devices", ["1", "2", "4", "8"],
                                 "Tensor-parallel device counts (mesh model:g).")
_CONTEXTS = flags.DEFINE_list("contexts", ["4000", "50000", "100000", "200000", "1000000"],
                              "Context lengths in tokens (decimal, as in the paper).")
_BATCH = flags.DEFINE_integer("batch", 1, "Users decoded together.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Weights and KV cache dtype.")
_CONVENTION = flags.DEFINE_enum("convention", "exact", ["exact", "paper"],
                                "Closed-form convention (see lctx.cost.analytic).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every row here as JSON.")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Draw the four metrics vs context (PNG).")


def _ints(name: str, values) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name} must be comma-separated integers, got {values}") from None
  if not out or min(out) < 1:
    raise app.UsageError(f"--{name} must be positive integers, got {values}")
  return out


def _gb(x: float) -> str:
  return f"{x / 1e9:.2f}"


def format_table(rows) -> str:
  """One line per (context, devices): analytic | hlo for each metric."""
  pairs = {}
  for r in rows:
    pairs.setdefault((r.context, r.num_devices), {})[r.source] = r
  head = (f"{'context':>9} {'g':>2} {'KV/user GB':>10} {'weights/dev GB':>14} "
          f"{'concurrency':>12} {'prefill s':>17} {'decode ms/tok':>15} {'ctx switch s':>14}")
  lines = [head, " " * 27 + "(analytic | hlo; KV per user over all devices, weights per device)"]
  for (T, g), by in sorted(pairs.items()):
    a, h = by["analytic"], by["hlo"]
    lines.append(
        f"{T:>9} {g:>2} {_gb(a.kv_bytes_per_user * g):>10} "
        f"{_gb(a.weight_bytes_per_device) + '|' + _gb(h.weight_bytes_per_device):>14} "
        f"{f'{a.concurrency}|{h.concurrency}':>12} "
        f"{f'{a.prefill_s:.2f}|{h.prefill_s:.2f}':>17} "
        f"{f'{a.decode_step_s * 1e3:.2f}|{h.decode_step_s * 1e3:.2f}':>15} "
        f"{f'{a.context_switch_s:.3f}|{h.context_switch_s:.3f}':>14}")
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  panels = [("concurrency", "users that fit", 1), ("prefill_s", "prefill latency (s)", 1),
            ("decode_step_s", "decode latency (ms/token)", 1e3),
            ("context_switch_s", "context switch (s)", 1)]
  devices = sorted({r.num_devices for r in rows})
  for ax, (field, label, scale) in zip(axes.flat, panels):
    for i, g in enumerate(devices):
      for source, style in (("analytic", "--"), ("hlo", "-")):
        pts = sorted((r.context, getattr(r, field) * scale) for r in rows
                     if r.num_devices == g and r.source == source)
        ax.plot([p[0] for p in pts], [max(p[1], 1e-9) if field != "concurrency" else p[1]
                                      for p in pts], style, color=f"C{i}", marker="o", ms=3,
                label=f"{g} dev, {source}")
    ax.set_xscale("log")
    ax.set_yscale("symlog" if field == "concurrency" else "log")
    if field == "concurrency":
      ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens)")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  r0 = rows[0]
  fig.suptitle(f"{r0.model} on {r0.hardware}, batch {r0.batch}: closed form (dashed) vs "
               f"compiled HLO (solid)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.maybe_initialize()

  from lctx.cost import metrics

  devices, contexts = _ints("num_devices", _NUM_DEVICES.value), _ints("contexts", _CONTEXTS.value)
  costing.require_devices(max(devices))
  config, hw = costing.model_and_hardware(_MODEL.value, _HARDWARE.value, _DTYPE.value)
  print(f"model {config.name} ({config.num_params / 1e9:.3f}B params, {_DTYPE.value}), "
        f"hardware {hw.name}, devices {devices}, contexts {contexts}, batch {_BATCH.value}, "
        f"convention {_CONVENTION.value}", flush=True)
  rows, start = [], time.perf_counter()
  for i, T in enumerate(contexts):
    for g in devices:
      try:
        rows.append(metrics.from_closed_form(config, hw, g, T, _BATCH.value, _DTYPE.value,
                                             _CONVENTION.value))
        rows.append(metrics.from_hlo(config, hw, g, T, _BATCH.value, _DTYPE.value))
      except ValueError as e:
        raise app.UsageError(f"context {T} on {g} devices: {e}") from e
    print(f"[{i + 1}/{len(contexts)}] context {T}: {time.perf_counter() - start:.1f} s",
          flush=True)
  print(format_table(rows))
  print(f"total {time.perf_counter() - start:.1f} s")
  report = [dataclasses.asdict(r) for r in rows]
  if _CONVENTION.value == "paper":
    from lctx.cost import paper
    if config.name != "yi-34b":
      print("(the paper's figures T1-T15 are for yi-34b; none to compare for this model)")
    else:
      targets = paper.targets(config, hw)
      print("\nThe paper's figures (FRAMEWORK.md T1-T15) beside lctx's closed form, paper "
            f"convention, on {hw.name}:\n" + paper.format_targets(targets))
      report = {"rows": report, "paper_targets": [
          {**dataclasses.asdict(t), "diff_percent": t.diff_percent} for t in targets]}
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")
  if _PLOT_OUT.value:
    plot(rows, _PLOT_OUT.value)
    print(f"wrote {_PLOT_OUT.value}")


if __name__ == "__main__":
  # Compile-only: 8 CPU devices stand in for the accelerators being analysed.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  app.run(main)
