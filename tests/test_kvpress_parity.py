"""Parity with NVIDIA kvpress 0.5.5's prefill KV-cache compression.

The fixture (tests/fixtures/kvpress/, made by make_fixture.py there, in a
separate virtualenv with kvpress) holds two tiny random Llama checkpoints (gqa:
4 query / 2 KV heads; mha: 4 / 4), a 300-token prompt, and for each press and
compression ratio the positions kvpress kept per (layer, batch, KV head) and
the scores it kept them by.

  (a) tests/np_eviction.py, a numpy reimplementation of kvpress's scorers,
      reproduces the kept positions exactly and the scores to 1e-4 (always runs);
  (b) kvpress itself, run live, keeps the same positions (only where kvpress
      imports: it pins transformers < 5.3, so not in lctx's environment);
  (c) lctx.kept_positions(config, params, tokens, kv_compression=SPEC) keeps
      the same positions, loading the same checkpoint with lctx's HF import.

snapkv at ratio 0.9 keeps n_kept = int(300 * (1 - 0.9)) = 29 positions, fewer
than its 64-token observation window, which kvpress scores all alike (max + 1):
which 29 it keeps is torch topk's tie-breaking. Those cases (listed in
kvpress_defaults.json "decided_by_exact_ties") are checked only for keeping
n_kept positions of the window; snapkv_window16 (window 16) covers snapkv's
pooled scores at 0.9.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests import np_eviction as ne

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "kvpress"
META = json.loads((FIXTURE / "kvpress_defaults.json").read_text())
MODELS = ("gqa", "mha")
RATIOS = ("0.5", "0.9")
WINDOW = META["defaults"]["snapkv.window_size"]
KERNEL = META["defaults"]["snapkv.kernel_size"]
N_SINK = META["used"]["streaming_llm.n_sink"]
SMALL_WINDOW = META["used"]["snapkv_window16.window_size"]
TIED = set(META["decided_by_exact_ties"])
MIN_GAP = 1e-4  # relative gap at the top-k boundary that every untied case has

# method name in the fixture -> (np_eviction method, knobs, lctx kv_compression spec template)
METHODS = {
    "streaming_llm": ("streaming_llm", dict(n_sink=N_SINK), f"streaming_llm:ratio={{r}},sinks={N_SINK}"),
    "knorm": ("knorm", {}, "knorm:ratio={r}"),
    "snapkv": ("snapkv", dict(window=WINDOW, kernel=KERNEL),
               f"snapkv:ratio={{r}},window={WINDOW},kernel={KERNEL}"),
    "snapkv_window16": ("snapkv", dict(window=SMALL_WINDOW, kernel=KERNEL),
                        f"snapkv:ratio={{r}},window={SMALL_WINDOW},kernel={KERNEL}"),
    "tova": ("tova", {}, "tova:ratio={r}"),
    "observed_attention": ("observed_attention", {}, "observed_attention:ratio={r}"),
}
CASES = [(m, method, r) for m in MODELS for method in METHODS for r in RATIOS]
ids = lambda case: "/".join(case)


@functools.cache
def fixture() -> dict[str, np.ndarray]:
  with np.load(FIXTURE / "kept.npz") as f:
    return dict(f)


@functools.cache
def np_layers(model: str) -> list[dict[str, np.ndarray]]:
  config, weights = ne.load_checkpoint(FIXTURE / model)
  return ne.llama_layers(config, weights, fixture()["tokens"])


def window_of(method: str) -> int:
  return SMALL_WINDOW if method == "snapkv_window16" else WINDOW


def check_kept(got: np.ndarray, key: str, method: str) -> None:
  """got int32 [L, 1, K, n_kept] ascending equals the fixture's; in a tied case,
  n_kept distinct positions, all inside the (equally scored) observation window."""
  want = fixture()[key]
  assert got.shape == want.shape, (key, got.shape, want.shape)
  if key not in TIED:
    mismatch = np.argwhere((got != want).any(-1))
    assert mismatch.size == 0, f"{key}: other positions kept at (layer, batch, head) {mismatch.tolist()}"
    return
  T = len(fixture()["tokens"])
  assert (got >= T - window_of(method)).all() and (got < T).all(), key
  assert (np.diff(got, axis=-1) > 0).all(), key


# ---- the fixture itself ------------------------------------------------------------

def test_fixture_is_complete():
  f = fixture()
  T = len(f["tokens"])
  assert f["tokens"].dtype == np.int32 and T == META["T"] == 300
  for model, method, r in CASES:
    key = f"{model}/{method}/{r}"
    kept, scores = f[key], f[f"{key}/scores"]
    assert kept.dtype == np.int32 and scores.dtype == np.float32
    assert kept.shape[:3] == scores.shape[:3] and scores.shape[3] == T
    assert kept.shape[3] == ne.n_kept(T, float(r)) == META["n_kept"][r]
    assert (np.diff(kept, axis=-1) > 0).all(), key


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_no_near_tie_decides_membership(case):
  """Every untied case has a clear margin between the n_kept-th and the
  (n_kept+1)-th score of each (layer, head) in kvpress's own scores."""
  key = "/".join(case)
  scores = fixture()[f"{key}/scores"].astype(np.float64)
  n = fixture()[key].shape[-1]
  s = -np.sort(-scores, axis=-1)
  gap = (s[..., n - 1] - s[..., n]) / np.abs(s[..., n - 1])
  if key in TIED:
    assert gap.min() == 0.0
  else:
    assert gap.min() > MIN_GAP, (key, gap.min())


