"""Knorm (Devoto et al. 2024, arXiv 2406.11430; kvpress KnormPress): keys with
a small L2 norm draw more attention, so the score is minus the key's norm
(post-RoPE, as cached; RoPE preserves norms). Per KV head; nothing protected
beyond `sinks` (0 by default, as kvpress)."""

from __future__ import annotations

import jax.numpy as jnp

from lctx.cache.evict.base import Method, common_knobs


class Knorm(Method):
  name = "knorm"
  doc = "drop the keys with the largest L2 norm (Devoto et al. 2024, arXiv 2406.11430; kvpress KnormPress)"
  knobs = common_knobs()

  def score(self, policy, c):
    k = c.k.astype(jnp.float32)
    return -jnp.sqrt(jnp.sum(k * k, axis=2)), None
