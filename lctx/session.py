"""Several users sharing one device by context switches: each user's cache
goes to host memory while another decodes (lctx.cache.offload.swap).

generate_swapping runs the users round-robin, `swap_every` tokens at a time,
with one user's cache on the device at a time; each user's tokens equal what
lctx.generate gives it alone (same key schedule, same EOS rule), since a swap
moves its cache bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lctx import engine
from lctx.cache import offload
from lctx.cache import spec as spec_lib
from lctx.config import ModelConfig
from lctx.model.params import Params
from lctx.sampling import SamplingConfig, sample


def generate_swapping(config: ModelConfig, params: Params, prompts, *, max_new_tokens: int,
                      swap_every: int, lengths=None, sampling: SamplingConfig = SamplingConfig(),
                      key=None, capacity: int | None = None, plan=None, eos_token_id=None,
                      pad_token_id: int | None = None, prefill_chunk: int | None = None,
                      kv_compression=None) -> tuple[list[np.ndarray], int]:
  """Generates for every user in `prompts` (a list of [B, T_u] int arrays,
  each user a batch of rows; lengths: a list of [B] or None), swap_every
  tokens per turn; at each turn's end the user's cache goes to pinned host
  memory and the next user's comes back (one swap program).

  Each user's tokens are those lctx.generate returns for its prompt with the
  same arguments (key: every user starts from the same key, as its own
  generate call would). Returns ([B, max_new_tokens] int32 per user, the
  number of swaps). ValueError for swap_every < 1 or anything generate refuses.
  """
  if not isinstance(swap_every, (int, np.integer)) or isinstance(swap_every, bool) \
      or swap_every < 1:
    raise ValueError(f"swap_every must be a positive integer (tokens per turn), got "
                     f"{swap_every!r}")
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not prompts:
    raise ValueError("prompts: at least one user's [B, T] prompt")
  lengths = list(lengths) if lengths is not None else [None] * len(prompts)
  if len(lengths) != len(prompts):
    raise ValueError(f"lengths: one entry per user ({len(prompts)}), got {len(lengths)}")
  eos = engine._stop_ids(config, eos_token_id, pad_token_id)
  if key is None:
    if not sampling.greedy:
      raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (key=...)")
    key = jax.random.key(0)
  if plan is not None:
    params = engine.shard_params(params, plan)

  users = []
  for tokens, lens in zip(prompts, lengths):
    tokens, lens = engine._check_tokens(config, tokens, lens)
    T = tokens.shape[1]
    cap = engine.generate_capacity(config, str(spec_lib.parse(kv_compression)), T,
                                   int(max_new_tokens), capacity)
    cache = engine.new_cache(config, params, tokens.shape[0], cap, plan=plan,
                             kv_compression=kv_compression)
    logits, cache = engine.prefill(config, params, tokens, cache, lens, plan=plan,
                                   chunk=prefill_chunk)
    k, sub = jax.random.split(key)
    first = sample(logits, sub, sampling)
    done = _is_eos(first, eos)
    out = np.full((tokens.shape[0], max_new_tokens), 0 if eos is None else eos[1], np.int32)
    out[:, 0] = np.asarray(first)
    users.append({"cache": cache, "key": k, "token": first, "done": done, "out": out, "i": 1})
    if len(users) > 1:  # every user but the one decoding waits in host memory
      users[-1]["cache"] = offload.to_host(cache, plan)

  swaps, turn = 0, 0
  active = lambda u: u["i"] < max_new_tokens and not (eos is not None and bool(jnp.all(u["done"])))
  while any(active(u) for u in users):
    u = users[turn]
    for _ in range(swap_every):
      if not active(u):
        break
      logits, u["cache"] = engine.decode_step(config, params, u["token"], u["cache"], plan=plan)
      u["key"], sub = jax.random.split(u["key"])
      nxt = sample(logits, sub, sampling)
      if eos is not None:
        nxt = jnp.where(u["done"], eos[1], nxt)
        u["done"] = u["done"] | _is_eos(nxt, eos)
      u["out"][:, u["i"]] = np.asarray(nxt)
      u["token"], u["i"] = nxt, u["i"] + 1
    nxt_turn = next(((turn + j) % len(users) for j in range(1, len(users) + 1)
                     if active(users[(turn + j) % len(users)])), None)
    if nxt_turn is None:
      break
    if nxt_turn != turn:  # context switch: this user's cache out, the next one's in
      u["cache"], users[nxt_turn]["cache"] = offload.swap(u["cache"], users[nxt_turn]["cache"],
                                                          plan)
      swaps += 1
    turn = nxt_turn
  return [u["out"] for u in users], swaps


def _is_eos(tokens, eos):
  if eos is None:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos[0], jnp.int32))
