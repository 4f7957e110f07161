"""Run a compression policy on quality tasks: accuracy, answer recall, KL, top-1.

Protocol (kvpress's, design: COMPRESSION.md "Quality, measured on CPU"):
  agnostic (default)  the context alone is prefilled, and compressed, with
      the policy under test; then the question and the answer are fed token
      by token (lctx's decode step: they attend the compressed cache and are
      appended, never evicted), so the compression cannot see the question.
  aware               the context and the question are prefilled together,
      so query-aware scorers (SnapKV's window, TOVA's last query) see it;
      the answer is then fed.
The answer tokens are teacher-forced and scored by their argmax: an answer is
right when every one of its tokens is the argmax given the tokens before it,
which is exactly when greedy decoding would write it (the first wrong token
is where greedy decoding would leave the answer), in one pass over the
answer instead of a decode loop per method.

Per example (`Outcome`): which answers were right, the log-probabilities at
the scored positions (for KL against the uncompressed run, `compare`), and
answer recall: the fraction of (layer, KV head, answer position) triples the
compressed cache kept (`Example.spans`), read from the cache's stored
original positions (lctx.cache.dense.EvictState.pos) right after the prefill.

Work shared across methods (`run`): examples that share their shapes and
answer spans run as one batch; the uncompressed run of a batch is made once
and every method's KL and top-1 agreement are taken against it; and one
uncompressed prefill that keeps every layer's q, k, v serves every eviction
policy of the batch (transformer.prefill_capture / evict_from_capture: in the
one-pass protocol a layer's hidden states do not depend on what the layers
below keep, so the eviction of layer l needs only its own q, k, v). Each
eviction policy then costs its selection and the fed tokens' decode steps,
not a prefill. Quantization-only policies run their own prefill (they store
the prompt in their format). `shared=False` runs every policy through
lctx.engine.prefill instead (tests compare the two).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lctx import engine
from lctx.cache import spec as spec_lib
from lctx.cache.evict.oracle import format_spans
from lctx.config import ModelConfig
from lctx.model import transformer
from lctx.quality.tasks import Example

PROTOCOLS = ("agnostic", "aware")
ORACLES = ("oracle", "anti_oracle")


@dataclasses.dataclass(frozen=True)
class Outcome:
  """One example under one policy.

  right: bool [n_answers], whether each answer's tokens were all the argmax.
  recall: fraction in [0, 1] of (layer, KV head, span position) kept; None
    for a cache that does not evict or an example without spans.
  kl: KL(uncompressed || this) in nats, mean over the scored tokens.
  top1: fraction of the scored tokens whose argmax equals the uncompressed one.
  """
  right: tuple[bool, ...]
  recall: float | None
  kl: float
  top1: float

  @property
  def accuracy(self) -> float:
    return float(np.mean(self.right))


def check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")


def example_spec(spec: str, ex: Example) -> str:
  """The spec one example runs: an oracle's gets the example's answer spans
  (its `spans` knob); every other spec is returned canonical and unchanged."""
  parsed = spec_lib.parse(spec)
  policy = parsed.of_kind("eviction")
  if policy is None or policy.name not in ORACLES:
    return str(parsed)
  if policy["spans"]:
    raise ValueError(f"spec {spec!r}: the harness sets the oracle's spans from each example; "
                     f"allowed: {policy.name} without spans=")
  if not ex.spans:
    raise ValueError(f"{policy.name} needs answer spans; task {ex.task!r} has none")
  with_spans = spec_lib.Policy(policy.name, tuple(
      (k, v) for k, v in policy.params if k != "spans") + (("spans", format_spans(ex.spans)),))
  return str(spec_lib.CompressionSpec(tuple(
      with_spans if p is policy else p for p in parsed.policies)))


def _groups(examples: list[Example], protocol: str, batch: int, max_tokens: int):
  """Lists of example indices that run as one batch: the same context and
  continuation lengths and (aware) question length; at most `batch` rows and
  `max_tokens` prompt tokens (the captured q, k, v grow with both)."""
  groups: dict[tuple, list[int]] = {}
  for i, ex in enumerate(examples):
    key = (len(ex.context), len(ex.continuation), ex.first_answer if protocol == "aware" else 0)
    groups.setdefault(key, []).append(i)
  for (T, _, q), idx in groups.items():
    size = max(1, min(batch, max_tokens // (T + q)))
    for s in range(0, len(idx), size):
      yield idx[s:s + size]


def _by_spec(spec: str, rows: list[Example]) -> dict[str, list[int]]:
  """The batch's rows by the spec they run (oracles: one per answer spans)."""
  out: dict[str, list[int]] = {}
  for b, ex in enumerate(rows):
    out.setdefault(example_spec(spec, ex), []).append(b)
  return out


