"""lctx's cost modes against measured time: published serving rows, or this machine.

  python -m experiments.validate_cost [--sample=N] [--noaic] [--json_out=F --plot_out=P]
  python -m experiments.validate_cost --machine [--quick] [--models=tiny,small] [--batches=1,4]

Published rows: reads the measured TTFT / TPOT rows of aiconfigurator-core's
silicon_sample.csv (NVIDIA; `pip install --no-deps aiconfigurator-core==0.12.0`,
lctx.cost.published) and predicts every row lctx can model through the
serving model of lctx.cost.serving (prefill of one ISL-token prompt, a
batch-C decode step at the mean context ISL + OSL/2; TTFT both in steady state
and with the C users arriving together) from: the framework's closed form
(weights and cache in the row's dtypes, the row's TP devices as one group);
the compiled prefill and decode programs on `model:TP` as a roofline and
calibrated with the hardware file's sourced constants (rows with an fp8 KV
cache: closed form only); and AIConfigurator's own prediction when it is
installed (lctx.cost.aic). Prints per GPU, backend and TP the median and 90th
percentile of |predicted / measured - 1| and the median predicted / measured
(below 1: optimistic), and lists what it skipped and why.

--machine: runs prefill and decode of each preset for real on this process's
default device (cpu-local in fp32 on a CPU, the device kind's preset in bf16
on a GPU) and compares both modes with the measured medians.
"""

from __future__ import annotations

import collections
import json
import math
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
    "compare with both modes (cpu-local and its measured calibration on a CPU; the device "
    "kind's hardware file on a GPU).")
