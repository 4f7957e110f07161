"""How close does a 1M-token context get to a 4K one? (issue 15, item 6)

  python -m experiments.one_m_vs_4k          # yi-34b on 8 x A100 80GB (model:8), 1M vs 4K
  python -m experiments.one_m_vs_4k --json_out=1m_vs_4k.json --plot_out=1m_vs_4k.png
  python -m experiments.one_m_vs_4k --rows=dense,int8,kv_heads=4+int4   # a subset
  python -m experiments.one_m_vs_4k --rows=help                         # the default rows
  python -m experiments.one_m_vs_4k --quality_json=docs/quality.json    # the measured quality

Every row is one way of serving a --long context (1M tokens): the dense cache,
one compression policy (lctx.cache.spec), one model change (fewer KV heads:
lctx.convert.gqa_config; cross-layer KV sharing: ModelConfig.kv_share_every),
or a composition of them. Each is costed in three modes

  closed_form  lctx.cost.metrics.from_closed_form (the framework's formulas)
  roofline     lctx.cost.metrics.from_hlo: per-op rooflines of the compiled,
               partitioned programs (prefill run --prefill_chunk tokens at a
               time, one decode step, one context switch)
  calibrated   from_hlo's calibrated prefill and decode (the hardware's
               calibration block); concurrency, KV bytes and the context
               switch have no calibrated value: the roofline's are used

and each metric is divided by the same mode's dense cache at --short (4K), the
baseline whose ratios are 1 by construction: concurrency (users that fit;
higher is better: 1M / 4K), prefill latency, decode step latency, context
switch latency and KV bytes per user (lower is better). A ratio is "within 2x
of 4K" when concurrency keeps at least half the 4K users, or a latency / size
is at most twice the 4K one.

A row label is its parts joined by '+': model changes kv_heads=N and
kv_share_every=N, then a --kv_compression spec (e.g. kv_heads=4+int4,
snapkv:ratio=0.9+int4); "dense" is none; a trailing "@short" costs the
row at --short instead of --long (the baseline is dense@short). Each row is
tagged lossless or lossy with the reason, and shown with its quality: the
relative accuracy (accuracy / the uncompressed cache's) that
experiments.quality_sweep measured for its policy, from --quality_json
(lctx.quality.results.relative_quality, a token budget taken as a ratio of
the row's own context), or "unmeasured" (never assumed lossless; a model
change, kv_heads or kv_share_every, is always unmeasured: the harness runs
the models as trained). A row lctx cannot build or compile fails with its
reason (the others still run); a label that does not parse is a usage error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time

from absl import app, flags

from experiments import cli, costing

_MODEL = flags.DEFINE_string("model", "yi-34b", "Preset name or config.json path.")
_HARDWARE = flags.DEFINE_string("hardware", "a100-80g-sxm", "Hardware preset (configs/hardware) "
                                "or spec json.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Tensor-parallel devices (mesh model:g).",
                                    lower_bound=1)
_LONG = flags.DEFINE_integer("long", 1048576, "The long context (tokens).", lower_bound=1)
_SHORT = flags.DEFINE_integer("short", 4096, "The baseline's context (tokens).", lower_bound=1)
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 8192, "Prefill chunk (tokens) of the compiled prefill (as "
    "experiments.peak_analysis); 0 = one pass.", lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Weights and KV cache dtype.")
_ROWS = flags.DEFINE_multi_string(
    "rows", [], "Rows to cost, by label (comma-separated and/or repeated); default: every "
    "default row (--rows=help lists them). The baseline dense@short is always added.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Programs compiled at once (0: one per CPU core).",
                                lower_bound=0)
_QUALITY_JSON = flags.DEFINE_string(
    "quality_json", "docs/quality.json", "The quality harness's results (python -m "
    "experiments.quality_sweep): each row is shown with its measured relative accuracy, or "
    "'unmeasured'. The default, when missing: every lossy row unmeasured; a given path must "
    "exist.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every row, mode, value and ratio here.")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Bar chart of the ratios (PNG).")

BASELINE = "dense@short"
SHORT_SUFFIX = "@short"
MODEL_CHANGES = ("kv_heads", "kv_share_every")
MODES = ("closed_form", "roofline", "calibrated")
METRICS = ("concurrency", "prefill_s", "decode_step_s", "context_switch_s", "kv_bytes_per_user")
HIGHER_IS_BETTER = {"concurrency"}
WITHIN = 2.0  # "within 2x of 4K"
MODE_NOTES = {
    "closed_form": "lctx.cost.metrics.from_closed_form",
    "roofline": "lctx.cost.metrics.from_hlo (prefill_s, decode_step_s)",
    "calibrated": "from_hlo's prefill_s_calibrated and decode_step_s_calibrated; concurrency, "
                  "kv bytes and context_switch_s have no calibrated field: the roofline's",
}
# Where each metric comes from in each mode: (source row, Metrics field).
SOURCE = {
    "closed_form": {m: ("analytic", m) for m in METRICS[:-1]}
    | {"kv_bytes_per_user": ("analytic", "kv_bytes_per_user_total")},
    "roofline": {m: ("hlo", m) for m in METRICS[:-1]}
    | {"kv_bytes_per_user": ("hlo", "kv_bytes_per_user_total")},
    "calibrated": {"concurrency": ("hlo", "concurrency"),
                   "prefill_s": ("hlo", "prefill_s_calibrated"),
                   "decode_step_s": ("hlo", "decode_step_s_calibrated"),
                   "context_switch_s": ("hlo", "context_switch_s"),  # no calibrated field
                   "kv_bytes_per_user": ("hlo", "kv_bytes_per_user_total")},
}


@dataclasses.dataclass(frozen=True)
class Row:
  label: str  # as given (its canonical form is `key`)
  short: bool  # costed at --short (else --long)
  kv_heads: int  # 0: the model's own
  kv_share_every: int  # 1: no sharing
  kv_compression: str  # canonical spec; "" dense

  @property
  def key(self) -> tuple:
    return (self.short, self.kv_heads, self.kv_share_every, self.kv_compression)


def default_labels(config) -> list[str]:
  """The default rows for `config`: the baseline, dense at --long, each
  policy and model change alone, then compositions across the axes. The KV
  head counts are K/2 and K/4 of the model's K (where they divide it: yi-34b's
  K = 8 gives kv_heads=4 and kv_heads=2); kv_share_every=2 where L is even."""
  K, L = config.num_kv_heads, config.num_layers
  heads = [k for k in dict.fromkeys((K // 2, K // 4)) if 1 <= k < K and K % k == 0]
  share = L % 2 == 0
  few = heads[0] if heads else None
  fewest = heads[-1] if heads else None
  single = (["int8", "int4", "fp8", "kivi:bits=2", "snapkv:ratio=0.9", "snapkv:budget=4096",
             "streaming_llm:budget=4096"] + [f"kv_heads={k}" for k in heads]
            + (["kv_share_every=2"] if share else []) + ["offload"])
  # Not snapkv+kivi: a chunked prefill cannot compact KIVI's token groups
  # (lctx refuses it; at 1M a one-pass prefill does not fit), so int4 stands in.
  composed = ([f"kv_heads={few}+int4"] if few else []) + [
      "snapkv:ratio=0.9+int4", "snapkv:budget=4096+int4",
      "h2o:ratio=0.9+int8", "int4+offload"]
  if share:
    composed += ["kv_share_every=2+int8+offload"]
    if few:
      composed += [f"kv_heads={few}+kv_share_every=2+int8",
                   f"kv_heads={fewest}+kv_share_every=2+int4+offload"]
  return [BASELINE, "dense"] + single + composed


def split_labels(values) -> list[str]:
  """--rows values -> labels. Commas separate labels, except inside a policy's
  knobs: a piece `key=value` whose key is no model change continues the label
  before it (snapkv:ratio=0.9,window=32 is one label)."""
  out = []
  for value in values:
    for piece in (p.strip() for p in value.split(",")):
      if not piece:
        continue
      head = piece.split("+")[0]
      if out and "=" in head and ":" not in head and head.split("=")[0] not in MODEL_CHANGES:
        out[-1] += "," + piece
      else:
        out.append(piece)
  return out


def parse_row(label: str, config) -> Row:
  """A Row; ValueError naming the part that does not parse (a policy's,
  a KV head count that does not divide the model's, a kv_share_every that
  does not divide its layers)."""
  from lctx import convert
  from lctx.cache import spec as spec_lib
  text = label.strip()
  short = text.endswith(SHORT_SUFFIX)
  if short:
    text = text[:-len(SHORT_SUFFIX)]
  changes, policies = {}, []
  for part in (p.strip() for p in text.split("+")):
    name, eq, value = part.partition("=")
    if name.strip() in MODEL_CHANGES and eq:
      name = name.strip()
      if name in changes:
        raise ValueError(f"{name} given twice")
      if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: allowed: a positive integer")
      changes[name] = int(value)
    elif part and part != "dense":
      policies.append(part)
    elif not part:
      raise ValueError("an empty part (two '+' in a row, or a leading / trailing '+')")
  spec = str(spec_lib.parse("+".join(policies)))  # ValueError names the policy and knob
  kv_heads = changes.get("kv_heads", 0)
  if kv_heads:
    convert.gqa_config(config, kv_heads)  # ValueError lists the allowed counts
    if kv_heads == config.num_kv_heads:
      kv_heads = 0
  share = changes.get("kv_share_every", 1)
  if config.num_layers % share:
    divisors = [d for d in range(1, config.num_layers + 1) if config.num_layers % d == 0]
    raise ValueError(f"kv_share_every={share} does not divide the {config.num_layers} layers "
                     f"of {config.name}; allowed: {divisors}")
  return Row(label.strip(), short, kv_heads, share, spec)


def row_config(row: Row, config):
  """The model a row serves: `config` with fewer KV heads and / or shared KV
  layers. ValueError with a clear reason when this lctx cannot express it."""
  from lctx import convert
  from lctx.config import ModelConfig
  if row.kv_share_every > 1:
    if "kv_share_every" not in {f.name for f in dataclasses.fields(ModelConfig)}:
      raise ValueError("this lctx's ModelConfig has no kv_share_every field (cross-layer KV "
                       "sharing is not available yet)")
    config = config.replace(kv_share_every=row.kv_share_every,
                            name=f"{config.name}-share{row.kv_share_every}")
  if row.kv_heads:
    config = convert.gqa_config(config, row.kv_heads)
  return config


def losses(row: Row) -> tuple[bool, str]:
  """(lossless, reason): lossy when any part changes what attention sees."""
  from lctx.cache import spec as spec_lib
  spec = spec_lib.parse(row.kv_compression)
  lossy = []
  if row.kv_heads:
    lossy.append(f"kv_heads={row.kv_heads}: mean-pooled KV heads, lossy without uptraining")
  if row.kv_share_every > 1:
    lossy.append(f"kv_share_every={row.kv_share_every}: cross-layer KV sharing needs training")
  if spec.of_kind("eviction") is not None:
    lossy.append(f"{spec.of_kind('eviction').name}: drops tokens")
  if spec.of_kind("quantization") is not None:
    lossy.append(f"{spec.of_kind('quantization').name}: quantization rounds K/V (lossy in "
                 f"general)")
  if lossy:
    return False, "; ".join(lossy)
  if spec.of_kind("offload") is not None:
    return True, "offload: the same cache, kept in host memory and streamed"
  return True, "the model and cache as trained"


def quality(row: Row, rows: list[dict], long: int, short: int):
  """The row's measured relative accuracy (a lctx.quality.results.Quality) from
  the quality JSON's `rows`, at the row's own context; unmeasured for a
  model change (the harness does not convert KV heads nor share KV layers)."""
  from lctx.quality import results
  if row.kv_heads or row.kv_share_every > 1:
    return results.Quality(None, results.UNMEASURED)
  return results.relative_quality(rows, row.kv_compression, short if row.short else long)


def row_values(cf, h) -> dict[str, dict[str, float]]:
  """mode -> metric -> value, from a closed-form and an hlo Metrics row."""
  by = {"analytic": cf, "hlo": h}
  return {mode: {m: float(getattr(by[src], field)) for m, (src, field) in SOURCE[mode].items()}
          for mode in MODES}


def ratio(value: float, base: float) -> float | None:
  return value / base if base else None


def within(metric: str, r: float | None) -> bool:
  if r is None:
    return False
  return r >= 1 / WITHIN if metric in HIGHER_IS_BETTER else r <= WITHIN


def compare(values, base) -> tuple[dict, dict]:
  """(ratios, within_2x) per mode and metric: values / the baseline's."""
  ratios = {mode: {m: ratio(values[mode][m], base[mode][m]) for m in METRICS} for mode in MODES}
  return ratios, {mode: {m: within(m, ratios[mode][m]) for m in METRICS} for mode in MODES}


