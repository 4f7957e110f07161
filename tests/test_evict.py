"""Token eviction of the KV cache (lctx.cache.evict, lctx.model.evicting)
through the public API: every method's no-op setting is the dense cache
bitwise, kvpress's counting rule, what each method always keeps, per-layer
against per-head methods, the seeded random baseline against a numpy hash,
chunked-prefill eviction (same positions, bounded memory), decode-time
eviction (one compile, rows within budget), physical bytes against closed
forms and XLA's own memory analysis, composition with quantization, and
sharded runs against unsharded ones.

Expected values come from independent computations: numpy (the counter hash
of tests/np_evict_decode.py), Python-float closed forms, and the compiled
programs' memory analysis. Tiny fp32 model (2 layers, 8 query heads, 2 KV
heads, head_dim 8) with w_q and w_k scaled up so attention is far from
uniform. Every program is jitted once and its results shared through
module-level caches; what the tests need of one method runs as one program
(method_runs). About 30 compiles in all, most at XLA's lowest backend
optimisation (FAST); the engine's own jits (kept_positions, generate,
decode_step, the sharded steps) as shipped."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx
from lctx import engine
from lctx.cache import spec as spec_lib
from lctx.cache.dense import abstract_cache
from lctx.cache.evict import base as evict_base
from lctx.cost import metrics
from lctx.model import evicting, transformer
from tests.np_evict_decode import hash_uniform as np_hash_uniform

CFG = lctx.ModelConfig.from_preset("tiny")
L, K, H = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
METHODS = ("streaming_llm", "h2o", "snapkv", "tova", "keyformer", "knorm", "observed_attention",
           "random")
DECODE_METHODS = ("streaming_llm", "h2o", "tova", "keyformer")
T, LENGTHS = 48, (48, 37)  # a right-padded batch of two rows
STEPS = 4  # decode steps compared bitwise with the dense cache
# Every method with two sinks, half the prompt removed (snapkv: a window of 8);
# those that can, evicting while decoding too (the prefill is the same).
SINKS2 = {m: f"{m}:ratio=0.5,sinks=2" + (",window=8" if m == "snapkv" else "")
          + (",decode=evict" if m in DECODE_METHODS else "") for m in METHODS}


def _kvpress_n_kept(t: int, ratio: float, budget: int = 0) -> int:
  """kvpress 0.5.5's count, written out here in Python floats."""
  if budget:
    return min(budget, t)
  return max(1, int(t * (1 - ratio)))


@functools.cache
def model():
  """(params, tokens [B, T], feed [100, B]). Params drawn in numpy like
  lctx.init_params (normal(0, 0.02), norms at 1; no eager PRNG compiles),
  w_q and w_k scaled by 8."""
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jnp.ones(x.shape, x.dtype)
    scale = 8 if ("w_q" in name or "w_k" in name) else 1
    return jnp.asarray(scale * 0.02 * rng.standard_normal(x.shape), x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, lctx.abstract_params(CFG))
  # Padding past a row's length holds real token ids: it must not matter.
  tokens = rng.integers(0, CFG.vocab_size, (len(LENGTHS), T)).astype(np.int32)
  feed = rng.integers(0, CFG.vocab_size, (100, len(LENGTHS))).astype(np.int32)
  return params, tokens, feed


def _np(x):
  return np.asarray(jax.device_get(x))


def _positions(cache) -> np.ndarray:
  """[L, B, K, S] original positions of the cache's slots."""
  pos = cache.evict.pos
  pos = jnp.stack(pos) if isinstance(pos, tuple) else pos
  return _np(pos)[:, :, :, 0, :]


def kept_sets(pos: np.ndarray, lengths) -> dict:
  """(l, b, h) -> sorted list of the original positions of the filled slots."""
  lengths = np.asarray(lengths)
  return {(l, b, h): sorted(pos[l, b, h, :lengths[b]].tolist())
          for l in range(pos.shape[0]) for b in range(pos.shape[1]) for h in range(pos.shape[2])}


# XLA's lowest backend optimisation for the programs this file jits itself
# (about half the compile time on CPU); the engine's own jits run as shipped.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _stage(logits, cache) -> dict:
  """What the tests read of a step's result, as numpy."""
  ev = cache.evict
  return dict(logits=_np(logits), lengths=_np(cache.lengths),
              pos=_positions(cache) if ev is not None else None,
              next_pos=_np(ev.next_pos) if ev is not None else None,
              budget=_np(ev.budget) if ev is not None else None,
              step=_np(ev.step) if ev is not None else None)