# ---- (a) the numpy reimplementation --------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=ids)
def test_numpy_scorers_match_kvpress(case):
  model, method, r = case
  key = "/".join(case)
  name, knobs, _ = METHODS[method]
  layers = np_layers(model)
  got_scores = np.stack([ne.scores(name, d["q"], d["k"], float(r), **knobs)[None] for d in layers])
  np.testing.assert_allclose(got_scores, fixture()[f"{key}/scores"], rtol=1e-4, atol=0, err_msg=key)
  n = ne.n_kept(got_scores.shape[-1], float(r))
  check_kept(ne.kept(got_scores, n), key, method)


def test_numpy_kept_positions_entry_point():
  """np_eviction.kept_positions (checkpoint path in, positions out) on one case."""
  got = ne.kept_positions(FIXTURE / "gqa", fixture()["tokens"], "snapkv", 0.5, window=WINDOW,
                          kernel=KERNEL)
  np.testing.assert_array_equal(got, fixture()["gqa/snapkv/0.5"])


def test_streaming_llm_keeps_sinks_and_recent():
  """The rule in words: the first n_sink and the last n_kept - n_sink positions."""
  T = len(fixture()["tokens"])
  for r in RATIOS:
    n = ne.n_kept(T, float(r))
    want = np.r_[np.arange(N_SINK), np.arange(T - (n - N_SINK), T)]
    for model in MODELS:
      got = fixture()[f"{model}/streaming_llm/{r}"]
      assert (got == want).all(), (model, r)


# ---- (b) kvpress live (only where it is installed) -----------------------------------

def _make_fixture_module():
  spec = importlib.util.spec_from_file_location("kvpress_make_fixture", FIXTURE / "make_fixture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("model", MODELS)
def test_kvpress_live(model):
  pytest.importorskip(
      "kvpress", reason="kvpress is not installed here (it pins transformers < 5.3); the "
      "committed fixture stands in for it. To run live: see tests/fixtures/kvpress/make_fixture.py")
  import torch
  mf = _make_fixture_module()
  ids_t = torch.from_numpy(fixture()["tokens"].astype(np.int64))[None]
  for method in METHODS:
    attn = "eager" if method in mf.EAGER_ONLY else "sdpa"
    hf = mf.load(FIXTURE / model, attn)
    keys_full = mf.full_keys(hf, ids_t)
    for r in RATIOS:
      key = f"{model}/{method}/{r}"
      kept, scores = mf.run_press(hf, mf.PRESSES[method](float(r)), ids_t, keys_full)
      np.testing.assert_allclose(scores, fixture()[f"{key}/scores"], rtol=1e-4, atol=0, err_msg=key)
      check_kept(kept, key, method)


# ---- (c) lctx ------------------------------------------------------------------------
# lctx.kept_positions(config, params, tokens [B, T], kv_compression=SPEC) -> int32
# [L, B, K, n_kept], ascending per (layer, row, KV head).

@pytest.mark.parametrize("case", CASES, ids=ids)
def test_lctx_kept_positions_match_kvpress(case):
  model, method, r = case
  import lctx
  config, params = lctx.load_hf_checkpoint(FIXTURE / model)
  spec = METHODS[method][2].format(r=r)
  got = np.asarray(lctx.kept_positions(config, params, fixture()["tokens"][None], kv_compression=spec))
  assert got.dtype == np.int32, got.dtype
  check_kept(got, "/".join(case), method)
