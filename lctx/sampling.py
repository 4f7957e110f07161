"""Next-token selection: greedy, or temperature / top-k / top-p sampling.

Truncation is by rank, with ties broken by token index (lower index first, as
greedy argmax does): top-k keeps exactly k tokens, top-p the smallest prefix
of the sorted distribution whose mass reaches top_p. (transformers'
TopKLogitsWarper keeps every token tied with the k-th, and TopPLogitsWarper
breaks ties at the cutoff towards the higher index; without ties at the
cutoff the kept sets are the same.)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0, got "
                       f"{self.temperature}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"SamplingConfig.top_k must be an integer >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _candidates(logits: jax.Array, config: SamplingConfig):
  """(values [B, C], ids [B, C] or None): the tempered logits of the tokens that
  may be drawn, best first (ties: lower id first), -inf where truncated away;
  ids None when nothing is truncated (then values are all V logits in order)."""
  logits = logits.astype(jnp.float32) / config.temperature
  V = logits.shape[-1]
  top_k = config.top_k if 0 < config.top_k < V else 0
  if not top_k and config.top_p >= 1:
    return logits, None
  if top_k:  # lax.top_k: sorted descending, equal values in increasing index order
    values, ids = jax.lax.top_k(logits, top_k)
  else:  # a stable sort of the negated logits: descending, ties by increasing index
    ids = jnp.argsort(-logits, axis=-1, stable=True)
    values = jnp.take_along_axis(logits, ids, axis=-1)
  if config.top_p < 1:
    # The smallest prefix whose mass reaches top_p: a token stays while the
    # mass strictly before it (an exclusive cumulative sum) is below top_p.
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.concatenate(
        [jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    values = jnp.where(mass_before < config.top_p, values, -jnp.inf)
  return values, ids.astype(jnp.int32)


def truncate(logits_bv: jax.Array, config: SamplingConfig) -> jax.Array:
  """The tempered logits [B, V] (fp32) that `sample` draws from: -inf outside
  the top-k / top-p set."""
  values, ids = _candidates(logits_bv, config)
  if ids is None:
    return values
  rows = jnp.arange(values.shape[0])[:, None]
  return jnp.full(logits_bv.shape, -jnp.inf, jnp.float32).at[rows, ids].set(values)


def sample(logits_bv: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
  """Tokens [B] int32 from logits [B, V]."""
  if config.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  values, ids = _candidates(logits_bv, config)
  drawn = jax.random.categorical(key, values, axis=-1).astype(jnp.int32)
  if ids is None:
    return drawn
  return jnp.take_along_axis(ids, drawn[:, None], axis=-1)[:, 0]
