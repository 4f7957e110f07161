"""The KV cache: fixed capacity, per-row fill lengths, updated in place;
dense, or compressed by a policy (lctx.cache.spec, lctx.cache.quant).

The cache holds config.num_kv_layers layers: L, or L / s under cross-layer KV
sharing (config.kv_share_every = s: layer l reads cache layer l // s).
Per layer, keys are [B, K, H, S] and values [B, K, S, H] (S = capacity): both
decode-attention products are then batched matmuls over (b, k) with the
contiguous operand the CPU backend wants (see lctx.model.attention). The layers
are either stacked into one [L, ...] array per K and V (for the scanned layer
loop) or kept as a tuple of L arrays (for the unrolled loop, where each layer's
buffer is read and written in place with no slicing copies).

A compressed cache holds, instead of the two arrays, two dicts of arrays (its
format's key side and value side, lctx.cache.quant.base), each entry stacked
or a tuple of L arrays the same way, and its format as static metadata (part
of the pytree structure, so a jitted step compiles once per format).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lctx.config import ModelConfig

# Logical axes of one layer's cache arrays (the stacked form has "layers" in front).
K_CACHE_AXES = ("cache_batch", "cache_kv_heads", "head_dim", "cache_seq")
V_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_seq", "head_dim")


@struct.dataclass
class EvictState:
  """What an evicting cache keeps besides K and V (lctx.cache.evict).

  pos: the original position of each slot's token, int32, per layer
    [B, K, 1, S] (the key-side layout, so lctx.cache.store reads and writes
    it), stacked [L, ...] or a tuple like the cache; 0 in empty slots (the
    cache's lengths say which are filled).
  acc: scores accumulated so far, float32, the same layout; None for
    methods that do not accumulate.
  next_pos: [B] int32, the original position of each row's next token (RoPE).
  budget: [B] int32, the slots each row keeps (set by the prefill).
  step: [B] int32, decode steps since the prefill (Keyformer's temperature).
  shift: [B] int32, positions RoPE skips: a new token is rotated to
    next_pos - shift (StreamingLLM's positions=cache: the evicted count;
    else 0), while pos and next_pos stay original positions.
  policy: the eviction Policy (lctx.cache.spec), static.
  """
  pos: object
  acc: object
  next_pos: jax.Array
  budget: jax.Array
  step: jax.Array
  shift: jax.Array
  policy: object = struct.field(pytree_node=False, default=None)


@struct.dataclass
class KVCache:
  # Dense: [L, B, K, H, S] or L x [B, K, H, S]; compressed: a dict of such arrays.
  k: jax.Array | tuple[jax.Array, ...] | dict
  v: jax.Array | tuple[jax.Array, ...] | dict  # dense: [L, B, K, S, H] or L x [B, K, S, H]
  lengths: jax.Array  # [B] int32: valid tokens per row; the next token goes there
  # The compression format (lctx.cache.quant), None for dense; static.
  format: object = struct.field(pytree_node=False, default=None)
  # Token eviction's state (EvictState), None without eviction.
  evict: EvictState | None = None
  # The `offload` policy: k and v live in pinned host memory and the layer loop
  # streams them (lctx.model.streaming); static.
  offload: bool = struct.field(pytree_node=False, default=False)

  @property
  def compressed(self) -> bool:
    return self.format is not None

  @property
  def evicting(self) -> bool:
    return self.evict is not None

  @property
  def positions(self) -> jax.Array:
    """[B] int32: the RoPE position of each row's next token."""
    return self.lengths if self.evict is None else self.evict.next_pos - self.evict.shift

  def _first(self, side):
    x = side["codes"] if isinstance(side, dict) else side
    return x

  @property
  def stacked(self) -> bool:
    return not isinstance(self._first(self.k), (tuple, list))

  @property
  def capacity(self) -> int:
    v = self._first(self.v)
    return (v if self.stacked else v[0]).shape[-2]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def physical_bytes(self) -> int:
    """Physical bytes: every array the cache holds (payload, scales, zero
    points, outliers and their indices, residual buffers) plus the lengths."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  nbytes = physical_bytes


def _layer_shapes(config: ModelConfig, batch: int, capacity: int):
  if capacity <= 0 or batch <= 0:
    raise ValueError(f"cache batch ({batch}) and capacity ({capacity}) must be positive")
  K, H = config.num_kv_heads, config.head_dim
  return (batch, K, H, capacity), (batch, K, capacity, H)


def cache_format(config: ModelConfig, kv_compression=None, block: int | None = None,
                 capacity: int | None = None):
  """The format (lctx.cache.quant) of a compression spec string or parsed
  spec for this model, None for dense (and for eviction alone). Raises ValueError (naming the policy,
  key and allowed values) for a spec that does not parse or does not fit the
  model (e.g. a group that does not divide head_dim), before anything compiles.
  With a capacity, None also for a policy that keeps every slot in full
  precision there (quant.make_format)."""
  from lctx.cache import quant, spec as spec_lib  # quant pulls in every format
  parsed = spec_lib.parse(kv_compression)
  parsed.check(config.head_dim, block)
  _check_offload(parsed)
  check_evict_sharing(config, parsed.of_kind("eviction"))
  if parsed.quantization is None:
    return None
  return quant.make_format(parsed.quantization, config, capacity)


def init_cache(config: ModelConfig, batch: int, capacity: int, stacked: bool = True,
               kv_compression=None) -> KVCache:
  """An empty cache (zeros; never uninitialised memory) in the compute dtype,
  or in the format of `kv_compression` (a spec string, lctx.cache.spec; empty
  or None: dense). ValueError for a bad spec (cache_format) or a capacity the
  format cannot hold (e.g. not a multiple of KIVI's group)."""
  fmt = cache_format(config, kv_compression, capacity=capacity)
  dtype, L = jnp.dtype(config.dtype), config.num_kv_layers
  evict = _evict_state(config, batch, capacity, stacked, kv_compression, fmt)
  if fmt is not None:
    _layer_shapes(config, batch, capacity)  # the positivity checks
    if capacity % fmt.slot_multiple:
      raise ValueError(f"cache capacity {capacity} with kv_compression {fmt.spec!r}: allowed: "
                       f"a multiple of {fmt.slot_multiple}")
    layers = [fmt.init_layer(batch, capacity) for _ in range(L)]
    side = lambda i: {name: (jnp.stack([lay[i][name] for lay in layers]) if stacked
                             else tuple(lay[i][name] for lay in layers))
                      for name in layers[0][i]}
    return _placed(KVCache(side(0), side(1), jnp.zeros((batch,), jnp.int32), fmt, evict),
                   kv_compression)
  k_shape, v_shape = _layer_shapes(config, batch, capacity)
  if stacked:
    k, v = jnp.zeros((L, *k_shape), dtype), jnp.zeros((L, *v_shape), dtype)
  else:
    k = tuple(jnp.zeros(k_shape, dtype) for _ in range(L))
    v = tuple(jnp.zeros(v_shape, dtype) for _ in range(L))
  return _placed(KVCache(k, v, jnp.zeros((batch,), jnp.int32), None, evict), kv_compression)


# Formats whose every slot is written on its own: what a streamed cache can
# send back slot by slot (lctx.model.streaming).
OFFLOAD_FORMATS = ("int8", "int4")


def _check_offload(parsed) -> None:
  """ValueError for an `offload` spec with a cache it cannot stream: a format
  whose write is not one slot per token (KIVI's groups, KVQuant, fp8's
  first-write scale), or token eviction; at any capacity."""
  if parsed.of_kind("offload") is None:
    return
  quant = parsed.quantization
  if parsed.of_kind("eviction") is not None or (quant and quant.name not in OFFLOAD_FORMATS):
    raise ValueError(f"kv_compression {str(parsed)!r}: offload streams caches whose every "
                     f"slot is written on its own; allowed: offload, int8+offload, "
                     f"int4+offload (with any knobs)")


def _placed(cache: KVCache, kv_compression) -> KVCache:
  """With the `offload` policy, K and V in pinned host memory (lctx.model.streaming)."""
  from lctx.cache import spec as spec_lib
  if spec_lib.parse(kv_compression).of_kind("offload") is None:
    return cache
  host = lambda side: jax.device_put(side, jax.memory.Space.Host)
  return cache.replace(k=host(cache.k), v=host(cache.v), offload=True)


def _evict_state(config: ModelConfig, batch: int, capacity: int, stacked: bool,
                 kv_compression, fmt) -> EvictState | None:
  """The EvictState of a spec with an eviction policy, else None. ValueError
  for a quantization format eviction cannot compact (lctx.cache.evict.check_format)."""
  from lctx.cache import evict, spec as spec_lib
  policy = spec_lib.parse(kv_compression).of_kind("eviction")
  if policy is None:
    return None
  check_evict_sharing(config, policy)
  evict.check_format(policy, fmt)
  shape = (batch, config.num_kv_heads, 1, capacity)
  def layers(dtype):
    if stacked:
      return jnp.zeros((config.num_kv_layers, *shape), dtype)
    return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_kv_layers))
  acc = layers(jnp.float32) if evict.method(policy).accumulates else None
  zeros = jnp.zeros((batch,), jnp.int32)
  return EvictState(layers(jnp.int32), acc, zeros, jnp.full((batch,), capacity, jnp.int32), zeros,
                    zeros, policy)


def check_evict_sharing(config: ModelConfig, policy) -> None:
  """ValueError for token eviction (policy: its name or Policy) on a model with
  cross-layer KV sharing: eviction selects the tokens of each layer from that
  layer's own attention, and a shared cache layer would need one selection for
  its whole group of layers, which lctx does not implement."""
  if policy is not None and config.kv_share_every > 1:
    raise ValueError(f"kv_compression with token eviction ({policy}) on a model with "
                     f"kv_share_every={config.kv_share_every}: eviction selects tokens per "
                     f"layer, and a shared cache layer would need one selection per group of "
                     f"{config.kv_share_every} layers (not implemented); allowed: "
                     f"kv_share_every=1, or a quantization-only or dense cache")


def abstract_cache(config: ModelConfig, batch: int, capacity: int,
                   stacked: bool = True, kv_compression=None) -> KVCache:
  """ShapeDtypeStructs of a cache: for compiling at 1M tokens without allocating."""
  return jax.eval_shape(lambda: init_cache(config, batch, capacity, stacked, kv_compression))
