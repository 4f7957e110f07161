"""Device meshes and logical-axis sharding: the one module that calls JAX's sharding APIs.

Model and cache code name *logical* axes (the constants below); a rules table
per mode (prefill, decode) maps each to a mesh axis or to replication. The
mesh always has the three axes (data, seq, model), size 1 where unused, in
Auto mode: shardings of parameters, cache and inputs are given, and XLA's
SPMD partitioner (GSPMD) propagates them through the model and inserts the
collectives (Megatron-style tensor parallelism falls out of the weight
shardings: an all-reduce after the attention output and after the MLP).
Internally the `model` axis is split in two so that a model axis larger than
the number of KV heads replicates each KV head only over the devices that
need it (see Plan).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lctx.cache.dense import K_CACHE_AXES, V_CACHE_AXES, KVCache
from lctx.config import ModelConfig
from lctx.model.params import STACKED, param_logical_axes

MESH_AXES = ("data", "seq", "model")  # what users name in a mesh spec
MODEL_REP = "model_rep"  # internal: the part of `model` beyond the KV heads (see Plan)
INTERNAL_AXES = MESH_AXES + (MODEL_REP,)
MODES = ("prefill", "decode")

# Logical axes (shared with lctx.model.params and lctx.cache.dense).
BATCH, SEQ, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = (
    "batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
CACHE_BATCH, CACHE_KV_HEADS, CACHE_SEQ = "cache_batch", "cache_kv_heads", "cache_seq"


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """'data:2,model:4' -> {'data': 2, 'seq': 1, 'model': 4}."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in MESH_AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; allowed: {MESH_AXES}")
    if name in seen:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
    if not size.isdigit() or int(size) < 1:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} needs a positive integer size, "
                       f"e.g. {name}:2")
    seen.add(name)
    sizes[name] = int(size)
  return sizes


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, seq, model) mesh over the first data*seq*model devices."""
  sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1),
                                                               **spec}
  devices = list(jax.devices() if devices is None else devices)
  needed = math.prod(sizes.values())
  if needed > len(devices):
    raise ValueError(f"mesh {sizes} needs {needed} devices but only {len(devices)} are "
                     f"available")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices[:needed]).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one model is laid out on one mesh; hashable, so jitted steps are cached by it.

  The user's `model` axis of size m is split internally into two mesh axes,
  `model` (size min(m, K)) and `model_rep` (m / K when m > K, else 1), so that
  KV heads are never replicated beyond what the query heads need:
    - query heads, MLP units and the vocabulary split over (model, model_rep), m ways;
    - KV heads (their projections and the cache) split over `model` only.
  With m = r K, KV head j lives on the r devices whose query heads read it
  (replicated r times, as vLLM does), so a device holds 1/K of the cache and of
  the K/V projections rather than all of them. m must divide K or be a
  multiple of it (else ValueError). `plan.mesh` is this 4-axis mesh;
  `plan.size("model")` is m.
  """

  config: ModelConfig
  mesh: Mesh

  def __post_init__(self):
    names = tuple(self.mesh.axis_names)
    if names not in (MESH_AXES, INTERNAL_AXES):
      raise ValueError(f"mesh axes {names} not allowed; allowed: {MESH_AXES} (use make_mesh)")
    shape = dict(self.mesh.shape)
    m = shape["model"] * shape.get(MODEL_REP, 1)
    c, K = self.config, self.config.num_kv_heads
    for what, n in (("num_heads (query heads)", c.num_heads),
                    ("intermediate_size (MLP)", c.intermediate_size)):
      if n % m:
        raise ValueError(f"mesh axis 'model' of size {m} does not divide {what} = {n}")
    if K % m and m % K:
      allowed = [d for d in range(1, c.num_heads + 1) if c.num_heads % d == 0 and
                 c.intermediate_size % d == 0 and (K % d == 0 or d % K == 0)]
      raise ValueError(f"mesh axis 'model' of size {m} must divide num_kv_heads = {K} or be a "
                       f"multiple of it (KV heads are split, or each replicated m/K times); "
                       f"allowed model sizes: {allowed}")
    kv, rep = min(m, K), max(m // K, 1)
    if names == INTERNAL_AXES:  # already split (e.g. Plan(config, plan.mesh)): must match
      if (shape["model"], shape[MODEL_REP]) != (kv, rep):
        raise ValueError(f"mesh axes model={shape['model']}, {MODEL_REP}={shape[MODEL_REP]} do "
                         f"not fit num_kv_heads = {K}: expected model={kv}, {MODEL_REP}={rep}")
      return
    devices = self.mesh.devices.reshape(shape["data"], shape["seq"], kv, rep)
    object.__setattr__(self, "mesh", Mesh(devices, INTERNAL_AXES,
                                          axis_types=(AxisType.Auto,) * len(INTERNAL_AXES)))

  def size(self, axis: str) -> int:
    """Devices along a user-level axis (data, seq, model); 'model' counts both
    of its internal parts."""
    if axis == "model":
      return self.mesh.shape["model"] * self.mesh.shape[MODEL_REP]
    return self.mesh.shape[axis]

  @property
  def kv_replicas(self) -> int:
    """Devices holding each KV head: m / K when the model axis m exceeds K, else 1."""
    return self.mesh.shape[MODEL_REP]

  def rules(self, mode: str) -> dict[str, Any]:
    if mode not in MODES:
      raise ValueError(f"mode {mode!r} not allowed; allowed: {MODES}")
    model = tuple(a for a in ("model", MODEL_REP) if self.mesh.shape[a] > 1) or None
    if model and len(model) == 1:
      model = model[0]
    vocab = model if self.config.vocab_size % self.size("model") == 0 else None
    kv = "model" if self.mesh.shape["model"] > 1 else None
    return {
        BATCH: "data", CACHE_BATCH: "data",
        SEQ: "seq" if mode == "prefill" else None, CACHE_SEQ: "seq",
        HEADS: model, MLP: model, VOCAB: vocab, KV_HEADS: kv, CACHE_KV_HEADS: kv,
        EMBED: None, HEAD_DIM: None, LAYERS: None,
    }

  def spec(self, logical: Sequence[str], mode: str) -> PartitionSpec:
    rules = self.rules(mode)  # None entries and mesh axes of size 1 are not split
    axes = (rules[a] if a is not None else None for a in logical)
    return PartitionSpec(*(a if a and (isinstance(a, tuple) or self.mesh.shape[a] > 1)
                           else None for a in axes))

  def sharding(self, logical: Sequence[str], mode: str) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical, mode))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  # ---- trees of shardings ------------------------------------------------------------

  def param_shardings(self, params: Any, mode: str = "decode") -> Any:
    """Shardings for a params tree, stacked or unrolled (layers a tuple of dicts)."""
    axes = param_logical_axes(self.config)
    out = {k: self.sharding(axes[k], mode) for k in params if k not in STACKED}
    for key in STACKED:  # layers, and kv_layers (cross-layer KV sharing): as w_k / w_v
      if key not in params:
        continue
      layer_axes = axes[key]
      if isinstance(params[key], (tuple, list)):
        one = {k: self.sharding(layer_axes[k][1:], mode) for k in params[key][0]}
        out[key] = type(params[key])(one for _ in params[key])
      else:
        out[key] = {k: self.sharding(layer_axes[k], mode) for k in params[key]}
    return out

  def cache_shardings(self, cache: KVCache) -> KVCache:
    """Shardings of a cache (either layout; dense or compressed). A
    compressed cache's arrays split like the dense cache's, along the axes
    they share with it: batch, and KV heads where an array has one entry per
    KV head (a scale shared by all heads is replicated); their slot axes are
    not split (compressed caches run on meshes without `seq`, check)."""
    if cache.offload:  # k and v in pinned host memory, split as on the device
      on_device = self.cache_shardings(cache.replace(offload=False))
      host = lambda side: jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), side)
      return on_device.replace(k=host(on_device.k), v=host(on_device.v), offload=True)
    lead = (LAYERS,) if cache.stacked else ()
    batch = self.sharding((CACHE_BATCH,), "decode")
    if cache.evicting:  # positions and scores per (row, KV head, slot), split like the keys
      per_slot = self.sharding(lead + (CACHE_BATCH, CACHE_KV_HEADS, None, None), "decode")
      layers = lambda x: None if x is None else (per_slot if cache.stacked else
                                                 tuple(per_slot for _ in x))
      ev = cache.evict.replace(pos=layers(cache.evict.pos), acc=layers(cache.evict.acc),
                               next_pos=batch, budget=batch, step=batch, shift=batch)
      return self.cache_shardings(cache.replace(evict=None)).replace(evict=ev)
    if cache.compressed:
      K = self.config.num_kv_heads
      def one(x, axes):  # x: stacked [L, B, ...] or one layer [B, ...]
        heads = x.shape[len(lead) + 1]
        return self.sharding(lead + (CACHE_BATCH, CACHE_KV_HEADS if heads == K else None)
                             + (None, None), "decode")
      side = lambda d: {name: (one(x, lead) if cache.stacked else tuple(one(y, lead) for y in x))
                        for name, x in d.items()}
      return cache.replace(k=side(cache.k), v=side(cache.v), lengths=batch)
    k = self.sharding(lead + K_CACHE_AXES, "decode")
    v = self.sharding(lead + V_CACHE_AXES, "decode")
    if not cache.stacked:
      k, v = tuple(k for _ in cache.k), tuple(v for _ in cache.v)
    return cache.replace(k=k, v=v, lengths=batch)

  def tokens_sharding(self, mode: str) -> NamedSharding:
    """[B, T] prompts for prefill, [B] tokens for decode."""
    return self.sharding((BATCH, SEQ) if mode == "prefill" else (BATCH,), mode)

  def batch_sharding(self) -> NamedSharding:
    """Per-row vectors [B] (lengths) and per-row outputs' leading axis."""
    return self.sharding((BATCH,), "decode")

  def logits_sharding(self) -> NamedSharding:
    return self.sharding((BATCH, VOCAB), "decode")

  # ---- sequence parallelism -----------------------------------------------------------

  @property
  def seq_parallel(self) -> bool:
    return self.size("seq") > 1


  def manual(self, fn, in_logical: Sequence[Sequence[str | None]],
             out_logical: Sequence[str | None] | Sequence[Sequence[str | None]], mode: str):
    """Runs fn once per device (shard_map over the whole mesh) on the local
    blocks of its inputs; *_logical give each input's / output's logical axes
    (None: not split), mapped by `mode`'s rules. Inside fn, lax collectives
    over "seq" (or any mesh axis) work."""
    def specs(tree):
      if tree and isinstance(tree[0], (tuple, list)):
        return tuple(self.spec(t, mode) for t in tree)
      return self.spec(tree, mode)
    return jax.shard_map(fn, mesh=self.mesh, in_specs=specs(in_logical),
                         out_specs=specs(out_logical),
                         # The blockwise attention's conds mix per-shard and shared
                         # values; replication is guaranteed by the psums instead.
                         check_vma=False)

  # ---- placement ---------------------------------------------------------------------

  def put(self, tree: Any, shardings: Any) -> Any:
    """Host or local values -> arrays laid out by `shardings`. When the mesh
    spans several processes, each process builds only its own shards (every
    process must pass the same values)."""
    def one(x, sharding):
      if sharding.is_fully_addressable or (isinstance(x, jax.Array)
                                           and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(one, tree, shardings)

  def to_host(self, x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array, on every process."""
    if x.is_fully_addressable:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def constrain(self, tree: Any, shardings: Any) -> Any:
    """Inside jit: pins intermediate values (e.g. a cache built in place) to a layout."""
    return jax.lax.with_sharding_constraint(tree, shardings)

  # ---- validation, before anything compiles -------------------------------------------

  def check(self, *, batch: int | None = None, capacity: int | None = None,
            prompt_len: int | None = None, compressed: str | None = None) -> None:
    """Raises ValueError naming the axis, the dimension and the sizes when a
    mesh axis does not divide the dimension it shards, and for a compressed
    cache (compressed: its spec) on a mesh with a `seq` axis (not modelled:
    its slots would have to split over seq)."""
    if compressed and self.seq_parallel:
      raise ValueError(f"kv_compression {compressed!r} on a mesh with seq:{self.size('seq')}: "
                       f"compressed caches run on meshes without a seq axis (allowed: data and "
                       f"model axes)")
    dims = []  # the model axis is checked when the plan is made (__post_init__)
    if batch is not None:
      dims.append(("data", "batch", batch))
    if capacity is not None:
      dims.append(("seq", "cache capacity", capacity))
    if prompt_len is not None:
      dims.append(("seq", "prompt length", prompt_len))
    for axis, what, n in dims:
      if n % self.size(axis):
        raise ValueError(f"mesh axis {axis!r} of size {self.size(axis)} does not divide "
                         f"{what} = {n}")