def _log_softmax(logits):
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def _feed(config: ModelConfig, params, tokens: jax.Array, cache):
  """Decode steps over tokens [B, Q] (teacher-forced): log-probabilities
  [B, Q, V] float32 after each token."""
  def step(cache, token):
    logits, cache = transformer.decode(config, params, token, cache)
    return cache, _log_softmax(logits)
  _, logp = jax.lax.scan(step, cache, tokens.T)
  return jnp.moveaxis(logp, 0, 1)


_capture = jax.jit(transformer.prefill_capture, static_argnames=("config",))
_evict = jax.jit(transformer.evict_from_capture, static_argnames=("config",))
# What an evicting cache decodes with once its prompt is compressed: with
# decode=append a decode step only appends (the method is not consulted and
# its score accumulators are never read again), so every method's cache
# decodes as this one and the decode loop compiles once per format and shape.
_APPEND = spec_lib.Policy("random")


def _for_decoding(cache):
  if not cache.evicting or dict(cache.evict.policy.params).get("decode") == "evict" or (
      dict(cache.evict.policy.params).get("positions") == "cache"):
    return cache
  return cache.replace(evict=cache.evict.replace(acc=None, policy=_APPEND))


def _recall(cache, rows: list[Example]) -> list[float | None]:
  """Per row: the fraction of (layer, KV head, span position) the cache kept."""
  if not cache.evicting:
    return [None] * len(rows)
  pos = cache.evict.pos
  pos = np.asarray(jnp.stack(pos) if isinstance(pos, (tuple, list)) else pos)[:, :, :, 0, :]
  lengths = np.asarray(cache.lengths)
  out = []
  for b, ex in enumerate(rows):
    if not ex.spans:
      out.append(None)
      continue
    need = np.concatenate([np.arange(s, e) for s, e in ex.spans])
    kept = pos[:, b, :, :lengths[b]]  # [L, K, n]
    out.append(float((kept[..., None] == need).any(axis=2).mean()))
  return out


def _evicts(spec: str) -> bool:
  return spec_lib.parse(spec).of_kind("eviction") is not None


def run(config: ModelConfig, params, examples: list[Example], specs, *,
        protocol: str = "agnostic", batch: int = 8, max_tokens: int = 32768,
        shared: bool = True, progress=None) -> dict[str, list[Outcome]]:
  """Every example under every compression spec (lctx.cache.spec; "" is
  uncompressed, always run: the others are compared with it).

  config, params: an lctx model (lctx.load_gguf_checkpoint, or
  lctx.quality.train.load_tiny). protocol: "agnostic" or "aware" (module
  docstring). batch, max_tokens: rows and prompt tokens per prefill at most.
  shared: eviction policies from one captured prefill per batch (module
  docstring). progress: called with the number of (spec, example) pairs done
  after each batch. Returns {canonical spec: [Outcome per example, in
  order]}. ValueError for a bad protocol or spec, before compiling.
  """
  check_protocol(protocol)
  specs = list(dict.fromkeys([""] + [str(spec_lib.parse(s)) for s in specs]))
  for s in specs:
    engine.check_compression(config, s)  # a spec that does not fit the model
    for ex in examples:
      example_spec(s, ex)  # oracle / spans errors before anything compiles
  for ex in examples:  # engine's check: an id past the vocabulary would be clamped
    engine._check_vocab(config, np.asarray(ex.context + ex.continuation),
                        f"{ex.task} example (seed {ex.seed})")
  out = {s: [None] * len(examples) for s in specs}
  for idx in _groups(examples, protocol, batch, max_tokens):
    rows = [examples[i] for i in idx]
    start = rows[0].first_answer if protocol == "aware" else 0
    prompt = np.array([r.context + r.continuation[:start] for r in rows], np.int32)
    fed = np.array([r.continuation[start:] for r in rows], np.int32)  # [B, Q]
    batch_run = _Batch(config, params, rows, prompt, fed, shared)
    for s in specs:
      for ex_spec, sub in _by_spec(s, rows).items():
        logp, recall = batch_run.logp(ex_spec, sub)
        for j, b in enumerate(sub):
          out[s][idx[b]] = _outcome(rows[b], start, fed[b], logp[j], batch_run.base[b], recall[j])
    if progress is not None:
      progress(len(idx) * len(specs))
  return out