def _prefill_then_decode(params, tokens, lengths, feed, cache):
  """transformer.prefill, then a decode step per row of feed (a scan):
  (prefill logits, [steps, B, V] decode logits, final cache)."""
  logits, cache = transformer.prefill(CFG, params, tokens, lengths, cache)

  def step(cache, tok):
    out, cache = transformer.decode(CFG, params, tok, cache)
    return cache, out

  cache, steps = jax.lax.scan(step, cache, feed)
  return logits, steps, cache


_prefill_then_decode_jit = jax.jit(_prefill_then_decode, compiler_options=FAST)
_prefill_jit = jax.jit(functools.partial(transformer.prefill, CFG), static_argnames=("chunk",),
                       compiler_options=FAST)


def _batch():
  params, tokens, feed = model()
  return params, jnp.asarray(tokens), jnp.asarray(LENGTHS, jnp.int32), feed


@functools.cache
def prefill_decode(spec: str, capacity: int, steps: int):
  """(prefill logits, final stage, [steps, B, V] decode logits) of the batch
  with `spec` (the dense baseline), one compiled program."""
  params, tokens, lengths, feed = _batch()
  cache = lctx.init_cache(CFG, len(LENGTHS), capacity, kv_compression=spec)
  logits, steps_out, cache = _prefill_then_decode_jit(params, tokens, lengths,
                                                      jnp.asarray(feed[:steps]), cache)
  return dict(logits=_np(logits)), _stage(steps_out[-1], cache), _np(steps_out)


def _capacity(spec: str) -> int:
  return evict_base.n_kept(spec_lib.parse(spec).of_kind("eviction"), T)


CHUNK = 20  # two full chunks and a tail of 8 for T = 48
CHUNKED = ("random", "streaming_llm", "knorm", "h2o")  # run in CHUNK-token chunks too


def _method_program(params, tokens, lengths, feed, zero, one, whole, parts, budget, n_max):
  """Everything this file runs of one method, as one program (a compile per
  program costs more than its size): its ratio=0 prefill and decode steps,
  and with SINKS2 a one-pass prefill, _evict_chunked_prefill called
  directly with one chunk of the whole prompt, and (parts not None) a
  chunked prefill of CHUNK tokens."""
  zero = _prefill_then_decode(params, tokens, lengths, feed, zero)
  one = transformer.prefill(CFG, params, tokens, lengths, one)
  whole = transformer._evict_chunked_prefill(CFG, params, tokens, lengths, whole,
                                             transformer.PREFILL_BLOCK, T, budget, n_max)
  if parts is not None:
    parts = transformer.prefill(CFG, params, tokens, lengths, parts, chunk=CHUNK)
  return zero, one, whole, parts


_method_jit = jax.jit(_method_program, static_argnames=("n_max",), compiler_options=FAST)


@functools.cache
def method_runs(method: str) -> dict:
  """The method's results (_method_program): zero (as prefill_decode),
  one, whole, parts (stages; parts None unless in CHUNKED), one_cache (the
  one-pass cache itself, for decode_evict)."""
  params, tokens, lengths, feed = _batch()
  spec = SINKS2[method]
  budget, n_max = evicting.budgets(spec_lib.parse(spec).policies[0], lengths, T)
  assert n_max == _capacity(spec)
  new = lambda s, n: lctx.init_cache(CFG, len(LENGTHS), n, kv_compression=s)
  zero, one, whole, parts = _method_jit(
      params, tokens, lengths, jnp.asarray(feed[:STEPS]), new(f"{method}:ratio=0", T + STEPS),
      new(spec, n_max), new(spec, n_max), new(spec, n_max) if method in CHUNKED else None,
      budget, n_max=n_max)
  logits, steps_out, zero_cache = zero
  return dict(zero=(dict(logits=_np(logits)), _stage(steps_out[-1], zero_cache), _np(steps_out)),
              one=_stage(*one), whole=_stage(*whole),
              parts=None if parts is None else _stage(*parts), one_cache=one[1])


@functools.cache
def one_pass(spec: str) -> dict:
  """The batch's one-pass evicting prefill with spec (cache of n_kept slots)."""
  for method, s in SINKS2.items():
    if s == spec:
      return method_runs(method)["one"]
  params, tokens, lengths, _ = _batch()
  cache = lctx.init_cache(CFG, len(LENGTHS), _capacity(spec), kv_compression=spec)
  return _stage(*_prefill_jit(params, tokens, lengths, cache))


