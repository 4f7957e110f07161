"""Plots of experiments.quality_sweep rows (matplotlib, Agg).

Top: accuracy vs eviction ratio per method, one panel per (model, task),
the mean over its eligible cells (contexts and depths where the
uncompressed model is at least 90% accurate), the uncompressed accuracy as a
dashed line. Bottom: passkey accuracy as a depth x context-length heatmap per
method at the smallest measured ratio above 0, uncompressed first.
"""

from __future__ import annotations

import numpy as np


def mean_of(rows, key):
  """The mean of the rows' non-null `key` values; None when there are none."""
  vals = [r[key] for r in rows if r[key] is not None]
  return float(np.mean(vals)) if vals else None


def _mean(rows, key):
  m = mean_of(rows, key)
  return np.nan if m is None else m  # matplotlib leaves a gap at NaN


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = list(dict.fromkeys((r["model"], r["task"]) for r in rows if r["task"] != "fidelity"))
  passkey = [r for r in rows if r["task"] == "passkey"]
  ratios = sorted({r["ratio"] for r in passkey if r["ratio"]})
  heat_ratio = ratios[0] if ratios else None  # the mildest: the most to tell apart
  heat_methods = ["uncompressed"] + list(dict.fromkeys(
      r["method"] for r in passkey if r["ratio"] == heat_ratio and "+" not in r["method"]))
  heat_methods = heat_methods if passkey else []
  cols = min(max(len(panels), 1), 4)
  prow = -(-max(len(panels), 1) // cols)
  hcols = min(max(len(heat_methods), 1), 6)
  hrows = -(-len(heat_methods) // hcols) if heat_methods else 0
  fig = plt.figure(figsize=(4.2 * cols, 3.4 * prow + 2.4 * hrows + 0.5), layout="constrained")
  top, bottom = fig.subfigures(2, 1, height_ratios=[3.4 * prow, 2.4 * hrows + 1e-3])
  axes = top.subplots(prow, cols, squeeze=False).ravel()
  for ax in axes[len(panels):]:
    ax.axis("off")
  # One colour per method in every panel (tab20: more methods than tab10's colours).
  every = list(dict.fromkeys(r["method"] for r in rows if r["ratio"] is not None))
  colour = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(every)}
  for ax, (model, task) in zip(axes, panels):
    sel = [r for r in rows if r["model"] == model and r["task"] == task and r["eligible"]]
    base = [r for r in sel if r["spec"] == ""]
    for method in dict.fromkeys(r["method"] for r in sel if r["ratio"] is not None):
      pts = sorted({r["ratio"] for r in sel if r["method"] == method and r["ratio"] is not None})
      acc = [_mean([r for r in sel if r["method"] == method and r["ratio"] == x], "accuracy")
             for x in pts]
      style = "--" if method in ("oracle", "anti_oracle") else "-." if "+" in method else "-"
      ax.plot(pts, acc, style, marker="s" if "+" in method else "o", ms=3, label=method,
              color=colour[method])
    if base:
      ax.axhline(_mean(base, "accuracy"), color="k", ls=":", lw=1, label="uncompressed")
    ax.set_title(f"{model}: {task}" + ("" if sel else " (no eligible cell)"), fontsize=9)
    ax.set_xlabel("eviction ratio (fraction removed)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.tick_params(labelsize=7)
  if panels:
    axes[0].legend(fontsize=6, ncol=2)
  lengths = sorted({r["context"] for r in passkey})
  depths = sorted({r["depth"] for r in passkey})
  haxes = bottom.subplots(hrows, hcols, squeeze=False).ravel() if hrows else []
  for ax in haxes[len(heat_methods):]:
    ax.axis("off")
  for j, (ax, method) in enumerate(zip(haxes, heat_methods)):
    grid_v = np.full((len(depths), len(lengths)), np.nan)
    for r in passkey:
      if r["method"] == method and (r["ratio"] == heat_ratio or method == "uncompressed"):
        grid_v[depths.index(r["depth"]), lengths.index(r["context"])] = r["accuracy"]
    ax.imshow(grid_v, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=6)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
    ax.set_title(method + ("" if method == "uncompressed" else f" r={heat_ratio:g}"), fontsize=7)
    if j % hcols == 0:
      ax.set_ylabel("depth", fontsize=7)
  fig.suptitle("KV-cache compression vs accuracy (experiments.quality_sweep)"
               + ("; bottom: passkey accuracy, depth x context" if heat_methods else ""),
               fontsize=10 if heat_methods or cols > 2 else 8)
  fig.savefig(path, dpi=110)
  plt.close(fig)