class _Batch:
  """One batch of examples: prompts [B, T] and fed tokens [B, Q], its
  uncompressed log-probabilities (`base`), the captured prefill (made on
  first use) and `logp(spec, rows)` for a spec on some of its rows."""

  def __init__(self, config, params, examples: list[Example], prompt: np.ndarray,
               fed: np.ndarray, shared: bool):
    self.config, self.params, self.examples = config, params, examples
    self.prompt, self.fed, self.shared = prompt, fed, shared
    self.captured = None
    self.base = self.logp("", list(range(len(prompt))))[0]

  def logp(self, spec: str, rows: list[int]) -> tuple[np.ndarray, list[float | None]]:
    """(log-probabilities [len(rows), Q, V] float32, position j predicting
    fed[:, j]; answer recall per row)."""
    config, params = self.config, self.params
    prompt, fed = self.prompt[rows], self.fed[rows]
    (B, T), Q = prompt.shape, fed.shape[1]
    if self.shared and _evicts(spec):
      if self.captured is None:
        lengths = jnp.full((len(self.prompt),), T, jnp.int32)
        self.captured = _capture(config, params, jnp.asarray(self.prompt), lengths)
      logits, captured = self.captured
      if B < len(self.prompt):
        take = np.asarray(rows)
        logits = logits[take]
        captured = jax.tree.map(lambda a: a[:, take], captured)
      quant = spec_lib.parse(spec).quantization
      capacity = engine.generate_capacity(config, str(quant or ""), T, Q)
      cache = engine.new_cache(config, params, B, capacity, kv_compression=spec)
      cache = _evict(config, captured, jnp.full((B,), T, jnp.int32), cache)
    else:
      capacity = engine.generate_capacity(config, spec, T, Q)
      cache = engine.new_cache(config, params, B, capacity, kv_compression=spec)
      logits, cache = engine.prefill(config, params, jnp.asarray(prompt), cache)
    recall = _recall(cache, [self.examples[b] for b in rows])
    logp = _log_softmax(logits)[:, None]
    if Q > 1:
      logp = jnp.concatenate([logp, _feed(config, params, jnp.asarray(fed[:, :-1]),
                                          _for_decoding(cache))], axis=1)
    return np.asarray(logp), recall


def _outcome(ex: Example, start: int, fed: np.ndarray, logp: np.ndarray, base: np.ndarray,
             recall: float | None) -> Outcome:
  """One example's Outcome from its log-probabilities [Q, V] and the
  uncompressed ones; fed[j] is the token position j predicts."""
  scored = [j - start for a in ex.answers for j in a]
  top1 = logp.argmax(-1)
  right = tuple(bool(all(top1[j - start] == fed[j - start] for j in a)) for a in ex.answers)
  lp, lb = logp[scored], base[scored]
  kl = float((np.exp(lb) * (lb - lp)).sum(-1).mean())
  return Outcome(right, recall, kl, float((top1[scored] == lb.argmax(-1)).mean()))