_QUICK = flags.DEFINE_bool("quick", False, "With --machine: the small grid (contexts 1K and 4K).")
_MODELS = flags.DEFINE_list("models", ["tiny", "small"], "With --machine: the presets to run.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "With --machine: decode batch sizes.")
_MESHES = flags.DEFINE_list("meshes", ["model:1"], "With --machine: the meshes to run on "
                            "(e.g. model:1,model:8; on a CPU, fake devices are made).")
_SAMPLE = flags.DEFINE_integer("sample", 0, "Published rows: a seeded sample of this many rows "
                               "per GPU, backend, TP and weight dtype (0: every row).")
_AIC = flags.DEFINE_bool("aic", True, "Published rows: also AIConfigurator's own prediction "
                         "(lctx.cost.aic) when aiconfigurator-core is installed.")


class ProgramCosts:
  """Compiled step costs for the published rows, each program compiled once:
  prefill per (model, TP, ISL, weight dtype); decode per (model, TP, batch,
  weight dtype) at the shortest and longest cache length the rows ask for,
  interpolated in between (metrics.interpolate_costs)."""

  def __init__(self, rows):
    from lctx.cost import serving
    self.contexts = collections.defaultdict(set)
    for r in rows:
      self.contexts[(r.model, r.tp, r.concurrency, r.weight_dtype)].add(
          serving.decode_context(r.isl, r.osl))
    self.configs: dict = {}
    self.specs: dict = {}

  def hardware(self, name: str):
    """(HardwareSpec, its calibration), read once per preset."""
    from lctx.cost import calibrated, hardware
    if name not in self.specs:
      hw = hardware.load_hardware(name)
      self.specs[name] = hw, calibrated.for_hardware(hw)
    return self.specs[name]

  def config(self, model: str):
    from lctx import ModelConfig
    if model not in self.configs:
      self.configs[model] = ModelConfig.from_preset(model, param_dtype="bfloat16",
                                                    dtype="bfloat16")
    return self.configs[model]

  def _compile(self, model, tp, T, B, kind, weight_dtype):
    from lctx.cost import metrics
    return metrics.program_costs(self.config(model), f"model:{tp}", T, B, kind,
                                 "float8" if weight_dtype == "float8" else None)

  def prefill(self, row):
    return self._compile(row.model, row.tp, row.isl, 1, "prefill", row.weight_dtype)

  def decode(self, row):
    from lctx.cost import serving
    T = serving.decode_context(row.isl, row.osl)
    key = (row.model, row.tp, row.concurrency, row.weight_dtype)
    lo, hi = min(self.contexts[key]), max(self.contexts[key])
    at = lambda t: self._compile(row.model, row.tp, t, row.concurrency, "decode",
                                 row.weight_dtype)
    if T in (lo, hi) or lo == hi:
      return at(T)
    from lctx.cost import metrics
    return metrics.interpolate_costs(at(lo), at(hi), lo, hi, T) or at(T)


def predict(row, programs: ProgramCosts) -> dict:
  """One published.ServingRow predicted three ways through the steady-state
  serving model (lctx.cost.serving): the closed form (the framework's
  roofline at datasheet peaks), and the compiled programs' costs as a roofline
  and calibrated with the hardware file's sourced constants."""
  from lctx.cost import analytic, calibrated, metrics, serving
  config, (hw, cal) = programs.config(row.model), programs.hardware(row.hardware)
  ctx = serving.decode_context(row.isl, row.osl)
  wd, kv = row.weight_dtype, row.kv_dtype
  # The closed form: weights in wd, the cache in kv, compute at wd's peak.
  prefill_s = analytic.prefill_seconds(config, row.isl, hw, row.tp, wd)
  decode_s = analytic.decode_step_seconds(config, row.concurrency, ctx, hw, row.tp, wd,
                                          kv_dtype=kv)
  closed = serving.steady_state(prefill_s, decode_s, row.concurrency, row.isl, row.osl)
  out = {"index": row.index, "model": row.model, "hardware": row.hardware,
         "backend": row.backend, "backend_version": row.backend_version, "tp": row.tp,
         "concurrency": row.concurrency, "isl": row.isl, "osl": row.osl,
         "weight_dtype": wd, "kv_dtype": kv,
         "fits": analytic.concurrency(config, ctx, hw, row.tp, wd).users >= row.concurrency,
         "measured_ttft_s": row.ttft_s, "measured_tpot_s": row.tpot_s,
         "closed_form_ttft_s": closed.ttft_s, "closed_form_tpot_s": closed.tpot_s,
         "closed_form_ttft_burst_s": closed.ttft_burst_s}
  if kv != "bfloat16":  # lctx's cache is one dtype until the KV quantization issue lands
    return out
  prefill, decode = programs.prefill(row), programs.decode(row)
  dtype = "float8" if wd == "float8" else "bfloat16"
  for mode, seconds in (("roofline", lambda c: metrics.roofline_seconds(c, hw, dtype)),
                        ("calibrated", lambda c: calibrated.calibrated_seconds(c, hw, dtype,
                                                                               cal))):
    lat = serving.steady_state(seconds(prefill), seconds(decode), row.concurrency, row.isl,
                               row.osl)
    out[f"{mode}_ttft_s"], out[f"{mode}_tpot_s"] = lat.ttft_s, lat.tpot_s
    out[f"{mode}_ttft_burst_s"] = lat.ttft_burst_s
  return out


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


def machine_rows(models, contexts, batches, meshes=("model:1",), repeats: int = 3,
                 steps: int = 8) -> list[dict]:
  """Measured and predicted prefill (one user, `context` tokens) and decode
  steps (`batch` users at a `context`-slot cache) of each preset on each mesh
  of this process's devices (fp32 on a CPU, bf16 on an accelerator), running
  the very programs the cost model compiles (engine.sharded_step, stacked
  layers). Skips, with a line, a mesh the model or batch cannot use."""
  import jax
  import jax.numpy as jnp

  import lctx
  from lctx import engine, sharding
  from lctx.cost import calibrate, calibrated, hardware, metrics
  # This machine: cpu-local on a CPU (fp32), the preset of its device kind on
  # a GPU / TPU (bf16); calibrated with this machine's measured calibration
  # (lctx's own program here), and on a GPU also with the hardware file's
  # sourced one (a serving engine's kernels).
  name_hw = calibrate.default_hardware()
  dtype = "float32" if name_hw == hardware.CPU_LOCAL else "bfloat16"
  hw = hardware.load_hardware(name_hw, dtypes=(dtype,))
  cal, sourced = calibrate.load_or_measure(hw), hw.calibration
  print(f"{hw.name}: {hw.flops(dtype) / 1e9:.0f} GFLOP/s {dtype}, "
        f"{hw.hbm_bandwidth / 1e9:.1f} GB/s; {cal}")
  out = []
  for name in models:
    config = lctx.ModelConfig.from_preset(name, param_dtype=dtype, dtype=dtype)
    host_params = lctx.init_params(config, 0)
    for mesh in meshes:
      try:
        plan = sharding.Plan(config, sharding.make_mesh(mesh))
      except ValueError as e:
        print(f"  {name:8s} {mesh}: skipped ({e})")
        continue
      params = engine.shard_params(host_params, plan)
      for T in contexts:
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (max(batches), T))
        for kind, B in [("prefill", 1)] + [("decode", b) for b in batches]:
          try:
            plan.check(batch=B, capacity=T, prompt_len=T if kind == "prefill" else None)
          except ValueError as e:
            print(f"  {name:8s} {kind:7s} T={T:6d} B={B:2d} {mesh}: skipped ({e})")
            continue
          cache = engine.new_cache(config, params, B, T, plan)
          prefill = engine.sharded_step("prefill", plan, params, cache)
          if kind == "prefill":
            # Each run takes (and donates) a fresh cache, made before its clock starts.
            times = []
            for i in range(repeats + 1):
              fresh = jax.block_until_ready(engine.new_cache(config, params, 1, T, plan))
              start = time.perf_counter()
              jax.block_until_ready(prefill(params, tokens[:1], np.full((1,), T, np.int32),
                                            fresh)[0])
              if i:  # the first run compiles
                times.append(time.perf_counter() - start)
            measured = float(np.median(times))
          else:
            _, cache = prefill(params, tokens[:B, :T], np.full((B,), T - steps, np.int32),
                               cache)
            decode = engine.sharded_step("decode", plan, params, cache)
            token, times = jnp.zeros((B,), jnp.int32), []
            for i in range(steps):
              start = time.perf_counter()
              logits, cache = decode(params, token, cache)
              jax.block_until_ready(logits)
              if i:  # the first step compiles
                times.append(time.perf_counter() - start)
            measured = float(np.median(times))
          costs = metrics.program_costs(config, mesh, T, B, kind)
          roof = metrics.roofline_seconds(costs, hw, dtype)
          cali = calibrated.calibrated_seconds(costs, hw, dtype, cal)
          row = {"model": name, "hardware": hw.name, "dtype": dtype, "phase": kind,
                 "context": T, "batch": B, "mesh": mesh, "predicted_roofline_s": roof,
                 "predicted_calibrated_s": cali, "measured_s": measured,
                 "ratio_roofline": roof / measured, "ratio_calibrated": cali / measured}
          if sourced is not None:
            row["predicted_sourced_calibration_s"] = calibrated.calibrated_seconds(
                costs, hw, dtype, sourced)
          out.append(row)
          print(f"  {name:8s} {kind:7s} T={T:6d} B={B:2d} {mesh:8s} measured "
                f"{measured * 1e3:9.2f} ms  roofline {roof * 1e3:9.2f} ms "
                f"({row['ratio_roofline']:.2f})  calibrated {cali * 1e3:9.2f} ms "
                f"({row['ratio_calibrated']:.2f})", flush=True)
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
  meshes = [m.strip() for m in _MESHES.value if m.strip()]
  if not meshes:
    raise app.UsageError("--meshes: at least one mesh, e.g. model:1,model:8")
  from lctx import sharding
  sizes = []
  for m in meshes:
    try:
      sizes.append(math.prod(sharding.parse_mesh_spec(m).values()))
    except ValueError as e:
      raise app.UsageError(f"--meshes={m}: {e}") from e
  # Only the devices the meshes need: XLA:CPU splits its threads among fake
  # devices, so more of them would slow the very runs measured here (the
  # calibration is measured, and cached, for this device count too).
  cli.want_cpu_devices(max(sizes))
  import jax
  if max(sizes) > jax.device_count():
    raise app.UsageError(f"--meshes: {max(sizes)} devices needed, this process has "
                         f"{jax.device_count()} ({cli.devices_hint(max(sizes))})")
  rows = machine_rows(_MODELS.value, contexts, batches, meshes)
  if not rows:
    raise app.UsageError(f"--meshes={','.join(meshes)}: no mesh fits {_MODELS.value} "
                         "(each was skipped above)")
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