def chunked(method: str) -> dict:
  """The batch's evicting prefill with SINKS2 in chunks of CHUNK tokens."""
  return method_runs(method)["parts"]


# ---- 1. ratio = 0 is the dense cache, bitwise -----------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_reproduces_the_dense_cache_bitwise(method):
  """At ratio=0 (decode=append) every method keeps every prompt token, in
  order: prefill and decode logits equal the dense cache's exactly."""
  dense = prefill_decode("", T + STEPS, STEPS)
  got = method_runs(method)["zero"]
  np.testing.assert_array_equal(got[0]["logits"], dense[0]["logits"], err_msg=method)
  np.testing.assert_array_equal(got[2], dense[2], err_msg=f"{method}: decode steps")
  final = got[1]
  np.testing.assert_array_equal(final["lengths"], dense[1]["lengths"])
  np.testing.assert_array_equal(final["next_pos"], np.array(LENGTHS) + STEPS)
  for (l, b, h), kept in kept_sets(final["pos"], final["lengths"]).items():
    assert kept == list(range(LENGTHS[b] + STEPS)), (method, l, b, h)


def test_kept_positions_at_ratio_zero_is_arange():
  """lctx.kept_positions: every row keeps arange(its length), then -1."""
  params, tokens, _ = model()
  got = _np(lctx.kept_positions(CFG, params, tokens, kv_compression="tova:ratio=0",
                                lengths=np.array(LENGTHS)))
  assert got.shape == (L, len(LENGTHS), K, T) and got.dtype == np.int32
  for b, n in enumerate(LENGTHS):
    want = np.where(np.arange(T) < n, np.arange(T), -1)
    np.testing.assert_array_equal(got[:, b], np.broadcast_to(want, (L, K, T)))


# ---- 2. how many are kept ------------------------------------------------------------

def test_n_kept_follows_kvpress_float_rule():
  assert evict_base.n_kept(spec_lib.Policy("snapkv", (("ratio", 0.9),)), 300) == 29
  for ratio in (0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 0.8, 0.9, 0.95, 0.999):
    for name in ("snapkv", "h2o", "random"):
      policy = spec_lib.parse(f"{name}:ratio={ratio}").policies[0]
      table = evict_base.kept_table(policy, 400)
      for t in range(1, 401):
        want = _kvpress_n_kept(t, ratio)
        assert evict_base.n_kept(policy, t) == table[t] == want, (name, ratio, t)
      assert table[0] == evict_base.n_kept(policy, 0) == 0
  # budget= overrides ratio (whatever the ratio), capped by the row's length.
  policy = spec_lib.parse("h2o:ratio=0.9,budget=50").policies[0]
  assert [evict_base.n_kept(policy, t) for t in (10, 50, 51, 300)] == [10, 50, 50, 50]


@functools.cache
def tokens300():
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 300)).astype(np.int32)
  return tokens, np.array([300, 200], np.int32)


@functools.cache
def kept300(spec: str) -> np.ndarray:
  params = model()[0]
  tokens, lengths = tokens300()
  return _np(lctx.kept_positions(CFG, params, tokens, kv_compression=spec, lengths=lengths))


SNAP90 = "snapkv:ratio=0.9,window=16"


@pytest.mark.parametrize("spec, ratio, budget", [(SNAP90, 0.9, 0), ("knorm:ratio=0.9,budget=250",
                                                                    0.9, 250)])
def test_rows_of_different_lengths_keep_different_counts(spec, ratio, budget):
  got = kept300(spec)
  _, lengths = tokens300()
  want = [_kvpress_n_kept(int(n), ratio, budget) for n in lengths]
  assert want[0] != want[1]
  assert got.shape == (L, 2, K, max(want))
  for b, n in enumerate(want):
    row = got[:, b]
    assert (row[..., :n] >= 0).all() and (row[..., n:] == -1).all(), (spec, b)
    assert (np.diff(row[..., :n], axis=-1) > 0).all()  # distinct, ascending
    assert (row[..., :n] < lengths[b]).all()
  if not budget:
    assert want == [29, 19]  # 300 * (1 - 0.9) = 29.999999999999996 in Python floats


# ---- 3, 4. what each method always keeps; per layer or per head -------------------------

