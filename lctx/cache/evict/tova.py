"""TOVA (Oren et al. 2024, arXiv 2401.06104; kvpress TOVAPress): the last
query's attention, averaged over all query heads, scores every key; the
layer's KV heads keep the same tokens.

kvpress: the last token's key is in the softmax, its column is then dropped
and the token is always kept; so here it is protected. During decoding
(decode=evict) the new token's attention scores the cache and the new token,
and the lowest goes: one in, one out at the budget (the newest token is
protected, as kvpress protects the last one).
"""

from __future__ import annotations

from lctx.cache.evict.base import DECODE_KNOB, Method, common_knobs, last_rows


class TOVA(Method):
  name = "tova"
  doc = ("the last query's attention averaged over all heads (TOVA, Oren et al. 2024, "
         "arXiv 2401.06104; kvpress TOVAPress)")
  knobs = {**common_knobs(), "decode": DECODE_KNOB}
  per_layer = True
  decode = True

  def score(self, policy, c):
    if c.logits is not None:  # a decode step: its one query
      p = c.softmax(None, c.q_pos, c.q_valid)
    else:
      q, pos, valid = last_rows(c, 1)
      p = c.softmax(q, pos, valid)
    return c.mean_over_heads(p.mean(axis=3)), None  # [B, S]: all N query heads

  def protected(self, policy, c):
    return c.pos == (c.next_pos - 1)[:, None, None]
