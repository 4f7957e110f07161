"""Oracle and anti-oracle: eviction that knows where the answer is.

Quality baselines for the harness (lctx.quality), not serving methods:
`oracle` keeps the context positions in `spans` and the first `sinks` (both
protected) and fills the rest of the budget with the most recent tokens;
`anti_oracle` drops those positions first (even among the sinks) and keeps
the sinks and the most recent of the rest. Together they bound a task from
both sides (design: COMPRESSION.md, "Quality, measured on CPU"): a method
can do no better than the oracle at the same ratio, and a task on which the
anti-oracle still answers does not test retrieval.

sinks defaults to 0 (the issue's oracle: the answer plus the most recent).
What else SmolLM2-135M needs is prompt-specific (greedy, 512 tokens, depths
0-1, 2 examples each): with 4 sinks (StreamingLLM's) the oracle at ratio
0.5 answers needle_single 9 of 10 (the uncompressed score) instead of 7 and
needle_multikey 6 of 10 (uncompressed) instead of 0, but the passkey 2 of 8
instead of 8 of 8 (depths 0-0.75). The harness reports the sinks-free
oracle; a budget that keeps every answer token is no guarantee of the answer.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from lctx.cache.evict.base import Method, common_knobs
from lctx.cache.spec import Knob

# Below every real candidate's score (positions >= 0), above EMPTY (base).
_DROPPED = -1.0e30
_SPANS = re.compile(r"\d+-\d+(/\d+-\d+)*")


def parse_spans(text: str) -> tuple[tuple[int, int], ...]:
  """The [start, end) spans of a `spans` knob; ValueError naming the format."""
  if not text:
    return ()
  if not _SPANS.fullmatch(text):
    raise ValueError(f"key 'spans' = {text!r} is not allowed; allowed: start-end pairs of "
                     f"positions joined by '/', e.g. '120-126/300-305'")
  spans = tuple(tuple(int(x) for x in s.split("-")) for s in text.split("/"))
  for s, e in spans:
    if e <= s:
      raise ValueError(f"key 'spans': span {s}-{e} is empty; allowed: start < end")
  return spans


def format_spans(spans) -> str:
  """The `spans` knob value of [start, end) pairs."""
  return "/".join(f"{int(s)}-{int(e)}" for s, e in spans)


def _in_spans(policy, pos):
  inside = jnp.zeros(pos.shape, bool)
  for s, e in parse_spans(policy["spans"]):
    inside = inside | ((pos >= s) & (pos < e))
  return inside


SPANS_KNOB = Knob(str, "", "[start, end) original positions of the answer, 'start-end' "
                  "joined by '/'")


class Oracle(Method):
  name = "oracle"
  doc = ("keeps the answer's positions (spans), the sinks and the most recent (quality "
         "upper baseline)")
  knobs = {**common_knobs(), "spans": SPANS_KNOB}
  per_layer = True

  def validate(self, policy):
    super().validate(policy)
    try:
      parse_spans(policy["spans"])
    except ValueError as e:
      raise ValueError(f"policy {self.name!r}: {e}") from None

  def score(self, policy, c):
    return c.pos[:, 0].astype(jnp.float32), None

  def protected(self, policy, c):
    return _in_spans(policy, c.pos)


class AntiOracle(Oracle):
  name = "anti_oracle"
  doc = ("drops the answer's positions (spans) first, keeps the sinks and the most recent "
         "(lower baseline)")

  def score(self, policy, c):
    pos = c.pos[:, 0]
    return jnp.where(_in_spans(policy, pos), _DROPPED, pos.astype(jnp.float32)), None

  def protected(self, policy, c):
    return None

  def dropped(self, policy, c):
    return _in_spans(policy, c.pos)
