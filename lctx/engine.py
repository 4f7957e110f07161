"""Jitted prefill, decode step and generation over a donated, fixed-capacity cache.

Shapes and capacity are checked here, on the host, before anything compiles:
a prompt or a generation that does not fit the cache is a ValueError, never a
silent wrap. The cache argument is donated on every call, so XLA updates it in
place (tests check the compiled step's temporaries against the cache size).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cache import offload, spec as spec_lib
from lctx.cache.dense import KVCache, cache_format, check_evict_sharing, init_cache
from lctx.config import ModelConfig
from lctx.model import transformer
from lctx.model.params import STACKED, Params, abstract_params, num_stacked
from lctx.sampling import SamplingConfig, sample
from lctx.sharding import Plan

PREFILL_BLOCK = transformer.PREFILL_BLOCK

prefill_jit = jax.jit(transformer.prefill, static_argnames=("config", "block", "chunk"),
                      donate_argnames=("cache",))
decode_jit = jax.jit(transformer.decode, static_argnames=("config",), donate_argnames=("cache",))


def layers_stacked(params: Params) -> bool:
  return not isinstance(params["layers"], (tuple, list))


def new_cache(config: ModelConfig, params: Params, batch: int, capacity: int,
              plan: Plan | None = None, kv_compression=None) -> KVCache:
  """An empty cache in the layout (stacked or per layer) that matches the params;
  with a plan, created directly in its sharded layout. kv_compression: a
  compression spec (lctx.cache.spec: e.g. "int8", "kivi:bits=2"; None or "":
  dense), parsed and checked against the model (ValueError naming the
  policy, key and allowed values) before anything compiles."""
  stacked = layers_stacked(params)
  spec = str(spec_lib.parse(kv_compression))
  if plan is None:
    return init_cache(config, batch, capacity, stacked=stacked, kv_compression=spec)
  _check_plan(config, plan, batch=batch, capacity=capacity, compressed=spec)
  make = functools.partial(init_cache, config, batch, capacity, stacked, spec)
  return jax.jit(make, out_shardings=plan.cache_shardings(jax.eval_shape(make)))()


def shard_params(params: Params, plan: Plan) -> Params:
  """Places params on the plan's mesh (tensor-parallel over `model`, replicated
  over `data` and `seq`)."""
  return plan.put(params, plan.param_shardings(params))


def _check_plan(config: ModelConfig, plan: Plan, **dims) -> None:
  if plan.config != config:
    raise ValueError(f"the sharding plan was made for model {plan.config.name!r}, not "
                     f"{config.name!r}")
  plan.check(**dims)


_SHARDED_STEPS: dict = {}


def sharded_step(kind: str, plan: Plan, params: Params, cache: KVCache,
                 block: int = PREFILL_BLOCK, chunk: int | None = None):
  """The jitted prefill or decode step with explicit in/out shardings for `plan`.

  The cache keeps one sharding from prefill to decode (out = in, donated), so
  no step reshards it. Works with concrete or ShapeDtypeStruct arguments.
  """
  key = (kind, plan, jax.tree.structure(params), jax.tree.structure(cache), block, chunk)
  if key not in _SHARDED_STEPS:
    ps, cs = plan.param_shardings(params), plan.cache_shardings(cache)
    if kind == "prefill":
      fn = functools.partial(transformer.prefill, plan.config, block=block, plan=plan,
                             chunk=chunk)
      in_shardings = (ps, plan.tokens_sharding("prefill"), plan.batch_sharding(), cs)
    elif kind == "decode":
      fn = functools.partial(transformer.decode, plan.config, plan=plan)
      in_shardings = (ps, plan.tokens_sharding("decode"), cs)
    else:
      raise ValueError(f"step kind {kind!r} not allowed; allowed: ('prefill', 'decode')")
    _SHARDED_STEPS[key] = jax.jit(fn, in_shardings=in_shardings,
                                  out_shardings=(plan.logits_sharding(), cs),
                                  donate_argnums=(len(in_shardings) - 1,))
  return _SHARDED_STEPS[key]


def _check_vocab(config: ModelConfig, tokens, name: str) -> None:
  """Token ids outside [0, V) would be silently clamped by the embedding lookup
  (NaN logits past the end, another row's embedding below 0). Traced tokens
  (under an outer jit) cannot be checked here."""
  if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
    return
  xp = np if isinstance(tokens, np.ndarray) else jnp
  low, high = int(xp.min(tokens)), int(xp.max(tokens))
  if low < 0 or high >= config.vocab_size:
    raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the vocabulary "
                     f"[0, {config.vocab_size})")


def _as_token_array(tokens):
  """A jax array (or tracer) as is; anything else as a host numpy array, so ids
  are checked before a cast to int32 could wrap them (int64 on the host)."""
  if isinstance(tokens, jax.Array):
    return tokens
  try:
    return np.asarray(tokens)
  except ValueError as e:  # rows of different lengths
    raise ValueError(f"tokens must be a rectangular [B, T] array ({e}); right-pad shorter "
                     f"prompts and pass their lengths=") from e


def _check_token_ids(config: ModelConfig, tokens, ndim: int, what: str):
  """Integer token ids of rank `ndim` inside the vocabulary -> int32 jax array."""
  tokens = _as_token_array(tokens)
  if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array {what}, got "
                     f"{np.dtype(tokens.dtype).name}{tuple(tokens.shape)}")
  if ndim == 2 and tokens.shape[1] == 0:
    raise ValueError("tokens must hold at least one token per row (T >= 1)")
  _check_vocab(config, tokens, "tokens")
  return jnp.asarray(tokens, jnp.int32)


def _check_tokens(config: ModelConfig, tokens, lengths):
  tokens = _check_token_ids(config, tokens, 2, "[B, T]")
  B, T = tokens.shape
  if lengths is None:
    return tokens, jnp.full((B,), T, jnp.int32)
  lengths_np = np.asarray(lengths)
  if (lengths_np.shape != (B,) or not jnp.issubdtype(lengths_np.dtype, jnp.integer)
      or lengths_np.min() < 1 or lengths_np.max() > T):
    raise ValueError(f"lengths must be integers of shape ({B},) with values in [1, {T}], "
                     f"got {lengths_np}")
  return tokens, jnp.asarray(lengths_np, jnp.int32)


# ---- params against the config ---------------------------------------------------------

_PARAMS_OK: dict = {}  # (config, treedef) -> the leaf shapes that match it


def _expected_params(config: ModelConfig, unrolled: bool) -> Params:
  """abstract_params(config) (ShapeDtypeStructs), stacked or per-layer
  (layers, and kv_layers under cross-layer KV sharing)."""
  abstract = abstract_params(config)
  if unrolled:
    for key in STACKED:
      if key in abstract:
        one = {k: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for k, x in abstract[key].items()}
        abstract[key] = tuple(dict(one) for _ in range(num_stacked(config, key)))
  return abstract


def check_params(config: ModelConfig, params: Params) -> None:
  """Raises a one-line ValueError naming the first leaf of `params` whose
  presence or shape differs from lctx.abstract_params(config), in either
  layout (stacked, or the per-layer tuple of lctx.unstack_layers). Shapes only
  (dtypes may differ: they are cast where used), host side, cached per config
  and tree structure, so cheap enough for every step."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  shapes = tuple(tuple(np.shape(x)) for x in leaves)
  key = (config, treedef)
  if _PARAMS_OK.get(key) == shapes:
    return
  where = f"params do not match config {config.name!r}"
  if not isinstance(params, Mapping) or "layers" not in params:
    found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    want = ["embed", "final_norm", "layers"] + ([] if config.tie_word_embeddings else ["lm_head"])
    raise ValueError(f"{where}: expected a dict with keys {want}, got {found}")
  unrolled = isinstance(params["layers"], (tuple, list))
  for name, n, what in (("layers", config.num_layers, "num_layers"),
                        ("kv_layers", config.num_kv_layers, "num_kv_layers")):
    held = params.get(name)
    if unrolled and isinstance(held, (tuple, list)) and len(held) != n:
      raise ValueError(f"{where}: params[{name!r}] holds {len(held)} per-layer dicts, expected "
                       f"{what} = {n}")
    if name == "kv_layers" and held is not None and unrolled != isinstance(held, (tuple, list)):
      raise ValueError(f"{where}: params['layers'] and params['kv_layers'] must share a layout "
                       f"(both stacked, or both tuples of per-layer dicts: lctx.unstack_layers)")
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(_expected_params(config, unrolled))[0]}
  got = {jax.tree_util.keystr(p): tuple(np.shape(x))
         for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, shape in want.items():
    if name not in got:
      raise ValueError(f"{where}: params{name} is missing (expected shape {shape})")
    if got[name] != shape:
      raise ValueError(f"{where}: params{name} has shape {got[name]}, expected {shape}")
  for name, shape in got.items():
    if name not in want:
      tied = " (tie_word_embeddings=True)" if "lm_head" in name else ""
      raise ValueError(f"{where}: params{name} (shape {shape}) is not a parameter of this "
                       f"config{tied}")
  if len(_PARAMS_OK) > 256:
    _PARAMS_OK.clear()
  _PARAMS_OK[key] = shapes


def forward(config: ModelConfig, params: Params, tokens, block: int = PREFILL_BLOCK) -> jax.Array:
  """Teacher-forced logits [B, T, V] (fp32) for integer tokens [B, T].

  transformer.forward with its inputs checked first: token ids inside the
  vocabulary (when concrete, i.e. not traced under an outer jit), tokens an
  integer [B, T] array and params the shapes of the config (ValueError).
  """
  check_params(config, params)
  tokens = _check_token_ids(config, tokens, 2, "[B, T]")
  return transformer.forward(config, params, tokens, block)


def prefill(config: ModelConfig, params: Params, tokens, cache: KVCache, lengths=None,
            block: int = PREFILL_BLOCK, plan: Plan | None = None,
            chunk: int | None = None) -> tuple[jax.Array, KVCache]:
  """Prompts tokens [B, T], right-padded where lengths[b] < T. Donates `cache`.

  Returns (logits [B, V] of each row's last prompt token, filled cache). With a
  plan, runs sharded on its mesh (params from shard_params, cache from
  new_cache(..., plan=plan)). chunk: prefill C tokens at a time
  (transformer.prefill; None or 0: one pass). Raises ValueError for a bad
  chunk, before compiling.
  """
  check_params(config, params)
  tokens, lengths = _check_tokens(config, tokens, lengths)
  chunk = transformer.check_chunk(chunk, plan, tokens.shape[1])
  if tokens.shape[0] != cache.batch:
    raise ValueError(f"batch of tokens ({tokens.shape[0]}) != cache batch ({cache.batch})")
  offload.check_on_device(cache)
  needed = _prompt_slots(cache, tokens.shape[1])
  if needed > cache.capacity:
    what = ("prompt length" if not cache.evicting else
            f"{cache.evict.policy} keeps up to {needed} tokens of a prompt of length")
    raise ValueError(f"{what} {tokens.shape[1]}: more than the cache capacity "
                     f"{cache.capacity} (allowed: a capacity >= {needed})")
  if plan is not None:
    _check_plan(config, plan, batch=cache.batch, capacity=cache.capacity,
                compressed=_spec_of(cache), prompt_len=tokens.shape[1])
    return sharded_step("prefill", plan, params, cache, block, chunk)(params, tokens, lengths,
                                                                      cache)
  return prefill_jit(config, params, tokens, lengths, cache, block=block, chunk=chunk)


def decode_step(config: ModelConfig, params: Params, tokens, cache: KVCache,
                plan: Plan | None = None) -> tuple[jax.Array, KVCache]:
  """Appends one token per row (tokens [B]) and returns its logits [B, V]. Donates `cache`."""
  check_params(config, params)
  tokens = _as_token_array(tokens)
  if tokens.shape != (cache.batch,):
    raise ValueError(f"tokens must have shape ({cache.batch},) (one per cache row), "
                     f"got {tuple(tokens.shape)}")
  tokens = _check_token_ids(config, tokens, 1, f"[{cache.batch}]")
  offload.check_on_device(cache)
  if not isinstance(cache.lengths, jax.core.Tracer) and _appends(cache):
    fullest = int(jnp.max(cache.lengths))
    if fullest >= cache.capacity:
      raise ValueError(f"KV cache is full: a row holds {fullest} tokens and the capacity is "
                       f"{cache.capacity}; allocate a larger cache")
  if plan is not None:
    _check_plan(config, plan, batch=cache.batch, capacity=cache.capacity,
                compressed=_spec_of(cache))
    return sharded_step("decode", plan, params, cache)(params, tokens, cache)
  return decode_jit(config, params, tokens, cache)


def _spec_of(cache: KVCache) -> str | None:
  """The compression spec a cache runs (its eviction and format), None for dense."""
  parts = ([str(cache.evict.policy)] if cache.evicting else []) + (
      [cache.format.spec] if cache.compressed else [])
  return "+".join(parts) or None


def _prompt_slots(cache: KVCache, T: int) -> int:
  """Cache slots a prompt of T tokens fills: T, or what eviction keeps."""
  return _generate_slots(str(cache.evict.policy), T)[0] if cache.evicting else T


def _appends(cache: KVCache) -> bool:
  """Whether a decode step may need a free slot: not for a cache that evicts
  while decoding (it replaces a slot at its budget)."""
  return not (cache.evicting and dict(cache.evict.policy.params).get("decode") == "evict")


def kept_positions(config: ModelConfig, params: Params, tokens, *, kv_compression,
                   lengths=None, prefill_chunk: int | None = None) -> jax.Array:
  """The original positions each layer and KV head keeps after prefilling
  `tokens` [B, T] (right-padded; lengths [B], default all T) with the
  eviction policy of `kv_compression` (lctx.cache.spec, e.g.
  "snapkv:ratio=0.75,window=32"), one pass or `prefill_chunk` tokens at a time.

  Returns int32 [L, B, K, n_kept]: sorted ascending per (layer, row, KV
  head), n_kept = what the longest row keeps (kvpress's rule,
  lctx.cache.evict.base.n_kept); a row keeping fewer is padded with -1.
  Identical across K for per-layer methods (StreamingLLM, TOVA). ValueError
  for a spec without an eviction policy, before compiling.
  """
  spec = spec_lib.parse(kv_compression)
  policy = spec.of_kind("eviction")
  if policy is None:
    raise ValueError(f"kv_compression {str(spec)!r} has no eviction policy; allowed: one of "
                     f"{', '.join(n for n, p in spec_lib.POLICIES.items() if p.kind == 'eviction')}")
  tokens, lengths = _check_tokens(config, tokens, lengths)
  from lctx.cache.evict.base import n_kept
  n = n_kept(policy, tokens.shape[1])
  fmt = cache_format(config, spec)
  multiple = 1 if fmt is None else fmt.slot_multiple
  cache = new_cache(config, params, tokens.shape[0], -(-n // multiple) * multiple,
                    kv_compression=spec)
  _, cache = prefill(config, params, tokens, cache, lengths, chunk=prefill_chunk)
  pos = cache.evict.pos
  pos = jnp.stack(pos) if isinstance(pos, tuple) else pos
  pos = pos[:, :, :, 0, :n]
  return jnp.where(jnp.arange(n) < cache.lengths[None, :, None, None], pos, -1)


def check_compression(config: ModelConfig, kv_compression) -> None:
  """ValueError, before anything compiles, for a compression spec that does
  not fit the model: its cache format (head_dim, block; cache_format), an
  eviction method with KV sharing or with that format."""
  fmt = cache_format(config, kv_compression)
  policy = spec_lib.parse(kv_compression).of_kind("eviction")
  if policy is not None:
    from lctx.cache import evict
    check_evict_sharing(config, policy)
    evict.check_format(policy, fmt)


def generate(config: ModelConfig, params: Params, tokens, *, max_new_tokens: int,
             lengths=None, sampling: SamplingConfig = SamplingConfig(), key=None,
             capacity: int | None = None, block: int = PREFILL_BLOCK,
             plan: Plan | None = None, eos_token_id=None,
             pad_token_id: int | None = None, prefill_chunk: int | None = None,
             kv_compression=None) -> jax.Array:
  """Prefill then up to `max_new_tokens` tokens per row, the token loop inside one jit.

  tokens: [B, T] right-padded prompts, lengths [B] (default: all T).
  capacity: cache slots (default T + max_new_tokens, rounded up to a
  multiple of the compression format's slot multiple); the run needs
  T + max_new_tokens - 1 of them. key: a PRNG key, required when sampling.
  plan: run sharded on its mesh (params are placed with shard_params).
  eos_token_id: an id or ids that end a row: the row keeps its EOS token and
  every later slot holds pad_token_id (default: the first EOS id); the loop
  stops once every row has ended. None: always max_new_tokens tokens.
  prefill_chunk: prefill the prompt C tokens at a time (prefill; None or 0:
  one pass). kv_compression: the cache's compression spec (new_cache).
  Returns the new tokens [B, max_new_tokens] int32.
  """
  check_params(config, params)
  kv_compression = str(spec_lib.parse(kv_compression))
  tokens, lengths = _check_tokens(config, tokens, lengths)
  T = tokens.shape[1]
  prefill_chunk = transformer.check_chunk(prefill_chunk, plan, T)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  eos = _stop_ids(config, eos_token_id, pad_token_id)
  check_compression(config, kv_compression)
  capacity = generate_capacity(config, kv_compression, T, max_new_tokens, capacity)
  if key is None:
    if not sampling.greedy:
      raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (key=...)")
    key = jax.random.key(0)  # unused by greedy decoding
  if plan is not None:
    _check_plan(config, plan, batch=tokens.shape[0], capacity=capacity, prompt_len=T,
                compressed=kv_compression)
    params = shard_params(params, plan)
    tokens = plan.put(tokens, plan.tokens_sharding("prefill"))
    lengths = plan.put(lengths, plan.batch_sharding())
  return _generate_jit(config, params, tokens, lengths, key, max_new_tokens=int(max_new_tokens),
                       capacity=int(capacity), sampling=sampling, block=block, plan=plan, eos=eos,
                       chunk=prefill_chunk or None, kv_compression=kv_compression)


def generate_capacity(config: ModelConfig, kv_compression: str, T: int, max_new_tokens: int,
                      capacity: int | None = None) -> int:
  """The cache slots a generation of max_new_tokens after a prompt of T
  tokens uses: `capacity`, or by default the prompt's kept slots plus the new
  tokens, rounded up to the format's slot multiple (KIVI: its group).
  ValueError for a capacity the format cannot hold or the run does not fit."""
  fmt = cache_format(config, kv_compression)
  kept, grows = _generate_slots(kv_compression, T)
  if capacity is None:
    multiple = 1 if fmt is None else fmt.slot_multiple
    capacity = -(-(kept + (max_new_tokens if grows else 0)) // multiple) * multiple
  fmt = cache_format(config, kv_compression, capacity=capacity)  # None: dense at this capacity
  if fmt is not None and capacity % fmt.slot_multiple:
    raise ValueError(f"cache capacity {capacity} with kv_compression {kv_compression!r}: "
                     f"allowed: a multiple of {fmt.slot_multiple}")
  needed = kept + (max_new_tokens - 1 if grows else 0)
  if needed > capacity:
    raise ValueError(f"prompt length {T} ({kept} tokens kept) + max_new_tokens {max_new_tokens} "
                     f"needs {needed} cache slots but capacity is {capacity}")
  return capacity


def _generate_slots(kv_compression: str, T: int) -> tuple[int, bool]:
  """(slots the prompt fills, whether each new token takes one more)."""
  policy = spec_lib.parse(kv_compression).of_kind("eviction")
  if policy is None:
    return T, True
  from lctx.cache.evict.base import n_kept
  return n_kept(policy, T), dict(policy.params).get("decode") != "evict"


def _stop_ids(config: ModelConfig, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int] | None:
  """((eos ids), pad id) checked against the vocabulary, or None (no stopping)."""
  if eos_token_id is None:
    if pad_token_id is not None:
      raise ValueError("pad_token_id is only used with eos_token_id (it fills a row after EOS)")
    return None
  ids = np.ravel(np.asarray(eos_token_id, dtype=object)).tolist()
  if not ids:  # e.g. a tokenizer without EOS ids: nothing to stop at
    return None
  pad = ids[0] if pad_token_id is None else pad_token_id
  for name, values in (("eos_token_id", ids), ("pad_token_id", [pad])):
    # bool is an int subclass: True is not a token id.
    if any(not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_))
           or not 0 <= v < config.vocab_size for v in values):
      raise ValueError(f"{name} must be integer token id(s) in [0, {config.vocab_size}), "
                       f"got {eos_token_id if name == 'eos_token_id' else pad_token_id!r}")
  return tuple(int(i) for i in ids), int(pad)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "capacity",
                                             "sampling", "block", "plan", "eos", "chunk",
                                             "kv_compression"))