# ---- output ------------------------------------------------------------------------

SHORT_NAMES = {"concurrency": "conc", "prefill_s": "prefill", "decode_step_s": "decode",
               "context_switch_s": "switch", "kv_bytes_per_user": "kv"}


def _r(r: float | None, ok: bool) -> str:
  if r is None:
    return "-"
  text = "0" if r == 0 else (f"{r:.3g}" if 1e-3 <= r < 1e4 else f"{r:.1e}")
  return text + ("*" if ok else " ")


def tokens(T: int) -> str:
  """4096 -> 4K, 1048576 -> 1M, 1000000 -> 1000000."""
  for unit, n in (("M", 2**20), ("K", 2**10)):
    if T % n == 0:
      return f"{T // n}{unit}"
  return str(T)


def _acc(value: float | None) -> str:
  from lctx.quality import results
  return results.UNMEASURED if value is None else f"{value:.2f}"


def format_table(results, long: int, short: int) -> str:
  w = max([24] + [len(r["label"]) for r in results])
  cell = 8
  group = " ".join(f"{SHORT_NAMES[m]:>{cell}}" for m in METRICS)
  head = f"{'row':<{w}} {'ctx':>5} {'loss':>8} {'rel acc':>10} | " + " | ".join(
      group for _ in MODES)
  modes = f"{'':<{w}} {'':>5} {'':>8} {'':>10} | " + " | ".join(
      f"{mode:^{len(group)}}" for mode in MODES)
  lines = [f"Each metric at the row's context / the same mode's dense {tokens(short)} (ratios; "
           f"concurrency: users, higher is better; the rest lower is better).",
           "rel acc: measured accuracy / uncompressed accuracy (experiments.quality_sweep; "
           "what was measured: below).",
           f"* = within {WITHIN:g}x of {tokens(short)} (concurrency >= 1/{WITHIN:g} of its "
           f"users; latency / bytes <= {WITHIN:g}x). calibrated: context switch, concurrency "
           f"and kv are the roofline's (no calibrated field).", modes, head]
  for r in results:
    ctx = tokens(r["context"])
    tag = "lossless" if r["lossless"] else "lossy"
    acc = _acc(r["relative_accuracy"])
    if r.get("error"):
      lines.append(f"{r['label']:<{w}} {ctx:>5} {tag:>8} {acc:>10} | failed: {r['error']}")
      continue
    cells = [" ".join(f"{_r(r['ratios'][mode][m], r['within_2x'][mode][m]):>{cell}}"
                      for m in METRICS) for mode in MODES]
    lines.append(f"{r['label']:<{w}} {ctx:>5} {tag:>8} {acc:>10} | " + " | ".join(cells))
  return "\n".join(lines)