MODES = ("closed_form", "roofline", "calibrated", "aic")
MODE_LABELS = {"closed_form": "closed form", "roofline": "hlo roofline",
               "calibrated": "hlo calibrated", "aic": "AIConfigurator"}


def summary(rows: list[dict], metric: str) -> dict:
  """mode -> {n, median_err, p90_err, median_ratio} of |pred/meas - 1| over the
  rows that mode predicted, plus 'same_rows': the same over rows every mode predicted."""
  out = {}
  common = [r for r in rows if all(f"{m}_{metric}_s" in r for m in MODES)]
  for label, subset in (("all", rows), ("same_rows", common)):
    for mode in MODES:
      meas = metric.replace("_burst", "")
      ratio = np.asarray([r[f"{mode}_{metric}_s"] / r[f"measured_{meas}_s"] for r in subset
                          if f"{mode}_{metric}_s" in r])
      if ratio.size:
        out.setdefault(label, {})[mode] = {
            "n": int(ratio.size), "median_err": float(np.median(np.abs(ratio - 1))),
            "p90_err": float(np.percentile(np.abs(ratio - 1), 90)),
            "median_ratio": float(np.median(ratio))}
  return out


def sample_rows(rows, per_group: int):
  """Up to per_group rows of each (hardware, backend, tp, weight dtype), seeded."""
  if per_group <= 0:
    return rows
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r.hardware, r.backend, r.tp, r.weight_dtype)].append(r)
  rng = np.random.default_rng(0)
  return [g[i] for _, g in sorted(groups.items())
          for i in sorted(rng.choice(len(g), min(per_group, len(g)), replace=False))]


