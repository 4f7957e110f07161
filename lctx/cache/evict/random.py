"""Random eviction (kvpress RandomPress): a seeded uniform score per
(layer, KV head, original position), from a counter-based hash
(base.hash_uniform), so a chunked prefill keeps what a one-pass one keeps.
A baseline every eviction study should include."""

from __future__ import annotations

import jax.numpy as jnp

from lctx.cache.evict.base import Method, common_knobs, hash_uniform
from lctx.cache.spec import Knob


class Random(Method):
  name = "random"
  doc = "uniformly random tokens, seeded (kvpress RandomPress; a baseline)"
  knobs = {**common_knobs(), "seed": Knob(int, 0, "the random seed", low=0)}

  def score(self, policy, c):
    K = c.pos.shape[1]
    heads = jnp.arange(K)[None, :, None]
    return hash_uniform(policy["seed"], c.layer, heads, c.pos), None
