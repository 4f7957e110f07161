"""The quality harness's results, read back: what a compression policy measured
in accuracy, for the cost tables (experiments.peak_analysis, one_m_vs_4k).

`python -m experiments.quality_sweep` writes `{"meta": {...}, "rows": [...]}`
(the committed full grid: docs/quality.json). Each row is one (model, task,
context, depth, spec, protocol) cell with, among others:

  model              e.g. "smollm2-135m" (the real model) or "tiny" (trained here)
  task               passkey, needle_single, needle_multikey, variable_tracking,
                     mqar, selective_copy (accuracy tasks) or fidelity (no accuracy)
  context            tokens (int)
  method             the spec's policy names joined by "+" ("uncompressed" for "")
  spec               the canonical spec string (lctx.cache.spec), "" uncompressed
  ratio              eviction ratio in [0, 1) (fraction of the context removed);
                     None for quantization-only policies and uncompressed
  protocol           "agnostic" (compressed before the question) or "aware"
  accuracy           fraction of answers right, in [0, 1]; None for fidelity
  relative_accuracy  accuracy / the uncompressed accuracy of the same model, task,
                     context, depth and protocol; None where undefined

`relative_quality(rows, spec, context)` is one number per policy, never an
assumption: measured, or "unmeasured".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from pathlib import Path

from lctx.cache import spec as spec_lib

REAL_MODEL = "smollm2-135m"  # preferred over the tiny trained model where both were measured
PROTOCOL = "agnostic"  # the cache is compressed before the question: what a server does
NO_ACCURACY_TASKS = ("fidelity",)  # KL and top-1 agreement only
RATE_KNOBS = ("ratio", "budget")  # matched by the nearest measured ratio, not exactly
UNMEASURED = "unmeasured"


@dataclasses.dataclass(frozen=True)
class Quality:
  """A policy's measured relative accuracy (accuracy / uncompressed accuracy,
  a fraction; 1.0 = no loss), or value None ("unmeasured"); `label` says what
  was measured: method, ratio, model, tasks, contexts."""

  value: float | None
  label: str


def load(path) -> dict:
  """The quality JSON at `path`: {"meta": {...}, "rows": [dict, ...]}.
  FileNotFoundError or ValueError naming the path when it is missing, not
  JSON, or not that shape."""
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"quality results {str(p)!r} not found (python -m "
                            f"experiments.quality_sweep writes it)")
  try:
    report = json.loads(p.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"quality results {str(p)!r} are not readable JSON: {e}") from None
  rows = report.get("rows") if isinstance(report, dict) else None
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise ValueError(f"quality results {str(p)!r}: expected an object with a 'rows' list of "
                     f"objects (python -m experiments.quality_sweep's output)")
  for i, r in enumerate(rows):
    missing = [k for k in ("model", "task", "context", "spec", "protocol", "relative_accuracy")
               if k not in r]
    if missing:
      raise ValueError(f"quality results {str(p)!r}: row {i} has no {', '.join(missing)}")
  return {"meta": report.get("meta", {}), "rows": rows}


def _without_rates(spec: spec_lib.CompressionSpec) -> spec_lib.CompressionSpec:
  """`spec` without offload (bitwise lossless) and with every eviction policy's
  ratio and budget at their defaults: what must match exactly."""
  return spec_lib.CompressionSpec(tuple(
      spec_lib.Policy(p.name, tuple((k, v) for k, v in p.params if k not in RATE_KNOBS))
      for p in spec.policies if p.kind != "offload"))


def _eviction_ratio(spec: spec_lib.CompressionSpec, context: int | None) -> float | None:
  """The fraction of the context the spec's eviction removes: its ratio, or
  1 - budget / context with budget= (0 when the budget holds the context);
  None without eviction. ValueError for a budget without a context."""
  evict = spec.of_kind("eviction")
  if evict is None:
    return None
  if not evict["budget"]:
    return evict["ratio"]
  if not context:
    raise ValueError(f"{evict}: a token budget needs the context length to give a ratio")
  return max(0.0, 1.0 - evict["budget"] / context)


def _tokens(T: int) -> str:
  """1024 -> 1K, 4096 -> 4K, 1048576 -> 1M, 1000 -> 1000."""
  for unit, n in (("M", 2**20), ("K", 2**10)):
    if T % n == 0:
      return f"{T // n}{unit}"
  return str(T)


@functools.lru_cache(maxsize=None)
def _spec_key(spec: str) -> str | None:
  """A row's canonical spec without rates, or None when it does not parse
  (a policy this lctx does not have): such rows match nothing."""
  try:
    return str(_without_rates(spec_lib.parse(spec)))
  except (ValueError, TypeError):
    return None


def _row_ratio(row: dict) -> float | None:
  """A row's eviction ratio: its "ratio", else its spec's (budget= over the
  row's context); None without eviction."""
  if row.get("ratio") is not None:
    return float(row["ratio"])
  try:
    return _eviction_ratio(spec_lib.parse(row["spec"]), int(row["context"]))
  except (ValueError, TypeError):
    return None


def relative_quality(rows, spec, context: int | None = None) -> Quality:
  """The measured relative accuracy of compression `spec` (a spec string or
  CompressionSpec), from the quality JSON's `rows`, for a cost row at
  `context` tokens (the context only turns budget= into a ratio).

  Rules:
  - The spec is parsed with lctx.cache.spec.parse. Offload is ignored: it is
    bitwise lossless (tests/test_offload.py), so "int4+offload" is "int4".
  - Dense ("", or offload alone): 1.0 exactly, label "uncompressed".
  - Rows used: protocol "agnostic", an accuracy task (not fidelity), a
    relative_accuracy (not null), eligible (the uncompressed model is at
    least 90% accurate on the row's cell), and the same canonical spec once every
    eviction ratio / budget is removed: the method (policy names joined by
    "+") and every other knob equal. Rows for "snapkv:ratio=0.75" (default
    window) do not describe "snapkv:ratio=0.75,window=16"; "kivi:bits=4"
    matches no "kivi:bits=2" row.
  - Of those, the real model's rows (smollm2-135m) when there are any, else
    every model's.
  - Eviction: the target ratio is the spec's ratio, or with budget=B,
    1 - B / context (at 0, a budget covering the context, the eviction is a
    no-op, equal to the cache without it: that cache's quality); the rows at
    the measured ratio above 0 nearest to it are used (a tie: the larger
    ratio, the harsher one; ratio-0 rows, lossless by construction, never
    stand in for an evicting ratio), and the label says "nearest measured
    ratio R" when R is not the target.
  - The value is the unweighted mean relative_accuracy over those rows (each
    a (model, task, context, depth) cell); the label names the method, ratio,
    models, tasks and context range.
  - No such rows (a knob set never measured, a budget without a context):
    value None, label "unmeasured". A lossy policy is never given 1.0
    without rows. Model changes (kv_heads conversion, kv_share_every) are no
    spec: callers report them as unmeasured themselves.
  ValueError for a context below 1 or a spec lctx.cache.spec cannot parse.
  """
  if context is not None and (isinstance(context, bool) or not isinstance(
      context, numbers.Integral) or context < 1):
    raise ValueError(f"context = {context!r}; allowed: a token count (int) >= 1, or None")
  parsed = spec_lib.parse(spec)
  key = _without_rates(parsed)
  if key.dense:
    return Quality(1.0, "uncompressed" + (" (offload is lossless)" if not parsed.dense else ""))
  try:
    target = _eviction_ratio(parsed, context)
  except ValueError:
    return Quality(None, UNMEASURED)
  if target == 0:  # nothing evicted: exactly the cache without the eviction (tested)
    rest = spec_lib.CompressionSpec(tuple(p for p in parsed.policies if p.kind != "eviction"))
    q = relative_quality(rows, rest, context)
    return dataclasses.replace(q, label=q.label + " (the eviction keeps every token here)")
  used = [r for r in rows
          if r.get("protocol") == PROTOCOL and r.get("task") not in NO_ACCURACY_TASKS
          and r.get("accuracy") is not None and r.get("relative_accuracy") is not None
          and r.get("eligible", True)
          and isinstance(r.get("spec"), str) and _spec_key(r["spec"]) == str(key)]
  if any(r["model"] == REAL_MODEL for r in used):
    used = [r for r in used if r["model"] == REAL_MODEL]
  method = "+".join(p.name for p in key.policies)
  rate = ""
  if target is not None:
    ratios = {id(r): _row_ratio(r) for r in used}
    # Ratio-0 rows are the cache without eviction: never "nearest" to an evicting ratio.
    measured = sorted({x for x in ratios.values() if x is not None and x > 0})
    if not measured:
      return Quality(None, UNMEASURED)
    nearest = min(measured, key=lambda x: (abs(x - target), -x))
    used = [r for r in used if ratios[id(r)] == nearest]
    rate = (f" ratio {nearest:.3g}" if math.isclose(nearest, target, abs_tol=1e-9) else
            f" nearest measured ratio {nearest:.3g} for {target:.3g}")
  if not used:
    return Quality(None, UNMEASURED)
  value = sum(float(r["relative_accuracy"]) for r in used) / len(used)
  models = "/".join(sorted({str(r["model"]) for r in used}))
  tasks = "/".join(sorted({str(r["task"]) for r in used}))
  contexts = sorted({int(r["context"]) for r in used})
  ctx = _tokens(contexts[0]) + ("" if len(contexts) == 1 else "-" + _tokens(contexts[-1]))
  return Quality(value, f"{value:.2f} rel. acc. ({method}{rate}, {models}, {tasks} at {ctx} ctx)")


def load_rows(path, required: bool) -> list[dict]:
  """The rows of the quality JSON at `path`, or [] when it is missing and not
  `required` (a default path not written yet: every lossy policy is then
  unmeasured). Errors as `load`."""
  if not required and not Path(path).exists():
    return []
  return load(path)["rows"]
