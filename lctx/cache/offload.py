"""Host memory for KV caches: a context switch (one user's whole cache to
host memory and back) and the placement of a streamed (`offload` policy) cache.

A context switch copies every array of a cache (any policy: dense, quantized
codes and scales, eviction's positions and scores, the per-row counters) to
the `pinned_host` memory kind and back, as jitted programs with explicit
shardings (the cache's own, with the memory kind changed), on one device or
any mesh. Nothing is converted: the bytes that cross the host link are the
cache's physical bytes (KVCache.physical_bytes; a quantized cache moves its
quantized bytes), and a round trip is bitwise. The paper's fourth metric
(arXiv 2405.08944, sec. 3) is the time of one such swap: one user's cache
out while another's comes in (`swap`).

JAX memory kinds: https://docs.jax.dev/en/latest/notebooks/host-offloading.html
"""

from __future__ import annotations

import functools

import jax

from lctx.cache.dense import KVCache

HOST, DEVICE = "pinned_host", "device"


def shardings(cache: KVCache, plan=None, memory_kind: str = DEVICE) -> KVCache:
  """The cache's shardings (a KVCache of Shardings) in `memory_kind`: the
  plan's cache shardings, or, without a plan, each array's own (a concrete
  cache; one device). A streamed (`offload`) cache's K and V stay in host
  memory either way: a context switch moves only its per-row state."""
  if plan is not None:
    placed = plan.cache_shardings(cache)
  else:
    placed = jax.tree.map(lambda x: x.sharding, cache)
  moved = jax.tree.map(lambda s: s.with_memory_kind(memory_kind), placed)
  if cache.offload:  # a streamed cache's K and V live in host memory for good
    return moved.replace(k=placed.k, v=placed.v)
  return moved


def _layout(cache: KVCache, plan, kind: str) -> tuple:
  """(tree structure, leaf shardings in `kind`): a hashable key of a placement."""
  return jax.tree.structure(cache), tuple(jax.tree.leaves(shardings(cache, plan, kind)))


@functools.lru_cache(maxsize=64)
def _program(ins: tuple, outs: tuple):
  """The jitted identity from placements `ins` to `outs` (tuples of
  _layout keys, one per argument): one program per layout and placement."""
  tree = lambda layouts: tuple(jax.tree.unflatten(t, s) for t, s in layouts)
  return jax.jit(lambda *caches: caches, in_shardings=tree(ins), out_shardings=tree(outs))


def to_host(cache: KVCache, plan=None) -> KVCache:
  """The cache copied to pinned host memory (every array, same shardings).
  The device copy stays valid until the caller drops it (no donation: XLA
  cannot alias a device buffer with a host one)."""
  return _program((_layout(cache, plan, DEVICE),), (_layout(cache, plan, HOST),))(cache)[0]


def to_device(cache: KVCache, plan=None) -> KVCache:
  """A host-resident cache (to_host) copied back to device memory, bitwise."""
  return _program((_layout(cache, plan, HOST),), (_layout(cache, plan, DEVICE),))(cache)[0]


def swap_program(leaving: KVCache, returning: KVCache, plan=None):
  """The jitted context switch: f(leaving on device, returning on host) ->
  (leaving on host, returning on device), one program (the two copies can
  overlap on a link with a copy engine each way). Works on abstract caches
  with a plan (for lowering)."""
  return _program((_layout(leaving, plan, DEVICE), _layout(returning, plan, HOST)),
                  (_layout(leaving, plan, HOST), _layout(returning, plan, DEVICE)))


def swap(leaving: KVCache, returning: KVCache, plan=None) -> tuple[KVCache, KVCache]:
  """A context switch: `leaving` (on device) goes to host memory while
  `returning` (on host, from to_host or an earlier swap) comes back.
  Returns (leaving on host, returning on device). Both copies are bitwise."""
  return swap_program(leaving, returning, plan)(leaving, returning)


def on_host(cache: KVCache) -> bool:
  """True when every array of a concrete cache is in host memory."""
  return all(getattr(x, "sharding", None) is not None and x.sharding.memory_kind == HOST
             for x in jax.tree.leaves(cache))


def check_on_device(cache: KVCache) -> None:
  """ValueError when a concrete cache's arrays are not where a prefill or
  decode step reads them: in device memory, except a streamed (`offload`)
  cache's K and V, in host memory. A swapped-out cache (to_host, swap) must
  come back with to_device first."""
  want_host = lambda path: cache.offload and path and getattr(path[0], "name", None) in ("k", "v")
  for path, x in jax.tree_util.tree_leaves_with_path(cache):
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    if kind is None or isinstance(x, jax.core.Tracer):
      continue
    expected = HOST if want_host(path) else DEVICE
    if kind != expected:
      where = jax.tree_util.keystr(path)
      raise ValueError(f"cache{where} is in {kind} memory, not {expected}: a cache swapped "
                       f"out with lctx.cache.offload.to_host or swap comes back with "
                       f"offload.to_device before a prefill or decode step")