@pytest.mark.parametrize("method", METHODS)
def test_sinks_and_protected_windows_are_kept(method):
  first = one_pass(SINKS2[method])
  policy = spec_lib.parse(SINKS2[method]).policies[0]
  for (l, b, h), kept in kept_sets(first["pos"], first["lengths"]).items():
    n_len = LENGTHS[b]
    n = _kvpress_n_kept(n_len, 0.5)
    where = f"{method}: layer {l}, row {b}, KV head {h} keeps {kept}"
    assert len(kept) == len(set(kept)) == n and all(0 <= p < n_len for p in kept), where
    assert {0, 1} <= set(kept), where
    if method in ("h2o", "keyformer"):
      recent = int(n * policy["recent"])  # in Python floats
      assert recent > 0 and set(range(n_len - recent, n_len)) <= set(kept), where
    if method == "snapkv":
      assert set(range(n_len - 8, n_len)) <= set(kept), where
    if method == "tova":
      assert n_len - 1 in kept, where
    if method == "streaming_llm":
      assert kept == [0, 1] + list(range(n_len - (n - 2), n_len)), where
  np.testing.assert_array_equal(first["lengths"], [_kvpress_n_kept(n, 0.5) for n in LENGTHS])


@pytest.mark.parametrize("method, per_layer", [("streaming_llm", True), ("tova", True),
                                               ("knorm", False), ("snapkv", False)])
def test_per_layer_methods_share_positions_across_kv_heads(method, per_layer):
  first = one_pass(SINKS2[method])
  kept = kept_sets(first["pos"], first["lengths"])
  same = [all(kept[l, b, h] == kept[l, b, 0] for h in range(K))
          for l in range(L) for b in range(len(LENGTHS))]
  if per_layer:
    assert all(same), method
  else:  # a random model: the KV heads disagree somewhere
    assert not all(same), method


# ---- 5. random: seeded, the numpy hash's top-n ------------------------------------------

def test_random_is_seeded_and_equals_the_hash_top_n():
  """Seeded: the same seed keeps the same positions (a second, uncached
  run), another seed others; each (layer, row, KV head) keeps its two sinks
  and the top n - 2 of numpy's hash_uniform(seed, layer, head, position)."""
  spec = SINKS2["random"]
  a = one_pass(spec)
  again = method_runs.__wrapped__("random")["one"]
  other = one_pass(spec + ",seed=7")
  np.testing.assert_array_equal(a["pos"], again["pos"])
  kept_a, kept_o = kept_sets(a["pos"], a["lengths"]), kept_sets(other["pos"], other["lengths"])
  assert kept_a != kept_o
  for seed, kept in ((0, kept_a), (7, kept_o)):
    for (l, b, h), got in kept.items():
      pos = np.arange(2, LENGTHS[b])
      u = np_hash_uniform(seed, l, h, pos)
      n = _kvpress_n_kept(LENGTHS[b], 0.5)
      top = pos[np.argsort(-u, kind="stable")[:n - 2]]  # ties: the lower position
      assert got == [0, 1] + sorted(top.tolist()), (seed, l, b, h)


# ---- 6. chunked-prefill eviction -------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_one_chunk_keeps_what_one_pass_keeps(method):
  """_evict_chunked_prefill with a single chunk of the whole prompt scores
  the same candidates as the one-pass prefill: the same positions."""
  got, want = method_runs(method)["whole"], method_runs(method)["one"]
  np.testing.assert_array_equal(got["lengths"], want["lengths"])
  assert kept_sets(got["pos"], got["lengths"]) == kept_sets(want["pos"], want["lengths"])
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["random", "streaming_llm", "knorm"])
def test_attention_free_scores_keep_the_same_positions_chunked(method):
  """Random's and StreamingLLM's scores depend on the positions only: every
  layer keeps what the one-pass prefill keeps. Knorm's depend on the keys,
  which at layer 0 come from the embeddings alone (identical chunked and
  one pass); at later layers a chunk's keys follow hidden states that
  attended the already-evicted cache (not the whole prompt, as in one
  pass), so only layer 0 must match there (on this model layer 1 differs
  by one position in two (row, KV head) pairs)."""
  got, want = chunked(method), one_pass(SINKS2[method])
  np.testing.assert_array_equal(got["lengths"], want["lengths"])
  a, b = kept_sets(got["pos"], got["lengths"]), kept_sets(want["pos"], want["lengths"])
  layers = [0] if method == "knorm" else range(L)
  for key in a:
    if key[0] in layers:
      assert a[key] == b[key], (method, key)


