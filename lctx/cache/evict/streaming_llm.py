"""StreamingLLM (Xiao et al. 2024, arXiv 2309.17453; kvpress StreamingLLMPress):
keep the first `sinks` tokens (attention sinks) and the most recent ones.

Score: the original position (newer is better), the sinks protected; the
same for every layer and KV head. kvpress scores sinks and the recent window
1 and the rest 0; the kept set is the same. positions=original (kvpress's
default): kept keys keep the rotation of their original position;
positions=cache (the paper's): after eviction every kept key is re-rotated to
its slot, so the sinks sit right before the recent window and new tokens
continue from the number kept.
"""

from __future__ import annotations

import jax.numpy as jnp

from lctx.cache.evict.base import DECODE_KNOB, Method, common_knobs
from lctx.cache.spec import Knob


class StreamingLLM(Method):
  name = "streaming_llm"
  doc = ("attention sinks + the most recent tokens (StreamingLLM, Xiao et al. 2024, "
         "arXiv 2309.17453; kvpress StreamingLLMPress)")
  knobs = {
      **common_knobs(sinks=4),
      "positions": Knob(str, "original", "original: kept keys keep their original RoPE "
                        "position (kvpress); cache: re-rotated to their slot (the paper)",
                        choices=("original", "cache")),
      "decode": DECODE_KNOB,
  }
  per_layer = True
  decode = True

  def validate(self, policy):
    super().validate(policy)
    if policy["positions"] == "cache" and policy["decode"] == "evict":
      raise ValueError("policy 'streaming_llm': positions=cache re-rotates the kept keys once, "
                       "after the prefill; with decode=evict it would have to re-rotate them "
                       "every step; allowed: positions=cache with decode=append, or "
                       "positions=original")

  def score(self, policy, c):
    return c.pos[:, 0].astype(jnp.float32), None
