"""lctx's predictions against published serving measurements.

  python -m experiments.validate_cost [--json_out=rows.json --plot_out=scatter.png]

Reads the measured TTFT / TPOT rows of aiconfigurator-core's
silicon_sample.csv (NVIDIA; `pip install --no-deps aiconfigurator-core==0.12.0`,
lctx.cost.published) and predicts each row lctx can cost with the framework's
closed form (the roofline at datasheet peaks, on the row's TP devices as one
group) through the steady-state serving model of lctx.cost.serving: prefill
of one ISL-token prompt, and a batch-C decode step at the mean context
ISL + OSL/2. Prints, per GPU, backend and TP, the median and 90th percentile
of |predicted / measured - 1| and the median predicted / measured (below 1:
optimistic), and lists what it skipped and why.

This is the first part of the calibrated-cost issue: the roofline's error on
real serving. Rows with fp8 weights or KV cache are skipped until lctx costs
weights and cache in separate dtypes; the calibrated mode
(lctx.cost.calibrated) joins once its constants have sources.
"""

from __future__ import annotations

import collections
import json
import time

from absl import app, flags
import numpy as np

from experiments import cli

_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every predicted row here as JSON.")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Write a predicted-vs-measured scatter here.")
_CSV = flags.DEFINE_string("csv", None, "A silicon_sample.csv to read instead of the installed "
                           "package's.")
_MACHINE = flags.DEFINE_bool(
    "machine", False, "Validate on this machine instead: run prefill and decode for real and "
    "compare with both modes for the measured cpu-local spec and calibration.")