@pytest.mark.parametrize("method", ["random", "knorm", "h2o"])
def test_chunked_cache_never_holds_more_than_the_budget(method):
  got = chunked(method)
  n = [_kvpress_n_kept(t, 0.5) for t in LENGTHS]
  np.testing.assert_array_equal(got["lengths"], n)  # the cache has max(n) slots, filled to n
  np.testing.assert_array_equal(got["budget"], n)
  np.testing.assert_array_equal(got["next_pos"], LENGTHS)
  for (l, b, h), kept in kept_sets(got["pos"], got["lengths"]).items():
    assert len(set(kept)) == n[b] and kept[-1] < LENGTHS[b] and {0, 1} <= set(kept)


def _arg_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _prefill_memory(spec: str, T_: int, capacity: int, chunk: int):
  """(temporaries, cache bytes among the arguments, the cache's arrays
  without per-row counters, all its leaves) of transformer.prefill compiled
  for one row of T_ tokens, chunk at a time (at the FAST options: the same
  buffer assignment as the engine's jit, measured, in half the time)."""
  params = lctx.abstract_params(CFG)
  cache = abstract_cache(CFG, 1, capacity, kv_compression=spec)
  tokens = jax.ShapeDtypeStruct((1, T_), jnp.int32)
  lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
  compiled = _prefill_jit.lower(params, tokens, lengths, cache, chunk=chunk).compile()
  mem = compiled.memory_analysis()
  cache_arg = mem.argument_size_in_bytes - _arg_bytes(params) - 4 * T_ - 4
  return (mem.temp_size_in_bytes, cache_arg, _arg_bytes(metrics.cache_arrays(cache)),
          _arg_bytes(cache))


def test_chunked_eviction_temporaries_do_not_grow_with_the_prompt():
  """Budget 64, chunk 64: the compiled chunked evicting prefill's
  temporaries are the same at 512 and 2048 tokens (budget + one chunk),
  while the dense chunked prefill's cache argument grows 4x. (The
  arguments may omit the per-row counters a prefill overwrites without
  reading: jit drops unused arguments.)"""
  temp, arrays = {}, {}
  for T_ in (512, 2048):
    temp[T_], cache_arg, arrays[T_], leaves = _prefill_memory("h2o:budget=64", T_, 64, 64)
    assert arrays[T_] <= cache_arg <= leaves, (T_, cache_arg, arrays[T_], leaves)
  assert arrays[512] == arrays[2048] == L * K * 64 * (2 * H * 4 + 4 + 4)  # K, V, pos, acc
  assert abs(temp[2048] - temp[512]) <= 0.03 * temp[512], temp
  dense = {}
  for T_ in (512, 2048):
    _, dense[T_], kv, leaves = _prefill_memory("", T_, T_, 64)
    assert kv == L * K * T_ * 2 * H * 4 and kv <= dense[T_] <= leaves
  assert dense[2048] == pytest.approx(4 * dense[512], rel=1e-4)


# ---- 7. eviction while decoding -------------------------------------------------------

DECODE_SPECS = {m: SINKS2[m] for m in DECODE_METHODS}
DECODE_STEPS = 100


@functools.cache
def decode_evict(method: str):
  """The batch's one-pass prefill (method_runs), then DECODE_STEPS
  engine.decode_steps (feed tokens): (stages, decode compiles the steps took)."""
  params, _, _, feed = _batch()
  runs = method_runs(method)
  cache = runs.pop("one_cache")  # decode_step donates it
  out = [runs["one"]]
  before = engine.decode_jit._cache_size()
  for s in range(DECODE_STEPS):
    logits, cache = engine.decode_step(CFG, params, jnp.asarray(feed[s]), cache)
    out.append(_stage(logits, cache))
  return out, engine.decode_jit._cache_size() - before


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_decode_evict_compiles_once_and_stays_within_budget(method):
  out, compiles = decode_evict(method)
  assert compiles == 1, f"{method}: {compiles} decode compiles for {DECODE_STEPS} steps"
  n = np.array([_kvpress_n_kept(t, 0.5) for t in LENGTHS])
  capacity = n.max()  # the cache has no slot beyond what the prefill keeps
  for s, st in enumerate(out):
    assert (st["lengths"] <= st["budget"]).all() and (st["lengths"] <= capacity).all(), s
    np.testing.assert_array_equal(st["budget"], n)
    np.testing.assert_array_equal(st["next_pos"], np.array(LENGTHS) + s)
    np.testing.assert_array_equal(st["step"], s)
    assert np.isfinite(st["logits"]).all()
  last = out[-1]
  for (l, b, h), kept in kept_sets(last["pos"], last["lengths"]).items():
    assert len(set(kept)) == n[b] and kept[-1] < last["next_pos"][b], (method, l, b, h)
    if method == "streaming_llm":  # the 2 sinks and the most recent
      nxt = last["next_pos"][b]
      assert kept == [0, 1] + list(range(nxt - (n[b] - 2), nxt)), (l, b, h)
    if method in ("tova", "h2o", "keyformer"):  # the newest token is protected
      assert kept[-1] == last["next_pos"][b] - 1
  # Something older than the prompt's end was evicted for a generated token.
  assert any(k[-1] >= LENGTHS[b] for (l, b, h), k in
             kept_sets(last["pos"], last["lengths"]).items())


