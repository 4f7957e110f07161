"""The quality harness (lctx.quality): task generators, the oracles, the
evaluation's shared prefill against one prefill per policy, and the bounds
the issue asks for (ratio 0 is the uncompressed cache, the oracle keeps the
answer, the anti-oracle loses it)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

import lctx
from lctx.cache import spec as spec_lib
from lctx.cache.evict import METHODS
from lctx.cache.evict.oracle import format_spans, parse_spans
from lctx.quality import evaluate, tasks
from lctx.quality.tasks import Example
from tests.conftest import smollm2_gguf

CFG = lctx.ModelConfig.from_preset("tiny")


@functools.cache
def tiny_params():
  return lctx.init_params(CFG, jax.random.key(0))


def random_examples(n=4, T=40, Q=6, seed=0):
  """Random token examples: two answers (one of two tokens), spans that
  differ between rows (the oracles then run per row)."""
  rng = np.random.default_rng(seed)
  return [Example(tuple(int(x) for x in rng.integers(0, CFG.vocab_size, T)),
                  tuple(int(x) for x in rng.integers(0, CFG.vocab_size, Q)),
                  ((2,), (4, 5)), ((8 + i % 2, 12), (25, 26)), "random", 0.5, i)
          for i in range(n)]


@functools.cache
def builder():
  return tasks.ChatBuilder(lctx.load_tokenizer(smollm2_gguf()))


# ---- tasks ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["passkey", "needle_single", "needle_multikey",
                                  "variable_tracking"])
def test_text_tasks_put_the_answer_where_the_metadata_says(task):
  b = builder()
  make = {"passkey": tasks.passkey, "needle_single": tasks.needle,
          "needle_multikey": functools.partial(tasks.needle, keys=4),
          "variable_tracking": tasks.variable_tracking}[task]
  starts = []
  for depth in (0.0, 0.5, 1.0):
    examples = make(b, 512, depth, 3, seed=7)
    assert examples == make(b, 512, depth, 3, seed=7)  # deterministic
    assert examples != make(b, 512, depth, 3, seed=8)
    for ex in examples:
      assert len(ex.context) == 512 and ex.task == task and ex.depth == depth
      (answer,) = ex.answers
      value = b.tok.decode([ex.continuation[j] for j in answer]).strip()
      assert value.isdigit() and len(value) in (5, 7)
      # The answer's value is inside the first span (the needle / first assignment).
      s, e = ex.spans[0]
      assert value in b.tok.decode(list(ex.context[s:e]))
      assert b.tok.decode(list(ex.continuation[:answer[0]])).rstrip().endswith(("is", "is:"))
      # Every example of the cell has the same spans and shapes (one batch, one oracle spec).
      assert ex.spans == examples[0].spans and len(ex.context) == len(examples[0].context)
    starts.append(examples[0].spans[0][0])
  assert starts[0] < starts[1] < starts[2]  # deeper needles sit later
  if task == "needle_multikey":  # the distractors' values are in the context, not in the spans
    assert len(ex.spans) == 1


def test_generators_reject_bad_arguments():
  b = builder()
  for make in (tasks.passkey, tasks.needle, tasks.variable_tracking):
    for depth in (1.5, -0.1, float("nan")):
      with pytest.raises(ValueError, match="depth = .*; allowed: a fraction in \\[0, 1\\]"):
        make(b, 512, depth, 1)
    with pytest.raises(ValueError, match="n = -1; allowed: an int >= 0"):
      make(b, 512, 0.5, -1)
    with pytest.raises(ValueError, match="seed = -1; allowed"):
      make(b, 512, 0.5, 1, seed=-1)
  for keys in (0, len(tasks.NEEDLE_KEYS) + 1):
    with pytest.raises(ValueError, match=f"keys = {keys}; allowed"):
      tasks.needle(b, 512, 0.5, 1, keys=keys)
  # Too short a context names the true minimum: one token less fails, that length works.
  with pytest.raises(ValueError, match=r"allowed: >= (\d+) tokens") as e:
    tasks.needle(b, 100, 0.5, 1, keys=4)
  least = int(e.value.args[0].rsplit(">= ", 1)[1].split()[0])
  assert len(tasks.needle(b, least, 0.5, 1, keys=4)[0].context) == least
  with pytest.raises(ValueError, match=f"allowed: >= {least} tokens"):
    tasks.needle(b, least - 1, 0.5, 1, keys=4)


def test_variable_tracking_chain_together_or_spread():
  b = builder()
  (together,) = tasks.variable_tracking(b, 512, 0.25, 1, seed=3, hops=2)
  (spread,) = tasks.variable_tracking(b, 512, 0.25, 1, seed=3, hops=2, spread=True)
  for ex in (together, spread):
    assert len(ex.spans) == 3  # the value's statement and one per hop
    text = [b.tok.decode(list(ex.context[s:e])).strip() for s, e in ex.spans]
    assert text[0].startswith("VAR ") and " = VAR " in text[1] and " = VAR " in text[2]
    assert text[1].split(" = VAR ")[1].rstrip(".") == text[0].split()[1]  # B = A
    asked = text[2].split()[1]
    assert b.tok.decode(list(ex.continuation)).count(f"VAR {asked}?") == 1
  # Together: one statement after the other; spread: filler between them.
  assert [e for _, e in together.spans[:-1]] == [s for s, _ in together.spans[1:]]
  assert all(e < s for (_, e), (s, _) in zip(spread.spans, spread.spans[1:]))
  with pytest.raises(ValueError, match="hops = 0; allowed"):
    tasks.variable_tracking(b, 512, 0.5, 1, hops=0)


def test_fidelity_is_a_window_of_real_prose():
  b = builder()
  (ex,) = tasks.fidelity(b, 256, 1, seed=3, continuation=16)
  ids = b.encode(tasks.prose())
  o = next(i for i in range(len(ids)) if ids[i:i + 256] == ex.context)
  assert ex.continuation == ids[o + 256:o + 272]
  assert ex.answers == tuple((j,) for j in range(16)) and ex.spans == ()


def test_example_checks_its_indices():
  with pytest.raises(ValueError, match="outside the continuation"):
    Example((1, 2, 3), (4,), ((1,),), (), "t")
  with pytest.raises(ValueError, match="outside the context"):
    Example((1, 2, 3), (4,), ((0,),), ((2, 4),), "t")
  with pytest.raises(ValueError, match="no answers"):
    Example((1, 2, 3), (4,), (), (), "t")
  with pytest.raises(ValueError, match="the context is empty"):
    Example((), (4,), ((0,),), (), "t")


# ---- oracles ----------------------------------------------------------------------------

def test_oracle_spans_knob():
  assert parse_spans("3-5/10-12") == ((3, 5), (10, 12))
  assert format_spans(((3, 5), (10, 12))) == "3-5/10-12"
  for bad in ("3-5,1-2", "5-3", "a-b", "3"):
    with pytest.raises(ValueError, match="spans"):
      spec_lib.parse(f"oracle:ratio=0.5,spans={bad}")
  ex = random_examples(1)[0]
  assert evaluate.example_spec("oracle:ratio=0.5+int8", ex) == (
      "oracle:ratio=0.5,spans=8-12/25-26+int8")
  assert evaluate.example_spec("snapkv:ratio=0.5", ex) == "snapkv:ratio=0.5"
  with pytest.raises(ValueError, match="sets the oracle's spans"):
    evaluate.example_spec("anti_oracle:ratio=0.5,spans=1-2", ex)
  with pytest.raises(ValueError, match="has none"):
    evaluate.example_spec("oracle:ratio=0.5", Example((1, 2), (3,), ((0,),), (), "fidelity"))


def test_oracle_keeps_and_anti_oracle_drops_the_spans():
  tokens = np.asarray([random_examples(1, T=40)[0].context])
  params = tiny_params()
  kept = np.asarray(lctx.kept_positions(CFG, params, tokens,
                                        kv_compression="oracle:ratio=0.75,spans=5-9/20-22"))
  # 10 kept: the 6 span positions and the 4 most recent, in every layer and KV head.
  assert (kept == np.array([5, 6, 7, 8, 20, 21, 36, 37, 38, 39])).all()
  kept = np.asarray(lctx.kept_positions(CFG, params, tokens,
                                        kv_compression="anti_oracle:ratio=0.5,spans=30-40"))
  assert (kept == np.arange(10, 30)).all()  # the most recent 20 outside the span
  # With sinks: the oracle keeps them too; the anti-oracle drops its spans even among them.
  kept = np.asarray(lctx.kept_positions(CFG, params, tokens,
                                        kv_compression="oracle:ratio=0.75,sinks=2,spans=20-22"))
  assert (kept == np.array([0, 1, 20, 21, 34, 35, 36, 37, 38, 39])).all()
  kept = np.asarray(lctx.kept_positions(CFG, params, tokens,
                                        kv_compression="anti_oracle:ratio=0.75,sinks=4,spans=2-6"))
  assert (kept == np.array([0, 1, 32, 33, 34, 35, 36, 37, 38, 39])).all()


def test_bad_protocol_and_spec_fail_before_compiling():
  with pytest.raises(ValueError, match="protocol 'x'; allowed: agnostic, aware"):
    evaluate.run(CFG, tiny_params(), random_examples(1), [], protocol="x")
  with pytest.raises(ValueError, match="unknown policy"):
    evaluate.run(CFG, tiny_params(), random_examples(1), ["nope"])
  past = Example((1, 2, CFG.vocab_size), (4, 5), ((1,),), (), "t")
  with pytest.raises(ValueError, match=rf"t example \(seed 0\) holds token ids in "
                                       rf"\[1, {CFG.vocab_size}\], outside the vocabulary "
                                       rf"\[0, {CFG.vocab_size}\)"):
    evaluate.run(CFG, tiny_params(), [past], [])


# ---- evaluation -------------------------------------------------------------------------

SHARED_SPECS = ["snapkv:ratio=0.5,window=8", "h2o:ratio=0.75", "oracle:ratio=0.75", "anti_oracle:ratio=0.5", "snapkv:ratio=0.5,window=8+int8",
                "int4"]


@pytest.mark.parametrize("protocol", ["agnostic", "aware"])
def test_shared_prefill_equals_one_prefill_per_policy(protocol):
  """One captured prefill for every eviction policy gives what running
  lctx.engine.prefill per policy gives: the same kept positions (recall),
  the same answers, KL and top-1 agreement (to float rounding)."""
  examples = random_examples()
  a = evaluate.run(CFG, tiny_params(), examples, SHARED_SPECS, protocol=protocol, batch=4)
  b = evaluate.run(CFG, tiny_params(), examples, SHARED_SPECS, protocol=protocol, batch=4,
                   shared=False)
  assert list(a) == [""] + SHARED_SPECS
  for spec in a:
    for x, y in zip(a[spec], b[spec], strict=True):
      assert x.right == y.right and x.recall == y.recall and x.top1 == y.top1, spec
      np.testing.assert_allclose(x.kl, y.kl, rtol=1e-2, atol=1e-9)
  assert all(o.recall is None and o.kl == 0 and o.top1 == 1 for o in a[""])
  assert all(o.recall == 1.0 for o in a["oracle:ratio=0.75"])
  assert all(o.recall == 0.0 for o in a["anti_oracle:ratio=0.5"])


def test_ratio_zero_is_the_uncompressed_cache_for_every_policy():
  examples = random_examples(seed=1)
  evict = [m for m in METHODS]
  specs = [f"{m}:ratio=0" for m in evict] + ["snapkv:ratio=0+int8", "int8"]
  out = evaluate.run(CFG, tiny_params(), examples, specs)
  for m in evict:
    for o, base in zip(out[str(spec_lib.parse(f"{m}:ratio=0"))], out[""]):
      assert o.right == base.right and o.kl == 0.0 and o.top1 == 1.0 and o.recall == 1.0, m
  for o, q in zip(out[str(spec_lib.parse("snapkv:ratio=0+int8"))], out["int8"]):
    assert o.right == q.right and o.kl == q.kl


# ---- the real model: the oracle keeps the passkey, the anti-oracle loses it -------------

def test_passkey_oracle_and_anti_oracle_on_smollm2():
  config, params = lctx.load_gguf_checkpoint(smollm2_gguf())
  examples = tasks.passkey(builder(), 512, 0.5, 4, seed=0)
  specs = ["oracle:ratio=0.9", "anti_oracle:ratio=0.5", "streaming_llm:ratio=0.9"]
  out = evaluate.run(config, params, examples, specs)
  acc = {s: np.mean([o.accuracy for o in out[s]]) for s in out}
  assert acc[""] == 1.0
  assert acc["oracle:ratio=0.9"] == 1.0  # the needle and the question's neighbours suffice
  assert acc["anti_oracle:ratio=0.5"] == 0.0  # the pass key is nowhere in the cache
  # 4 sinks + the last 47 tokens: a mid-depth needle is not among them.
  assert all(o.recall == 0.0 for o in out["streaming_llm:ratio=0.9"])


def test_shared_prefill_with_unrolled_params_and_a_quantized_cache():
  """Per-layer params make a per-layer cache (a dict of per-layer tuples when
  quantized): its layers are written with static indices."""
  examples = random_examples(2)
  params = lctx.unstack_layers(tiny_params())
  spec = "snapkv:ratio=0.5,window=8+int4"
  a = evaluate.run(CFG, params, examples, [spec])[spec]
  b = evaluate.run(CFG, params, examples, [spec], shared=False)[spec]
  assert [(o.right, o.recall, o.top1) for o in a] == [(o.right, o.recall, o.top1) for o in b]


def test_a_spec_that_does_not_fit_the_model_fails_before_compiling():
  with pytest.raises(ValueError, match="must divide head_dim"):
    evaluate.run(CFG, tiny_params(), random_examples(1), ["int8", "kivi"])
  with pytest.raises(ValueError, match="rotated by their slot"):
    evaluate.run(CFG, tiny_params(), random_examples(1), ["snapkv:ratio=0.5+kvquant"])
  shared = dataclasses.replace(CFG, kv_share_every=2)  # engine.generate's check, shared
  with pytest.raises(ValueError, match="kv_share_every=2"):
    evaluate.run(shared, tiny_params(), random_examples(1), ["snapkv:ratio=0.5"])