_QUICK = flags.DEFINE_bool("quick", False, "With --machine: the small grid (contexts 1K and 4K).")
_MODELS = flags.DEFINE_list("models", ["tiny", "small"], "With --machine: the presets to run.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "With --machine: decode batch sizes.")


def predict(row, config_cache: dict) -> dict:
  """The closed-form roofline prediction of one published.ServingRow."""
  from lctx import ModelConfig
  from lctx.cost import hardware, metrics, serving
  key = (row.model, row.weight_dtype)
  if key not in config_cache:
    config_cache[key] = ModelConfig.from_preset(row.model, param_dtype=row.weight_dtype,
                                                dtype=row.weight_dtype)
  config, hw = config_cache[key], hardware.load_hardware(row.hardware)
  mesh = row.mesh
  prefill = metrics.from_closed_form(config, hw, mesh, row.isl, 1, dtype=row.weight_dtype)
  ctx = serving.decode_context(row.isl, row.osl)
  decode = metrics.from_closed_form(config, hw, mesh, ctx, row.concurrency,
                                    dtype=row.weight_dtype)
  lat = serving.steady_state(prefill.prefill_s, decode.decode_step_s, row.concurrency,
                             row.isl, row.osl)
  return {"index": row.index, "model": row.model, "hardware": row.hardware,
          "backend": row.backend, "backend_version": row.backend_version, "tp": row.tp,
          "concurrency": row.concurrency, "isl": row.isl, "osl": row.osl,
          "dtype": row.weight_dtype, "fits": decode.concurrency >= row.concurrency,
          "measured_ttft_s": row.ttft_s, "measured_tpot_s": row.tpot_s,
          "roofline_ttft_s": lat.ttft_s, "roofline_tpot_s": lat.tpot_s}


def error_table(rows: list[dict], mode: str = "roofline") -> list[dict]:
  """Per (hardware, backend, tp): n, median and p90 |pred/meas - 1|, median pred/meas."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["hardware"], r["backend"], r["tp"])].append(r)
  out = []
  for (hw, backend, tp), rs in sorted(groups.items()):
    entry = {"hardware": hw, "backend": backend, "tp": tp, "n": len(rs)}
    for metric in ("ttft", "tpot"):
      ratio = np.asarray([r[f"{mode}_{metric}_s"] / r[f"measured_{metric}_s"] for r in rs])
      err = np.abs(ratio - 1)
      entry.update({f"{metric}_median_err": float(np.median(err)),
                    f"{metric}_p90_err": float(np.percentile(err, 90)),
                    f"{metric}_median_ratio": float(np.median(ratio))})
    out.append(entry)
  return out


def machine_rows(models, contexts, batches, repeats: int = 3, steps: int = 8) -> list[dict]:
  """Measured and predicted prefill (one user, `context` tokens) and decode
  steps (`batch` users at a `context`-slot cache) of each preset on this
  machine's default device, fp32, stacked layers (the costed program)."""
  import jax
  import jax.numpy as jnp

  import lctx
  from lctx import engine
  from lctx.cost import calibrate, calibrated, hardware, metrics
  from lctx.cost.hardware import median_time
  hw = hardware.load_hardware("cpu-local")
  cal = calibrate.measure(hw)
  print(f"cpu-local: {hw.flops('float32') / 1e9:.0f} GFLOP/s, {hw.hbm_bandwidth / 1e9:.1f} GB/s; "
        f"{cal}")
  out = []
  for name in models:
    config = lctx.ModelConfig.from_preset(name)
    params = lctx.init_params(config, 0)
    for T in contexts:
      tokens = np.random.default_rng(0).integers(0, config.vocab_size, (max(batches), T))
      for kind, B in [("prefill", 1)] + [("decode", b) for b in batches]:
        if kind == "prefill":
          def run():
            cache = engine.new_cache(config, params, 1, T)
            return engine.prefill_jit(config, params, tokens[:1], np.full((1,), T, np.int32),
                                      cache)[0]
          measured = median_time(run, repeats=repeats)
        else:
          cache = engine.new_cache(config, params, B, T)
          _, cache = engine.prefill_jit(config, params, tokens[:B, :T - steps],
                                        np.full((B,), T - steps, np.int32), cache)
          token = jnp.zeros((B,), jnp.int32)
          times = []
          for i in range(steps):
            start = time.perf_counter()
            logits, cache = engine.decode_jit(config, params, token, cache)
            jax.block_until_ready(logits)
            if i:  # the first step compiles
              times.append(time.perf_counter() - start)
          measured = float(np.median(times))
        costs = metrics.program_costs(config, "model:1", T, B, kind)
        roof = metrics.roofline_seconds(costs, hw, "float32")
        cali = calibrated.calibrated_seconds(costs, hw, "float32", cal)
        out.append({"model": name, "phase": kind, "context": T, "batch": B, "mesh": "model:1",
                    "predicted_roofline_s": roof, "predicted_calibrated_s": cali,
                    "measured_s": measured, "ratio_roofline": roof / measured,
                    "ratio_calibrated": cali / measured})
        r = out[-1]
        print(f"  {name:8s} {kind:7s} T={T:6d} B={B:2d}  measured {measured * 1e3:9.2f} ms  "
              f"roofline {roof * 1e3:9.2f} ms ({r['ratio_roofline']:.2f})  calibrated "
              f"{cali * 1e3:9.2f} ms ({r['ratio_calibrated']:.2f})", flush=True)
  return out


def machine_main() -> None:
  contexts = (1024, 4096) if _QUICK.value else (1024, 4096, 16384, 32768)
  try:
    batches = sorted({int(b) for b in _BATCHES.value})
  except ValueError as e:
    raise app.UsageError(f"--batches={_BATCHES.value}: integers, e.g. 1,4") from e
  if not batches or min(batches) < 1:
    raise app.UsageError(f"--batches={_BATCHES.value}: positive integers")
  from lctx.config import list_presets
  unknown = [m for m in _MODELS.value if m not in list_presets()]
  if unknown:
    raise app.UsageError(f"--models: {unknown} are not presets; allowed: {list_presets()}")
  rows = machine_rows(_MODELS.value, contexts, batches)
  summary = {}
  for phase in ("prefill", "decode"):
    for mode in ("roofline", "calibrated"):
      ratio = np.asarray([r[f"ratio_{mode}"] for r in rows if r["phase"] == phase])
      summary[f"{phase}_{mode}"] = {"median_err": float(np.median(np.abs(ratio - 1))),
                                    "max_factor": float(np.max(np.maximum(ratio, 1 / ratio))),
                                    "median_ratio": float(np.median(ratio))}
      e = summary[f"{phase}_{mode}"]
      print(f"{phase:7s} {mode:10s}: median |pred/meas - 1| {e['median_err']:.0%}, median "
            f"pred/meas {e['median_ratio']:.2f}, worst factor {e['max_factor']:.2f}x")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"rows": rows, "summary": summary}, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")
  if _PLOT_OUT.value:
    scatter(_PLOT_OUT.value, {
        phase: {mode: ([r["measured_s"] for r in rows if r["phase"] == phase],
                       [r[f"predicted_{mode}_s"] for r in rows if r["phase"] == phase])
                for mode in ("roofline", "calibrated")}
        for phase in ("prefill", "decode")}, "lctx on this machine: predicted vs measured")