@pytest.mark.parametrize("spec, match", [
    ("h2o:ratio=0.5,decode=evict+int8", r"'h2o'.*decode=evict.*allowed"),
    ("tova:decode=evict+kivi:group=8,residual=16", r"'tova'.*decode=evict.*allowed"),
    ("snapkv:ratio=0.5+kvquant", r"'snapkv'.*allowed with eviction: int8, int4, fp8, kivi"),
    ("knorm+kvquant:bits=8", r"'knorm'.*allowed with eviction"),
])
def test_unsupported_quantized_eviction_fails_before_compiling(spec, match):
  params, tokens, _ = model()
  compiled = []

  def listener(event, secs, **kw):  # jax's event for every XLA compile (jax._src.dispatch)
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kw.get("fun_name", ""))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError, match=match):
      engine.new_cache(CFG, params, 2, 64, kv_compression=spec)
    with pytest.raises(ValueError, match=match):
      lctx.generate(CFG, params, tokens, max_new_tokens=2, kv_compression=spec)
    with pytest.raises(ValueError, match=match):
      lctx.kept_positions(CFG, params, tokens, kv_compression=spec)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # At most eager one-op programs (argument conversions); no model step.
  assert not [f for f in compiled if any(w in f for w in ("generate", "prefill", "decode"))]


# ---- 8. physical bytes: closed form, metrics, compiled arguments ------------------------

PHYSICAL = ["snapkv:ratio=0.75", "h2o:ratio=0.8,decode=evict", "snapkv:ratio=0.75+int8",
            "h2o:ratio=0.8+kivi:bits=2,group=8,residual=16"]
T_BYTES, B_BYTES = 256, 2


