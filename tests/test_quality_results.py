"""lctx.quality.results: the quality JSON read back, one relative accuracy per policy."""

import json

import pytest

from lctx.quality import results


def row(spec, rel, *, method=None, ratio=None, model="smollm2-135m", task="passkey",
        context=1024, depth=0.5, protocol="agnostic", accuracy=None):
  """One result row as experiments.quality_sweep writes it."""
  return {"model": model, "task": task, "context": context, "depth": depth,
          "method": method or "+".join(p.split(":")[0] for p in spec.split("+")) or "uncompressed",
          "spec": spec, "ratio": ratio, "protocol": protocol,
          "accuracy": (rel if accuracy is None else accuracy) if task != "fidelity" else None,
          "relative_accuracy": rel if task != "fidelity" else None,
          "answer_recall": None, "kl": 0.1, "top1_agreement": 0.9, "n": 8}


ROWS = [
    row("", 1.0),
    row("int8", 0.98), row("int8", 0.96, task="variable_tracking", context=4096),
    row("int8", 0.5, protocol="aware"),  # not the agnostic protocol: ignored
    row("int8", None, task="fidelity"),  # no accuracy: ignored
    row("int8", 0.1, model="tiny"),  # the real model's rows are preferred
    row("snapkv:ratio=0.5", 0.9, ratio=0.5),
    row("snapkv:ratio=0.75", 0.8, ratio=0.75), row("snapkv:ratio=0.75", 0.6, ratio=0.75,
                                                    task="mqar", context=2048),
    row("snapkv:ratio=0.9", 0.4, ratio=0.9),
    row("snapkv:ratio=0.5+int8", 0.85, ratio=0.5),
    row("kivi:bits=2", 0.7),
    row("h2o:ratio=0.5", 0.3, ratio=0.5, model="tiny"),  # only the tiny model measured h2o
    row("oracle:ratio=0.5", 1.0, method="oracle", ratio=0.5),  # a harness baseline
    row("mystery:ratio=0.5", 1.0, method="mystery", ratio=0.5),  # no lctx spec: skipped
]


def test_dense_and_offload_are_uncompressed():
  assert results.relative_quality(ROWS, "") == results.Quality(1.0, "uncompressed")
  assert results.relative_quality([], None).value == 1.0  # no rows needed
  q = results.relative_quality([], "offload")
  assert q.value == 1.0 and q.label.startswith("uncompressed")


def test_quantization_mean_over_the_real_models_agnostic_rows():
  q = results.relative_quality(ROWS, "int8")
  assert q.value == pytest.approx(0.97)
  assert q.label == ("0.97 rel. acc. (int8, smollm2-135m, passkey/variable_tracking at 1K-4K "
                     "ctx)")
  # offload is lossless: int8+offload is int8
  assert results.relative_quality(ROWS, "int8+offload") == q


def test_falls_back_to_other_models():
  q = results.relative_quality(ROWS, "h2o:ratio=0.5")
  assert q.value == pytest.approx(0.3) and "tiny" in q.label and "ratio 0.5" in q.label


def test_eviction_exact_and_nearest_ratio():
  q = results.relative_quality(ROWS, "snapkv:ratio=0.75")
  assert q.value == pytest.approx(0.7)
  assert q.label == "0.70 rel. acc. (snapkv ratio 0.75, smollm2-135m, mqar/passkey at 1K-2K ctx)"
  q = results.relative_quality(ROWS, "snapkv:ratio=0.95")
  assert q.value == pytest.approx(0.4) and "nearest measured ratio 0.9 for 0.95," in q.label
  # a tie goes to the larger (harsher) ratio
  assert results.relative_quality(ROWS, "snapkv:ratio=0.625").value == pytest.approx(0.7)
  # ratio-0 rows (lossless by construction) never stand in for an evicting ratio
  zero = ROWS + [row("snapkv:ratio=0.0", 1.0, ratio=0.0)]
  q = results.relative_quality(zero, "snapkv:ratio=0.1")
  assert q.value == pytest.approx(0.9) and "nearest measured ratio 0.5 for 0.1," in q.label


def test_budget_is_a_ratio_of_the_context():
  # 4096 of 1M tokens kept: ratio 0.996, nearest measured 0.9
  q = results.relative_quality(ROWS, "snapkv:budget=4096", context=1048576)
  assert q.value == pytest.approx(0.4)
  assert "nearest measured ratio 0.9 for 0.996," in q.label
  # 2048 of 4096 kept: ratio 0.5 exactly
  q = results.relative_quality(ROWS, "snapkv:budget=2048", context=4096)
  assert q.value == pytest.approx(0.9) and "snapkv ratio 0.5," in q.label
  # a budget without a context is no ratio
  assert results.relative_quality(ROWS, "snapkv:budget=2048").value is None
  for bad in (0, -4096, 2.5, True, float("nan")):
    with pytest.raises(ValueError, match=f"context = {bad!r}; allowed"):
      results.relative_quality(ROWS, "snapkv:budget=2048", context=bad)


def test_a_budget_holding_the_context_evicts_nothing():
  """Ratio 0 is the cache without the eviction, exactly (tests/test_quality.py):
  its quality, not that of the nearest measured ratio."""
  q = results.relative_quality(ROWS, "snapkv:budget=4096", context=4000)
  assert q.value == 1.0 and q.label.startswith("uncompressed") and "keeps every token" in q.label
  q = results.relative_quality(ROWS, "snapkv:budget=4096+int8", context=4096)
  assert q.value == pytest.approx(0.97) and q.label.startswith("0.97 rel. acc. (int8,")
  assert results.relative_quality(ROWS, "snapkv:ratio=0+kivi:bits=2").value == pytest.approx(0.7)


def test_composition_matches_its_method():
  q = results.relative_quality(ROWS, "snapkv:ratio=0.5+int8")
  assert q.value == pytest.approx(0.85) and "snapkv+int8 ratio 0.5" in q.label
  assert results.relative_quality(ROWS, "snapkv:ratio=0.5+int8+offload") == q
  assert results.relative_quality(ROWS, "snapkv:ratio=0.5+int4").value is None


@pytest.mark.parametrize("spec", [
    "snapkv:ratio=0.75,window=16",  # another window than the measured rows' default
    "kivi:bits=4",  # a bit width never measured
    "int8:scale=token",
    "int4", "fp8", "streaming_llm:budget=4096",  # no rows at all
    "h2o:ratio=0.5,decode=evict",
])
def test_unmeasured(spec):
  q = results.relative_quality(ROWS, spec, context=1048576)
  assert q == results.Quality(None, "unmeasured")


def test_no_rows_is_unmeasured_never_lossless():
  for spec in ("int8", "snapkv:ratio=0.5", "kivi:bits=2+offload"):
    assert results.relative_quality([], spec) == results.Quality(None, "unmeasured")


def test_load(tmp_path):
  path = tmp_path / "quality.json"
  path.write_text(json.dumps({"meta": {"seed": 0}, "rows": ROWS}))
  report = results.load(path)
  assert report["meta"] == {"seed": 0} and report["rows"] == ROWS
  assert results.load_rows(path, required=True) == ROWS
  assert results.load_rows(tmp_path / "none.json", required=False) == []
  with pytest.raises(FileNotFoundError, match="none.json"):
    results.load_rows(tmp_path / "none.json", required=True)
  for text in ("{not json", json.dumps([1, 2]), json.dumps({"rows": [{"model": "x"}]})):
    path.write_text(text)
    with pytest.raises(ValueError, match="quality.json"):
      results.load(path)