def _generate_jit(config, params, tokens, lengths, key, *, max_new_tokens, capacity, sampling,
                  block, plan, eos, chunk=None, kv_compression=""):
  cache = new_cache(config, params, tokens.shape[0], capacity, kv_compression=kv_compression)
  if plan is not None:  # built in place, in the same layout as the sharded steps use
    cache = plan.constrain(cache, plan.cache_shardings(cache))
  logits, cache = transformer.prefill(config, params, tokens, lengths, cache, block, plan,
                                      chunk)
  key, sub = jax.random.split(key)
  first = sample(logits, sub, sampling)

  if eos is None:
    def step(carry, _):
      token, cache, key = carry
      logits, cache = transformer.decode(config, params, token, cache, plan)
      key, sub = jax.random.split(key)
      nxt = sample(logits, sub, sampling)
      return (nxt, cache, key), nxt

    _, rest = jax.lax.scan(step, (first, cache, key), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)

  # With EOS: a while loop that ends when every row has emitted an EOS token;
  # finished rows still run (static shapes) but write pad.
  stop_ids, pad = eos
  is_eos = lambda t: jnp.isin(t, jnp.asarray(stop_ids, jnp.int32))
  out = jnp.full((tokens.shape[0], max_new_tokens), pad, jnp.int32).at[:, 0].set(first)

  def running(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, cache, key, done, out = carry
    logits, cache = transformer.decode(config, params, token, cache, plan)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, pad, sample(logits, sub, sampling))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    return i + 1, nxt, cache, key, done | is_eos(nxt), out

  carry = (jnp.int32(1), first, cache, key, is_eos(first), out)
  return jax.lax.while_loop(running, body, carry)[-1]