def _closed_form(spec: str, B: int) -> tuple[int, int]:
  """(slots, physical bytes) of a B-row cache for a T_BYTES context, from the
  formats' definitions: dense fp32 K and V; int8 one byte per element plus
  a float32 scale per (token, KV head) for K and V; KIVI 2-bit codes plus a
  float32 scale and zero per key group (per channel, 8 tokens) and value
  group (per token, 8 channels), slots a multiple of the group, and a
  full-precision ring of residual + group slots per layer and row with a
  counter per row; eviction: an int32 position per (slot, KV head), and a
  float32 accumulated score per (slot, KV head) for H2O."""
  itemsize = 4
  ratio = 0.75 if spec.startswith("snapkv") else 0.8
  n = _kvpress_n_kept(T_BYTES, ratio)
  per_slot_layer, fixed_layer, slots = 2 * K * H * itemsize, 0, n
  if "int8" in spec:
    per_slot_layer = 2 * (K * H * 1 + K * itemsize)
  if "kivi" in spec:
    group, residual, bits = 8, 16, 2
    slots = -(-n // group) * group
    per_slot_layer = 2 * K * H * bits // 8 + 4 * (K * H // group) * itemsize
    fixed_layer = 2 * B * K * H * (residual + group) * itemsize + 4 * B
  evict_per_slot_layer = K * 4 + (K * 4 if spec.startswith("h2o") else 0)
  counters = 4 * B + 4 * 4 * B  # lengths; next_pos, budget, step, shift
  total = (L * B * slots * (per_slot_layer + evict_per_slot_layer) + L * fixed_layer + counters)
  return slots, total


_decode_jit = jax.jit(functools.partial(transformer.decode, CFG), donate_argnames=("cache",),
                     compiler_options=FAST)


@pytest.mark.parametrize("spec", PHYSICAL)
def test_physical_bytes_match_the_closed_form_metrics_and_the_compiled_step(spec):
  slots, want = _closed_form(spec, B_BYTES)
  assert metrics.cache_slots(CFG, spec, T_BYTES) == slots
  params = lctx.abstract_params(CFG)
  cache = jax.eval_shape(lambda: engine.new_cache(CFG, params, B_BYTES, slots,
                                                  kv_compression=spec))
  assert cache.capacity == slots
  physical = cache.physical_bytes
  assert physical == want, (physical, want)
  # metrics: bytes per context token of one user, all layers, without per-row counters.
  per_user = metrics.kv_token_bytes(CFG, spec, T_BYTES, CFG.dtype) * T_BYTES
  assert B_BYTES * per_user + 20 * B_BYTES == pytest.approx(physical, rel=1e-12)
  compiled = _decode_jit.lower(params, jax.ShapeDtypeStruct((B_BYTES,), jnp.int32),
                               cache).compile()
  args = compiled.memory_analysis().argument_size_in_bytes - _arg_bytes(params) - 4 * B_BYTES
  assert abs(args - physical) <= 0.02 * physical, (args, physical)


def test_kivi_knobs_checked_against_the_tiny_head_dim():
  params = model()[0]
  with pytest.raises(ValueError, match=r"'group' = 16 must divide head_dim 8.*allowed: 1, 2, 4, 8"):
    engine.new_cache(CFG, params, 1, 64, kv_compression="h2o+kivi:group=16,residual=32")
  with pytest.raises(ValueError, match=r"'residual' = 12 must be a multiple of group = 8"):
    engine.new_cache(CFG, params, 1, 64, kv_compression="h2o+kivi:group=8,residual=12")
  with pytest.raises(ValueError, match=r"multiple of 8"):
    engine.new_cache(CFG, params, 1, 52, kv_compression="h2o+kivi:group=8,residual=16")


# ---- 9. composition with quantization --------------------------------------------------

def test_snapkv_with_int8_keeps_what_full_precision_keeps():
  """The one-pass prefill scores full-precision keys; int8 changes only
  what is stored."""
  np.testing.assert_array_equal(kept300(SNAP90 + "+int8"), kept300(SNAP90))
  params, tokens, _ = model()
  out = _np(lctx.generate(CFG, params, tokens, lengths=np.array(LENGTHS), max_new_tokens=5,
                          kv_compression="snapkv:ratio=0.9+int8"))
  assert out.shape == (len(LENGTHS), 5) and out.dtype == np.int32
  assert ((out >= 0) & (out < CFG.vocab_size)).all()


def test_chunked_prefill_refuses_formats_it_cannot_compact():
  params, tokens, _ = model()
  lengths = np.array(LENGTHS)
  with pytest.raises(ValueError, match=r"allowed: a one-pass prefill \(chunk=None\), or "
                                       r"int8 / int4"):
    lctx.kept_positions(CFG, params, tokens, kv_compression="h2o:ratio=0.5+kivi:group=8,"
                        "residual=16", lengths=lengths, prefill_chunk=16)
  with pytest.raises(ValueError, match=r"allowed: scale=head"):  # per-head kept, shared scale
    lctx.kept_positions(CFG, params, tokens, kv_compression="snapkv:ratio=0.5+int8:scale=token",
                        lengths=lengths, prefill_chunk=16)


# ---- 10. sharded equals unsharded ----------------------------------------------------------

def _sharded_run(spec: str, steps: int):
  from lctx import sharding
  params, tokens, feed = model()
  plan = sharding.Plan(CFG, sharding.make_mesh("model:2"))
  policy = spec_lib.parse(spec).policies[0]
  sharded = engine.shard_params(params, plan)
  cache = engine.new_cache(CFG, sharded, len(LENGTHS), evict_base.n_kept(policy, T), plan=plan,
                           kv_compression=spec)
  logits, cache = engine.prefill(CFG, sharded, tokens, cache, np.array(LENGTHS, np.int32),
                                 plan=plan)
  out = [(_np(logits), _positions(cache), _np(cache.lengths))]
  for s in range(steps):
    logits, cache = engine.decode_step(CFG, sharded, jnp.asarray(feed[s]), cache, plan=plan)
    out.append((_np(logits), _positions(cache), _np(cache.lengths)))
  return out


@pytest.mark.parametrize("spec, steps", [(SINKS2["snapkv"], 0), (DECODE_SPECS["h2o"], 6)])
def test_sharded_eviction_equals_unsharded(spec, steps):
  want = decode_evict("h2o")[0] if "decode=evict" in spec else [one_pass(spec)]
  got = _sharded_run(spec, steps)
  for s, (logits, pos, lengths) in enumerate(got):
    np.testing.assert_array_equal(lengths, want[s]["lengths"])
    assert kept_sets(pos, lengths) == kept_sets(want[s]["pos"], want[s]["lengths"]), s
    np.testing.assert_allclose(logits, want[s]["logits"], rtol=1e-5, atol=1e-5)


def test_seq_meshes_are_refused():
  from lctx import sharding
  params = model()[0]
  plan = sharding.Plan(CFG, sharding.make_mesh("seq:2"))
  with pytest.raises(ValueError, match=r"seq.*allowed: data and model axes"):
    engine.new_cache(CFG, params, 2, 24, plan=plan, kv_compression="snapkv:ratio=0.5")
  with pytest.raises(ValueError, match=r"seq"):
    lctx.generate(CFG, params, model()[1], max_new_tokens=2, plan=plan,
                  kv_compression="h2o:ratio=0.5,decode=evict")


def test_readme_bytes_table_matches_the_code():
  """The README's yi-34b table at 1M tokens: every row's kept slots, GB per
  user and ratio to the dense cache are what lctx.cost.metrics computes."""
  from pathlib import Path
  from lctx.cost import analytic
  text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = text.split("### KV-cache compression: token eviction")[1].split("\n### ")[0]
  rows = [cells for cells in (line.split("|")[1:-1] for line in section.splitlines()
                              if line.startswith("| `"))
          if cells[1].strip().replace(",", "").isdigit()]
  assert len(rows) >= 10
  yi = lctx.ModelConfig.from_preset("yi-34b")
  T = 1 << 20
  dense = analytic.kv_bytes_per_user(yi, T, "bfloat16")
  for cells in rows:
    spec = cells[0].strip().strip("`")
    spec = "" if spec == "dense" else spec
    per_token = metrics.kv_token_bytes(yi, spec, T, "bfloat16")
    total = dense if per_token is None else per_token * T
    assert cells[1].strip() == f"{metrics.cache_slots(yi, spec, T):,}", spec
    assert cells[2].strip() == f"{total / 1e9:.2f}", spec
    assert cells[3].strip() == f"{total / dense:.4f}", spec


@pytest.mark.parametrize("method", ["tova", "h2o", "keyformer"])
def test_decode_evict_on_a_model_axis_wider_than_the_kv_heads(method):
  """model:8 over 2 KV heads: each KV head on 4 devices, each holding a
  quarter of its query heads. Group sums (H2O, Keyformer) and TOVA's
  all-head mean must run across them, else the replicas evict different
  slots: the tokens equal the unsharded run's."""
  params, tokens, _ = model()
  spec = f"{method}:ratio=0.5,decode=evict"
  want = lctx.generate(CFG, params, tokens, lengths=LENGTHS, max_new_tokens=8,
                       kv_compression=spec)
  plan = lctx.sharding.Plan(CFG, lctx.sharding.make_mesh("model:8"))
  got = lctx.generate(CFG, params, tokens, lengths=LENGTHS, max_new_tokens=8,
                      kv_compression=spec, plan=plan)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_streaming_llm_positions_cache_keeps_original_positions():
  """positions=cache re-rotates kept keys to their slots; kept_positions
  still reports the original positions (the same as positions=original) and
  decoding continues at RoPE position n_kept."""
  params, tokens, _ = model()
  a = lctx.kept_positions(CFG, params, tokens, kv_compression="streaming_llm:ratio=0.5",
                          lengths=LENGTHS)
  b = lctx.kept_positions(CFG, params, tokens,
                          kv_compression="streaming_llm:ratio=0.5,positions=cache",
                          lengths=LENGTHS)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cache = engine.new_cache(CFG, params, 2, 32,
                           kv_compression="streaming_llm:ratio=0.5,positions=cache")
  _, cache = engine.prefill(CFG, params, tokens, cache, lengths=np.array(LENGTHS))
  kept = [_kvpress_n_kept(n, 0.5) for n in LENGTHS]
  np.testing.assert_array_equal(np.asarray(cache.positions), kept)
  np.testing.assert_array_equal(np.asarray(cache.evict.next_pos), LENGTHS)


def test_sinks_above_an_explicit_budget_is_an_error():
  with pytest.raises(ValueError, match=r"'sinks' = 10 exceeds 'budget' = 4.*sinks <= budget"):
    spec_lib.parse("snapkv:budget=4,sinks=10")
  with pytest.raises(ValueError, match=r"'recent' = 1.5.*\[0, 1\]"):
    spec_lib.parse("h2o:recent=1.5")
  spec_lib.parse("h2o:recent=1")  # the whole budget recent: allowed
