"""Synthetic task generators (MQAR, selective copy, induction), a few training
steps of a tiny model, and the committed tiny checkpoint's held-out accuracy."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json

import jax
import numpy as np
import pytest

from lctx.model.params import init_params
from lctx.quality import synthetic as syn
from lctx.quality import train as tr


# ---- evaluation examples ------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_mqar_example_answers_sit_where_the_metadata_says(seed):
  T, P = 128, 16
  e = syn.mqar_example(seed, T, P)
  assert (e.task, len(e.context), len(e.continuation)) == ("mqar", T, 2 * P)
  ctx, cont = np.array(e.context), np.array(e.continuation)
  keys, values = ctx[0:2 * P:2], ctx[1:2 * P:2]
  assert np.isin(keys, syn.KEY_IDS).all() and np.isin(values, syn.VALUE_IDS).all()
  assert len(set(keys)) == P and len(set(values)) == P
  assert (ctx[2 * P:] == syn.FILLER).all()
  assert e.spans == tuple((2 * i, 2 * i + 2) for i in range(P))
  assert e.answers == tuple((2 * i + 1,) for i in range(P))
  # Every key asked once; each answer is the context token after that key.
  assert sorted(cont[0::2]) == sorted(keys)
  for (j,) in e.answers:
    query = cont[j - 1]
    (pos,) = np.nonzero(ctx[:2 * P] == query)[0]
    assert pos % 2 == 0 and cont[j] == ctx[pos + 1]
    assert (pos, pos + 2) in e.spans


@pytest.mark.parametrize("seed", [0, 3])
def test_selective_copy_example_answers_sit_where_the_metadata_says(seed):
  T, n = 200, 12
  e = syn.selective_copy_example(seed, T, n)
  assert (e.task, len(e.context), len(e.continuation)) == ("selective_copy", T, n + 1)
  ctx = np.array(e.context)
  assert e.continuation[0] == syn.MARKER
  assert e.answers == tuple((i + 1,) for i in range(n))
  positions = [s for s, _ in e.spans]
  assert positions == sorted(positions) and all(b == a + 1 for a, b in e.spans)
  # The tokens at the spans, in order, are the answers; everything else is noise.
  assert [ctx[p] for p in positions] == [e.continuation[j] for (j,) in e.answers]
  assert np.isin(ctx[positions], syn.CONTENT_IDS).all() and len(set(ctx[positions])) == n
  assert (np.delete(ctx, positions) == syn.NOISE).all()


def test_examples_are_deterministic_per_seed():
  for make in (syn.mqar_example, syn.selective_copy_example):
    assert make(5) == make(5)
    assert make(5).context != make(6).context
  assert [e.seed for e in tr.heldout_examples("mqar", 3)] == [tr.EVAL_SEED + i for i in range(3)]


# ---- training batches ----------------------------------------------------------------------

def _check_batch(batch, B, L):
  tokens, targets, mask = batch
  assert tokens.shape == targets.shape == mask.shape == (B, L)
  assert (tokens.dtype, targets.dtype, mask.dtype) == (np.int32, np.int32, np.float32)
  assert ((tokens >= 0) & (tokens < syn.VOCAB_SIZE)).all()
  np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])  # next-token targets
  assert set(np.unique(mask)) <= {0.0, 1.0}


def test_mqar_batch_masks_values_after_their_queries():
  B, L, P = 16, 160, 16
  batch = syn.mqar_batch(0, B, L, P, eval_layout_frac=0.5)
  _check_batch(batch, B, L)
  tokens, targets, mask = batch
  for b in range(B):
    pairs = dict(zip(tokens[b, 0:2 * P:2], tokens[b, 1:2 * P:2]))
    assert all(k in syn.KEY_IDS for k in pairs) and all(v in syn.VALUE_IDS for v in pairs.values())
    at = np.nonzero(mask[b])[0]
    assert len(at) == P and (at >= 2 * P).all()
    # The query is the masked position's token; the target is its value.
    assert sorted(tokens[b, at]) == sorted(pairs)
    assert all(targets[b, t] == pairs[tokens[b, t]] for t in at)


def test_mqar_batch_layouts():
  """eval_layout_frac 1: filler, then the P queries back to back at the end of
  the used part; 0: queries at power-law gaps (mostly early)."""
  L, P = 256, 8
  tokens, _, mask = syn.mqar_batch(1, 32, L, P, eval_layout_frac=1.0)
  for b in range(32):
    at = np.nonzero(mask[b])[0]
    np.testing.assert_array_equal(np.diff(at), 2)
  tokens, _, mask = syn.mqar_batch(1, 256, L, P, eval_layout_frac=0.0)
  first = np.array([np.nonzero(m)[0][0] for m in mask]) - 2 * P
  assert np.median(first) < (L - 2 * P) / 4  # power law: short gaps are frequent
  assert ((tokens == syn.PAD).sum(axis=1) == 0).all()


def test_selective_copy_batch_masks_the_copies_in_order():
  B, L, n = 16, 96, 8
  batch = syn.selective_copy_batch(0, B, L, n)
  _check_batch(batch, B, L)
  tokens, targets, mask = batch
  for b in range(B):
    (marker,) = np.nonzero(tokens[b] == syn.MARKER)[0]
    ctx = tokens[b, :marker]
    data = ctx[ctx != syn.NOISE]
    assert len(data) == n and (np.delete(ctx, np.nonzero(ctx != syn.NOISE)) == syn.NOISE).all()
    at = np.nonzero(mask[b])[0]
    np.testing.assert_array_equal(at, marker + np.arange(n))
    np.testing.assert_array_equal(targets[b, at], data)


def test_induction_batch_masks_the_repeat():
  B, L = 16, 64
  batch = syn.induction_batch(0, B, L)
  _check_batch(batch, B, L)
  tokens, targets, mask = batch
  for b in range(B):
    at = np.nonzero(mask[b])[0]
    # Each masked target is the token after the earlier occurrence of the current token.
    for t in at:
      (prev,) = np.nonzero(tokens[b, :t] == tokens[b, t])[0]
      assert targets[b, t] == tokens[b, prev + 1]


def test_batches_are_deterministic_per_seed():
  a = syn.mixed_batch((0, 1, 2), 8, 128, 8, 8, (0.4, 0.4, 0.2))
  b = syn.mixed_batch((0, 1, 2), 8, 128, 8, 8, (0.4, 0.4, 0.2))
  c = syn.mixed_batch((0, 1, 3), 8, 128, 8, 8, (0.4, 0.4, 0.2))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])
  _check_batch(a, 8, 128)
  # Rows in order: MQAR, selective copy, induction.
  assert (a[0][:3, 0] >= syn.NUM_SPECIAL).all()
  assert (a[0][3:6] == syn.MARKER).any(axis=1).all()


# ---- training --------------------------------------------------------------------------------

def test_a_few_training_steps_decrease_the_loss():
  """20 steps of MQAR rows on a 1-layer model: at least the values' half of the
  vocabulary is learnt (cross entropy from ln 128 towards ln 60)."""
  config = tr.tiny_config(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16, max_position_embeddings=64)
  stage = tr.Stage(steps=20, seq_len=32, num_pairs=4, num_tokens=4, mix=(1, 0, 0))
  tc = tr.TrainConfig(batch=8, lr=1e-2, warmup=2, stages=(stage,), log_every=10)
  fixed = syn.mixed_batch(123, 8, 32, 4, 4, (1, 0, 0))  # not a training batch
  loss = jax.jit(tr.masked_loss, static_argnums=0)
  params0 = init_params(config, tc.seed, tc.init_std)
  before = float(loss(config, params0, *fixed))
  logs = []
  params, history = tr.train(config, tc, log=logs.append)
  after = float(loss(config, params, *fixed))
  assert np.isfinite(after) and after < before - 0.3, (before, after)
  assert history["step"] == [10, 20] and len(logs) == 2
  assert history["loss"][1] < history["loss"][0]
  assert jax.tree.structure(params) == jax.tree.structure(params0)  # stacked, as saved


def test_masked_loss_checks_shapes_and_dtypes():
  config = tr.tiny_config(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16)
  params = init_params(config, 0)
  tokens, targets, mask = syn.mqar_batch(0, 2, 32, 4)
  with pytest.raises(AssertionError):
    tr.masked_loss(config, params, tokens, targets, mask[:, :-1])
  with pytest.raises(AssertionError):
    tr.masked_loss(config, params, tokens, targets, mask.astype(np.int32))


# ---- the committed checkpoint ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  return tr.load_tiny()


def test_committed_checkpoint_is_small_and_documented():
  size = sum(p.stat().st_size for p in tr.TINY_DIR.rglob("*") if p.is_file())
  assert size <= 20e6
  summary = json.loads((tr.TINY_DIR / "summary.json").read_text())
  assert summary["command"].startswith("python -m experiments.train_tiny")
  for key in ("seed", "steps", "wall_time_s", "final_loss", "heldout_accuracy"):
    assert key in summary
  assert (tr.TINY_DIR / "README.md").is_file()


def test_committed_checkpoint_recalls_mqar_on_heldout_seeds(tiny):
  """Uncompressed, teacher-forced argmax via lctx.engine.forward at context 512,
  32 pairs, on seeds the summary's evaluation did not use (training batches
  never use a lone-int seed)."""
  config, params = tiny
  assert config.max_position_embeddings >= 1024
  first = tr.EVAL_SEED + 50_000
  mqar = tr.answer_accuracy(config, params, tr.heldout_examples("mqar", 16, 512, 32, first))
  copy = tr.answer_accuracy(config, params,
                            tr.heldout_examples("selective_copy", 16, 512, 16, first))
  print(f"held-out accuracy at T=512: MQAR {mqar:.4f} (per query), selective copy "
        f"{copy:.4f} (per token)")
  assert mqar >= 0.95