def format_values(results) -> str:
  """The raw values behind the ratios (closed form | roofline | calibrated)."""
  w = max([24] + [len(r["label"]) for r in results])
  lines = ["Raw values (closed form | roofline | calibrated):",
           f"{'row':<{w}} {'users':>14} {'prefill s':>26} {'decode ms/tok':>22} "
           f"{'switch s':>16} {'KV/user GB':>16}"]
  for r in results:
    if r.get("error"):
      continue
    cf, ro, ca = (r["values"][m] for m in MODES)
    users = f"{cf['concurrency']:.0f}|{ro['concurrency']:.0f}"
    prefill = "|".join(f"{x['prefill_s']:.3g}" for x in (cf, ro, ca))
    decode = "|".join(f"{x['decode_step_s'] * 1e3:.3g}" for x in (cf, ro, ca))
    switch = f"{cf['context_switch_s']:.3g}|{ro['context_switch_s']:.3g}"
    kv = f"{cf['kv_bytes_per_user'] / 1e9:.3g}|{ro['kv_bytes_per_user'] / 1e9:.3g}"
    lines.append(f"{r['label']:<{w}} {users:>14} {prefill:>26} {decode:>22} {switch:>16} "
                 f"{kv:>16}")
  return "\n".join(lines)


def format_reasons(results, source: str) -> str:
  lines = [f"Lossless / lossy, and quality (relative accuracy: accuracy / the uncompressed "
           f"cache's, measured by experiments.quality_sweep; from {source}; 'unmeasured' is "
           f"not lossless):"]
  for r in results:
    lines.append(f"  {r['label']}: {'lossless' if r['lossless'] else 'lossy'}, {r['reason']}; "
                 f"quality: {r['quality']}")
  return "\n".join(lines)


