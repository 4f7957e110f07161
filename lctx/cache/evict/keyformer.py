"""Keyformer (Adnan et al. 2024, arXiv 2403.09054): like H2O, keep a recent
window and the keys with the largest accumulated score, but score with a
Gumbel-softmax of the logits, softmax((z + g) / tau), g standard Gumbel
noise, tau = 1 + 0.01 * step (step: decode steps since the prefill, 0 during
it). Per KV head (mean over the GQA group).

Defaults from the paper: 60% of the prompt kept (ratio 0.4), 30% of it
recent. The noise is a counter-based hash of (seed, layer, query head, query
position, key position) (base.hash_uniform): fixed by `seed`, the same in a
chunked and a one-pass prefill.
"""

from __future__ import annotations

import jax.numpy as jnp

from lctx.cache.evict.base import DECODE_KNOB, Method, common_knobs, hash_uniform, recent_window
from lctx.cache.spec import Knob


def gumbel(seed: int, layer, heads, q_pos, k_pos) -> jnp.ndarray:
  """Standard Gumbel noise -log(-log(u)), float32, broadcast over the args."""
  u = hash_uniform(seed, layer, heads, q_pos, k_pos)
  return -jnp.log(-jnp.log(u))


class Keyformer(Method):
  name = "keyformer"
  doc = ("accumulated Gumbel-softmax score + a recent window (Keyformer, Adnan et al. 2024, "
         "arXiv 2403.09054)")
  knobs = {
      **common_knobs(ratio=0.4),
      "recent": Knob(float, 0.3, "fraction of the kept tokens that are the most recent, "
                     "in [0, 1]", low=0.0),
      "seed": Knob(int, 0, "seed of the Gumbel noise", low=0),
      "decode": DECODE_KNOB,
  }
  accumulates = True
  decode = True

  def score(self, policy, c):
    K, G = c.pos.shape[1], c.group
    tau = 1.0 + 0.01 * c.step.astype(jnp.float32)[:, None, None, None, None]

    def transform(z, q_pos, k_pos):  # z [B, K, G, T', S']; q_pos [B, T']; k_pos [B, K, S']
      heads = c.head_ids()[None, :, :, None, None]
      g = gumbel(policy["seed"], c.layer, heads, q_pos[:, None, None, :, None],
                 k_pos[:, :, None, None, :])
      return (z + g) / tau

    acc = c.acc + c.column_sums(transform) / G
    return acc, acc

  def protected(self, policy, c):
    return recent_window(policy, c)
