"""SnapKV (Li et al. 2024, arXiv 2404.14469; kvpress SnapKVPress): the
attention of the last `window` queries (the observation window) over the
keys before it, averaged over the window, smoothed by a 1-D average pooling
of width `kernel`, averaged over each GQA group; the window itself is kept.

As kvpress 0.5.5: the softmax runs over all causal keys (the window's
included), the window's columns are then dropped without renormalising; the
pooling is per query head with zero padding counted in the divisor
(avg_pool1d, count_include_pad); default window 64 (the paper's is 32:
window=32). In a chunked prefill the window is the chunk's last queries and
the keys are the cache's kept ones followed by the chunk's, pooled in that
order (by original position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lctx.cache.evict.base import Method, common_knobs, last_rows
from lctx.cache.spec import Knob


class SnapKV(Method):
  name = "snapkv"
  doc = ("attention of an observation window of recent queries, pooled (SnapKV, Li et al. "
         "2024, arXiv 2404.14469; kvpress SnapKVPress)")
  knobs = {
      **common_knobs(),
      "window": Knob(int, 64, "observation window: the last queries that score the keys, "
                     "kept themselves (kvpress 64; the paper 32)", low=1),
      "kernel": Knob(int, 5, "width of the average pooling of the scores (odd)", low=1),
  }

  def validate(self, policy):
    super().validate(policy)
    if policy["kernel"] % 2 == 0:
      raise ValueError(f"policy 'snapkv': key 'kernel' = {policy['kernel']} must be odd "
                       f"(centred pooling); allowed: 1, 3, 5, 7, ...")

  def _window_start(self, policy, c):
    _, pos, valid = last_rows(c, policy["window"])
    return jnp.where(valid, pos, jnp.iinfo(jnp.int32).max).min(axis=1)  # [B]

  def score(self, policy, c):
    W, kernel = policy["window"], policy["kernel"]
    q, pos, valid = last_rows(c, W)
    p = c.softmax(q, pos, valid)  # [B, K, G, W, S]
    before = c.pos < self._window_start(policy, c)[:, None, None]  # the window's columns dropped
    p = jnp.where(before[:, :, None, None, :], p, 0.0)
    n = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.float32)[:, None, None, None]
    mean = p.sum(axis=3) / n  # [B, K, G, S]
    pooled = jax.lax.reduce_window(mean, 0.0, jax.lax.add, (1, 1, 1, kernel), (1, 1, 1, 1),
                                   [(0, 0), (0, 0), (0, 0), (kernel // 2, kernel // 2)]) / kernel
    return pooled.mean(axis=2), None

  def protected(self, policy, c):
    return c.pos >= self._window_start(policy, c)[:, None, None]
