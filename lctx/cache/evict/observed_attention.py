"""ObservedAttention (kvpress ObservedAttentionPress, H2O-like): the
attention each key received from every query of the prompt, summed, divided
by the number of queries that can see it (T - t), averaged over each GQA
group. Nothing protected beyond `sinks`.

In a chunked prefill the sums accumulate over the chunks (the cache keeps
them with the kept tokens) and the divisor is the queries seen so far:
queries whose key was evicted before they came are not counted, an
approximation of the whole prompt's sums.
"""

from __future__ import annotations

import jax.numpy as jnp

from lctx.cache.evict.base import Method, common_knobs


class ObservedAttention(Method):
  name = "observed_attention"
  doc = ("attention received from the whole prompt, per query seen (kvpress "
         "ObservedAttentionPress, after H2O)")
  knobs = common_knobs()
  accumulates = True

  def score(self, policy, c):
    acc = c.acc + c.column_sums()
    seen = jnp.maximum(c.next_pos[:, None, None] - c.pos, 1).astype(jnp.float32)
    return acc / c.group / seen, acc
