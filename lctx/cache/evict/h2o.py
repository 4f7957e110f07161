"""H2O, heavy-hitter oracle (Zhang et al. 2023, arXiv 2306.14048): keep the
keys with the largest attention accumulated over all queries so far (not
normalised) plus a recent window. Per KV head; with GQA the group's query
heads are averaged.

Defaults from the paper: 20% kept (ratio 0.8), half of it recent
(recent=0.5: heavy hitters 10% + recent 10%). Accumulated over the prompt's
queries at prefill (a second pass over the attention probabilities, counted
in the prefill's FLOPs), over the chunks of a chunked prefill, and, with
decode=evict, over every generated token: each step adds its query's
attention and evicts the lowest heavy hitter.
"""

from __future__ import annotations

from lctx.cache.evict.base import DECODE_KNOB, Method, common_knobs, recent_window
from lctx.cache.spec import Knob


class H2O(Method):
  name = "h2o"
  doc = ("heavy hitters (accumulated attention) + a recent window (H2O, Zhang et al. 2023, "
         "arXiv 2306.14048)")
  knobs = {
      **common_knobs(ratio=0.8),
      "recent": Knob(float, 0.5, "fraction of the kept tokens that are the most recent, "
                     "in [0, 1]", low=0.0),
      "decode": DECODE_KNOB,
  }
  accumulates = True
  decode = True

  def score(self, policy, c):
    acc = c.acc + c.column_sums() / c.group
    return acc, acc

  def protected(self, policy, c):
    return recent_window(policy, c)