def main(argv):
  del argv  # cli.run refuses positional arguments
  cli.check_output_paths(json_out=_JSON_OUT.value, plot_out=_PLOT_OUT.value)
  if _MACHINE.value:
    return machine_main()
  from lctx.cost import published
  try:
    rows, skipped = published.read_rows(_CSV.value)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f"--csv={_CSV.value}: {e}" if _CSV.value else str(e)) from e
  kept = []
  for r in rows:
    if r.weight_dtype != "bfloat16" or r.kv_dtype != "bfloat16":
      skipped.append((r.index, "fp8 weights or KV (lctx costs one dtype for both, for now)"))
    else:
      kept.append(r)
  cache: dict = {}
  predicted = [predict(r, cache) for r in kept]
  print(f"{len(predicted)} rows predicted, {len(skipped)} skipped "
        f"({published.PINNED}, {published.csv_path() if _CSV.value is None else _CSV.value})")
  print("roofline (closed form, datasheet peaks) vs measured, |pred/meas - 1| "
        "median / p90, and median pred/meas:")
  print(f"  {'hardware':10s} {'backend':7s} {'tp':>3s} {'n':>4s}   {'TTFT med':>8s} "
        f"{'p90':>6s} {'ratio':>6s}   {'TPOT med':>8s} {'p90':>6s} {'ratio':>6s}")
  table = error_table(predicted)
  for e in table:
    print(f"  {e['hardware']:10s} {e['backend']:7s} {e['tp']:3d} {e['n']:4d}   "
          f"{e['ttft_median_err']:8.0%} {e['ttft_p90_err']:6.0%} {e['ttft_median_ratio']:6.2f}"
          f"   {e['tpot_median_err']:8.0%} {e['tpot_p90_err']:6.0%} "
          f"{e['tpot_median_ratio']:6.2f}")
  overall = error_table([dict(r, hardware="all", backend="all", tp=0) for r in predicted])[0]
  print(f"  all rows: TTFT median |err| {overall['ttft_median_err']:.0%} (ratio "
        f"{overall['ttft_median_ratio']:.2f}), TPOT median |err| {overall['tpot_median_err']:.0%}"
        f" (ratio {overall['tpot_median_ratio']:.2f}); rows where C users' caches do not fit "
        f"(TTFT includes queueing there): {sum(not r['fits'] for r in predicted)}")
  print("skipped:")
  for reason, n in collections.Counter(reason for _, reason in skipped).most_common():
    print(f"  {n:5d}  {reason}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"rows": predicted, "table": table, "overall": overall,
                 "skipped": [{"index": i, "reason": why} for i, why in skipped]}, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")
  if _PLOT_OUT.value:
    scatter(_PLOT_OUT.value, {
        metric.upper(): {"roofline (closed form)": (
            [r[f"measured_{metric}_s"] for r in predicted],
            [r[f"roofline_{metric}_s"] for r in predicted])}
        for metric in ("ttft", "tpot")},
        "lctx vs published serving measurements (aiconfigurator-core, bf16 rows)")


def scatter(path: str, panels: dict, title: str) -> None:
  """Log-log predicted vs measured with y = x; panels: {name: {label: (measured, predicted)}}."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
  for ax, (name, series) in zip(axes[0], panels.items()):
    values = []
    for label, (meas, pred) in series.items():
      ax.loglog(meas, pred, ".", alpha=0.6, label=label)
      values += list(meas) + list(pred)
    ax.plot([min(values), max(values)], [min(values), max(values)], "k--", lw=1, label="y = x")
    ax.set_xlabel(f"measured {name} (s)")
    ax.set_ylabel(f"predicted {name} (s)")
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