def _legend(r) -> str:
  """"label @ctx (lossy, rel. acc. 0.97)" or "(lossy, quality unmeasured)";
  nothing in brackets for the lossless rows of relative accuracy 1."""
  note = ([] if r["lossless"] else ["lossy"]) + (
      [] if r["relative_accuracy"] == 1.0 else ["quality unmeasured"]
      if r["relative_accuracy"] is None else [f"rel. acc. {r['relative_accuracy']:.2f}"])
  return f"{r['label']} @{tokens(r['context'])}" + (f" ({', '.join(note)})" if note else "")


def plot(results, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in results if not r.get("error")]
  n = len(ok)
  fig, axes = plt.subplots(len(MODES), 1, figsize=(max(10, 1.0 + 0.22 * n * len(METRICS)),
                                                   4.2 * len(MODES)), squeeze=False)
  width = 0.85 / max(n, 1)
  colors = [plt.get_cmap(c)(i) for c in ("tab20", "tab20b") for i in range(20)]
  # A ratio of 0 (no user fits; nothing to switch) is drawn at a floor below the rest.
  nonzero = [x for r in ok for mode in MODES for x in r["ratios"][mode].values() if x]
  floor = 10 ** math.floor(math.log10(min(nonzero + [1.0])) - 1)
  for ax, mode in zip(axes[:, 0], MODES):
    ax.axhspan(1 / WITHIN, WITHIN, color="0.85", zorder=0,
               label=f"within {WITHIN:g}x of {tokens(ok[0]['context'])} (dense baseline)")
    ax.axhline(1, color="0.4", lw=0.8, zorder=1)
    for i, r in enumerate(ok):
      xs = [j + (i - (n - 1) / 2) * width for j in range(len(METRICS))]
      ys = [r["ratios"][mode][m] for m in METRICS]
      ax.bar(xs, [max(y or 0, floor) for y in ys], width, color=colors[i % len(colors)],
             hatch=None if r["lossless"] else "//", edgecolor="white", lw=0.3, zorder=2,
             label=_legend(r))
    ax.set_yscale("log")
    ax.set_xticks(range(len(METRICS)))
    ax.set_xticklabels(["concurrency (users; higher is better)", "prefill s",
                        "decode s/step", "context switch s", "KV bytes/user"])
    ax.set_ylabel(f"{mode}: ratio to baseline")
    ax.grid(axis="y", alpha=0.3, which="both")
  axes[0, 0].legend(fontsize=6, ncol=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.suptitle(title + f"  (hatched: lossy; a ratio of 0 is drawn at {floor:g})")
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


# ---- main --------------------------------------------------------------------------

def _rows(config) -> list[Row]:
  labels = split_labels(_ROWS.value) or default_labels(config)
  rows, seen = [], {}
  for label in [BASELINE] + labels:
    try:
      row = parse_row(label, config)
    except ValueError as e:
      raise app.UsageError(f"--rows: row {label!r}: {e}. A row is '+'-joined parts: "
                           f"kv_heads=N, kv_share_every=N, a --kv_compression spec "
                           f"('dense': none), optionally ending in {SHORT_SUFFIX!r}; the "
                           f"default rows: {', '.join(default_labels(config))}") from e
    if row.key not in seen:
      seen[row.key] = row
      rows.append(row)
  return rows


def main(argv):
  del argv
  cli.check_output_paths(json_out=_JSON_OUT.value, plot_out=_PLOT_OUT.value)
  long, short, g = _LONG.value, _SHORT.value, _NUM_DEVICES.value
  costing.check_contexts([long, short], "--long/--short")
  cli.want_cpu_devices(max(8, g))
  config = costing.model(_MODEL.value, _DTYPE.value)
  if [v for v in _ROWS.value if v.strip() == "help"]:
    print("Default rows for " + config.name + ":\n  " + "\n  ".join(default_labels(config)))
    return
  rows = _rows(config)
  quality_json, quality_source = costing.quality_rows(_QUALITY_JSON, "row")
  costing.require_devices(g, f"--num_devices={g}")
  hw = costing.hardware(_HARDWARE.value, _DTYPE.value)

  from lctx.cost import metrics
  mesh = metrics.mesh_label(g)
  B, G, chunk, dtype = 1, 1000, _PREFILL_CHUNK.value, _DTYPE.value
  print(f"model {config.name} ({config.num_params / 1e9:.3f}B params, {dtype}), hardware "
        f"{hw.name}, mesh {mesh}, long {long}, short {short}, prefill chunk "
        f"{chunk or 'none (one pass)'}, {len(rows)} rows", flush=True)
  cli.warn_beyond_positions(config, [long])

  built = {}
  for row in rows:
    try:
      built[row.key] = (row_config(row, config), None)
    except (ValueError, TypeError) as e:
      built[row.key] = (None, f"{type(e).__name__}: {e}")

  notes = {costing.kv_replication_note(cfg, mesh) for cfg, _ in built.values() if cfg}
  for note in sorted(filter(None, notes)):
    print(note)

  def cost(row):
    cfg, err = built[row.key]
    if err:
      raise ValueError(err)
    T = short if row.short else long
    cf = metrics.from_closed_form(cfg, hw, mesh, T, B, dtype, "exact", G, row.kv_compression)
    # compiles the row's prefill, decode step and context switch (cached: program_costs)
    h = metrics.from_hlo(cfg, hw, mesh, T, B, dtype, G, chunk, None, row.kv_compression)
    return cfg, cf, h

  import jax
  workers = 1 if jax.process_count() > 1 else (_WORKERS.value or os.cpu_count())
  start, out = time.perf_counter(), {}
  # XLA compiles outside the GIL: each row's programs on a pool, the baseline first.
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {row.key: pool.submit(cost, row) for row in rows}
    for i, row in enumerate(rows):
      try:
        out[row.key] = futures[row.key].result()
        status = "done"
      except Exception as e:  # a row lctx cannot build or compile: reported, the run goes on
        if row is rows[0]:
          for f in futures.values():
            f.cancel()
          raise app.UsageError(f"the baseline {BASELINE} (dense at --short={short}) failed: "
                               f"{e}") from e
        out[row.key] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        status = f"FAILED: {out[row.key]}"
      print(f"[{i + 1}/{len(rows)}] {row.label}: {status} "
            f"({time.perf_counter() - start:.1f} s)", flush=True)
  elapsed = time.perf_counter() - start

  base = row_values(*out[rows[0].key][1:])
  results = []
  for row in rows:
    lossless, reason = losses(row)
    q = quality(row, quality_json, long, short)
    r = {"label": row.label, "context": short if row.short else long,
         "kv_heads": row.kv_heads or config.num_kv_heads, "kv_share_every": row.kv_share_every,
         "kv_compression": row.kv_compression, "lossless": lossless, "reason": reason,
         "relative_accuracy": q.value, "quality": q.label}
    res = out[row.key]
    if isinstance(res, str):
      r["error"] = res
    else:
      cfg, cf, h = res
      values = row_values(cf, h)
      ratios, ok = compare(values, base)
      r.update(model=cfg.name, values=values, ratios=ratios, within_2x=ok,
               raw={"closed_form": dataclasses.asdict(cf), "hlo": dataclasses.asdict(h)})
      a, b = values["closed_form"]["kv_bytes_per_user"], values["roofline"]["kv_bytes_per_user"]
      if abs(a - b) > 1e-6 * max(a, b):
        cli.warn(f"row {row.label}: the closed form's KV bytes per user ({a:.6g}) differ from "
                 f"the compiled cache's ({b:.6g})")
    results.append(r)

  print()
  print(format_table(results, long, short))
  print()
  print(format_values(results))
  print()
  print(format_reasons(results, quality_source))
  failed = [r for r in results if r.get("error")]
  if failed:
    cli.warn(f"{len(failed)} row(s) failed: " + "; ".join(f"{r['label']}: {r['error']}"
                                                          for r in failed))
  print(f"total {elapsed:.1f} s")
  title = (f"{config.name} on {g} x {hw.name} ({mesh}): {tokens(long)} / {tokens(short)} "
           f"per metric and mode")
  if _JSON_OUT.value:
    report = {"model": config.name, "hardware": hw.name, "mesh": mesh, "long": long,
              "short": short, "prefill_chunk": chunk, "dtype": dtype, "batch": B,
              "generated_tokens": G, "baseline": BASELINE, "within": WITHIN,
              "metrics": list(METRICS), "higher_is_better": sorted(HIGHER_IS_BETTER),
              "modes": MODE_NOTES, "quality_json": quality_source, "seconds": elapsed,
              "rows": results}
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")
  if _PLOT_OUT.value:
    plot(results, _PLOT_OUT.value, title)
    print(f"wrote {_PLOT_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