MACHINE_FLAGS = ("quick", "models", "batches", "meshes")
PUBLISHED_FLAGS = ("sample", "csv", "aic")


def main(argv):
  del argv  # cli.run refuses positional arguments
  cli.check_output_paths(json_out=_JSON_OUT.value, plot_out=_PLOT_OUT.value)
  # A flag of the other kind of run would be silently ignored: refuse it.
  stray = [f for f in (PUBLISHED_FLAGS if _MACHINE.value else MACHINE_FLAGS)
           if flags.FLAGS[f].present]
  if stray:
    raise app.UsageError(
        f"--{', --'.join(stray)} {'apply' if len(stray) > 1 else 'applies'} to "
        f"{'published rows (without --machine)' if _MACHINE.value else '--machine runs'} only")
  if _MACHINE.value:
    return machine_main()
  if _SAMPLE.value < 0:
    raise app.UsageError(f"--sample={_SAMPLE.value}: 0 (every row) or a positive count")
  cli.want_cpu_devices(8)  # the rows' TP 1-8 programs are compiled on CPU devices
  from lctx.cost import aic, published
  try:
    rows, skipped = published.read_rows(_CSV.value)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f"--csv={_CSV.value}: {e}" if _CSV.value else str(e)) from e
  rows = sample_rows(rows, _SAMPLE.value)
  programs = ProgramCosts(rows)
  use_aic = _AIC.value and aic.available()
  predicted, aic_refused = [], []
  for n, r in enumerate(rows):
    out = predict(r, programs)
    if use_aic:
      try:
        p = aic.predict(r)
        # AIConfigurator's TTFT has its own queueing factor: one figure for both.
        out.update(aic_ttft_s=p.ttft_s, aic_ttft_burst_s=p.ttft_s, aic_tpot_s=p.tpot_s,
                   aic_note=p.note)
      except ValueError as e:
        aic_refused.append((r.index, str(e)))
    predicted.append(out)
    if (n + 1) % 100 == 0:
      print(f"  {n + 1} / {len(rows)} rows", flush=True)
  print(f"{len(predicted)} rows predicted ({'a seeded sample of ' + str(_SAMPLE.value) + ' per group; ' if _SAMPLE.value else ''}"
        f"{len(skipped)} CSV rows skipped; {published.PINNED}, "
        f"{published.csv_path() if _CSV.value is None else _CSV.value}); AIConfigurator: "
        f"{'predicted ' + str(len(predicted) - len(aic_refused)) + ', refused ' + str(len(aic_refused)) if use_aic else 'not installed or --noaic'}")
  print("|predicted / measured - 1|, median (p90) [median ratio], per GPU, backend, TP:")
  groups = collections.defaultdict(list)
  for r in predicted:
    groups[(r["hardware"], r["backend"], r["tp"])].append(r)
  table = []
  for metric in ("tpot", "ttft", "ttft_burst"):
    print(f"{metric.upper()}"
          f"{' (users arriving together; AIConfigurator: its own TTFT)' if metric == 'ttft_burst' else ''}:")
    print(f"  {'hardware':9s} {'backend':7s} {'tp':>2s} {'n':>4s}  " + "  ".join(
        f"{MODE_LABELS[m]:>20s}" for m in MODES))
    for (hw, backend, tp), rs in sorted(groups.items()) + [(("all", "all", 0), predicted)]:
      s_ = summary(rs, metric)["all"]
      cells = [f"{s_[m]['median_err']:7.0%} ({s_[m]['p90_err']:4.0%}) [{s_[m]['median_ratio']:4.2f}]"
               if m in s_ else f"{'-':>20s}" for m in MODES]
      print(f"  {hw:9s} {backend:7s} {tp:2d} {len(rs):4d}  " + "  ".join(f"{c:>20s}" for c in cells))
      table.append({"metric": metric, "hardware": hw, "backend": backend, "tp": tp, **s_})
  overall = {metric: summary(predicted, metric) for metric in ("tpot", "ttft", "ttft_burst")}
  if use_aic:
    same = overall["tpot"].get("same_rows", {})
    if same:
      print("on the rows every mode predicted (n = "
            f"{same['calibrated']['n']}): TPOT median |err| " + ", ".join(
                f"{MODE_LABELS[m]} {same[m]['median_err']:.0%}" for m in MODES))
  print(f"rows whose C users' caches do not fit (the server then queues): "
        f"{sum(not r['fits'] for r in predicted)}; rows with an fp8 KV cache: closed form only")
  print("skipped:")
  for reason, n in collections.Counter(reason for _, reason in skipped).most_common():
    print(f"  {n:5d}  {reason}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"rows": predicted, "table": table, "overall": overall,
                 "aic_refused": [{"index": i, "reason": why} for i, why in aic_refused],
                 "skipped": [{"index": i, "reason": why} for i, why in skipped]}, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")
  if _PLOT_OUT.value:
    scatter(_PLOT_OUT.value, {
        metric.upper(): {MODE_LABELS[m]: (
            [r[f"measured_{metric}_s"] for r in predicted if f"{m}_{key}_s" in r],
            [r[f"{m}_{key}_s"] for r in predicted if f"{m}_{key}_s" in r])
            for m in ("closed_form", "calibrated", "aic")}
        for metric, key in (("tpot", "tpot"), ("ttft", "ttft_burst"))},
        "lctx vs published serving measurements (aiconfigurator-core silicon_sample.csv)")


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
