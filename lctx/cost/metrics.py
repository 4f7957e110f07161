"""The four long-context metrics, from the closed form and from the compiled HLO.

For a model on a device mesh (default tensor parallel, `model:g`) serving
users at context T on a hardware spec: concurrency (HBM size), prefill latency
(FLOP/s), decode step latency for B users (HBM bandwidth), context-switch
latency (host link), and the throughput they imply. Each is computed twice:
`analytic` (lctx.cost.analytic, g devices as one tensor-parallel group) and
`hlo` (per-op rooflines over the partitioned programs lctx really compiles,
the physical per-device bytes of its sharded weights and cache, and the peak
temporaries of those programs).

Data parallelism (`data:d` in the mesh) replicates the weights d times: one
user lives on one replica (seq x model devices), which holds its cache and
runs its prefill; a decode step runs B users over the whole mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import threading

import jax
import jax.numpy as jnp

from lctx import engine, sharding
from lctx.cache import spec as spec_lib
from lctx.cache.dense import abstract_cache, cache_format, check_evict_sharing
from lctx.config import ModelConfig
from lctx.cost import analytic, hlo
from lctx.model.params import STACKED, abstract_params

SOURCES = ("analytic", "hlo")


@dataclasses.dataclass(frozen=True)
class Metrics:
  model: str
  hardware: str
  mesh: str  # data/seq/model sizes, e.g. "model:8"
  num_devices: int
  context: int
  batch: int
  source: str
  kv_bytes_per_user_per_device: float  # one user's cache held by each device of its replica
  kv_bytes_per_user_total: float  # one user's whole cache (every KV head once)
  weight_bytes_per_device: float
  decode_temp_bytes_per_device: float  # peak temporaries of a decode step of `batch` users
  prefill_temp_bytes_per_device: float  # peak temporaries of one user's prefill
  concurrency: int  # users whose caches fit in HBM over the whole mesh
  shortfall_bytes_per_device: float  # HBM missing for one user when concurrency is 0
  prefill_flops_per_device: float
  prefill_s: float  # also the recompute alternative to a context switch
  decode_bytes_per_device: float
  decode_step_s: float  # one step for `batch` users
  context_switch_s: float  # one user's KV out and another's in over the host link
  generated_tokens: int  # G of the session workload below
  decode_tokens_per_s: float  # a full HBM (`concurrency` users) decoding together
  sessions_per_hour: float  # users of T context + G tokens served, waves of `concurrency`
  # The calibrated mode (lctx.cost.calibrated; calibration: calibrated.for_hardware):
  # hlo rows charge the compiled programs' ops at the calibration's efficiencies
  # plus kernel floors and collective latencies; analytic rows divide the
  # closed form's prefill by the GEMM efficiency and its decode by the memory
  # efficiency only (it has no kernels and does not split out attention).
  prefill_s_calibrated: float = 0.0
  decode_step_s_calibrated: float = 0.0
  calibration_source: str = ""
  prefill_chunk: int = 0  # the prefill's chunk (0: one pass)
  kv_compression: str = ""  # the cache's compression spec (lctx.cache.spec; "": dense)
  # The `offload` policy (the cache in host memory, streamed one layer ahead):
  # decode_step_s is then sum over layers of max(compute, next layer's
  # transfer) (overlapped); decode_step_s_serial is compute + transfer.
  # Without offload both are the same and host_bytes_per_user_per_device is 0.
  decode_step_s_serial: float = 0.0
  host_bytes_per_user_per_device: float = 0.0


def mesh_label(mesh: str | int) -> str:
  """A mesh's canonical spec: 8 -> 'model:8'; 'data:2,seq:1,model:4' ->
  'data:2,model:4' (axes of size 1 dropped; one device is 'model:1')."""
  sizes = sharding.parse_mesh_spec(f"model:{mesh}" if isinstance(mesh, int) else mesh)
  return ",".join(f"{a}:{n}" for a, n in sizes.items() if n > 1) or "model:1"


def num_devices(mesh: str | int) -> int:
  return math.prod(sharding.parse_mesh_spec(mesh_label(mesh)).values())


def replica_mesh(mesh: str | int) -> str:
  """The devices one user lives on: the mesh without its data axis."""
  sizes = sharding.parse_mesh_spec(mesh_label(mesh))
  return mesh_label(",".join(f"{a}:{n}" for a, n in sizes.items() if a != "data"))


def _fit(hbm: float, weights: float, kv: float, decode_fixed: float, decode_per_user: float,
         prefill_temp: float) -> tuple[int, float]:
  """Most users n per replica with
  weights + n kv + max(decode_fixed + n decode_per_user, one prefill's temporaries) <= HBM,
  and the shortfall when n is 0."""
  free = hbm - weights
  n = max(min(math.floor((free - decode_fixed) / (kv + decode_per_user)),
              math.floor((free - prefill_temp) / kv)), 0)
  shortfall = weights + kv + max(decode_fixed + decode_per_user, prefill_temp) - hbm
  return n, (shortfall if n == 0 else 0.0)


def offloaded(kv_compression) -> bool:
  """Whether a compression spec keeps the cache in host memory (`offload`)."""
  return spec_lib.parse(kv_compression).of_kind("offload") is not None


def overlapped_seconds(compute_s: float, transfer_s: float, blocks: int) -> float:
  """A layer loop that fetches block l + 1 while layer l computes
  (lctx.model.streaming), with `blocks` equal layers: the first block's
  transfer, then sum over layers of max(compute(l), transfer(l + 1)), the
  last layer's compute alone (FRAMEWORK.md, "Beyond the paper"). Equals
  compute_s when nothing is transferred."""
  if blocks <= 0 or transfer_s <= 0:
    return compute_s
  c, t = compute_s / blocks, transfer_s / blocks
  return t + (blocks - 1) * max(c, t) + c


def _fit_offloaded(hw, hbm_free: float, decode_fixed: float, blocks_per_user: float,
                   prefill_temp: float, host_per_user: float) -> tuple[int, float]:
  """Users per replica when caches live in host memory: the device holds each
  decoding user's blocks in flight (blocks_per_user), the host holds the
  caches (hw.host_memory_bytes per device; unbounded when the spec does not
  state it)."""
  n = math.floor((hbm_free - decode_fixed) / blocks_per_user) if blocks_per_user else 10**9
  if hbm_free < prefill_temp:
    n = 0
  if hw.host_memory_bytes is not None and host_per_user:
    n = min(n, math.floor(hw.host_memory_bytes / host_per_user))
  n = max(n, 0)
  shortfall = max(decode_fixed + blocks_per_user, prefill_temp) - hbm_free
  return n, (shortfall if n == 0 else 0.0)


def _sessions(users: int, replicas: int, prefill_s: float, G: int,
              decode_s_at) -> tuple[float, float]:
  """(decode tokens/s, sessions/hour) of waves of `users` sessions: each
  replica prefills its share one prompt after another, then the wave decodes
  G tokens together. `decode_s_at(b)`: one decode step's seconds for b users."""
  if users == 0:
    return 0.0, 0.0
  step = decode_s_at(users)
  wave = math.ceil(users / replicas) * prefill_s + G * step
  return users / step, 3600 * users / wave


def cache_slots(config: ModelConfig, kv_compression, T: int) -> int:
  """Cache slots a user with a context of T tokens holds: T, or with token
  eviction the tokens it keeps (lctx.cache.evict.base.n_kept), rounded up to
  the format's slot multiple."""
  spec = spec_lib.parse(kv_compression)
  policy = spec.of_kind("eviction")
  if policy is None:
    return T
  check_evict_sharing(config, policy)
  from lctx.cache.evict.base import n_kept
  fmt = cache_format(config, spec)
  multiple = 1 if fmt is None else fmt.slot_multiple
  return -(-n_kept(policy, T) // multiple) * multiple


def evict_slot_bytes(config: ModelConfig, kv_compression) -> int:
  """Eviction's own bytes per kept slot over all layers: the original
  position (int32) per KV head, and the accumulated score (float32) per KV
  head for methods that accumulate (H2O, Keyformer, ObservedAttention)."""
  from lctx.cache import evict
  policy = spec_lib.parse(kv_compression).of_kind("eviction")
  if policy is None:
    return 0
  per_head = 4 + (4 if evict.method(policy).accumulates else 0)
  return config.num_kv_layers * config.num_kv_heads * per_head


def kv_token_bytes(config: ModelConfig, kv_compression, T: int,
                   dtype: str = "bfloat16") -> float | None:
  """A compressed cache's bytes per context token of one user over all
  layers at context T: its format's closed form at capacity T (payload,
  scales, zero points, outliers; per-layer buffers such as a residual window
  amortised over T); with token eviction, the kept slots' bytes (format or
  dense, plus positions and scores: evict_slot_bytes) spread over the T
  context tokens. None for the dense cache (analytic.kv_bytes_per_token)."""
  config = config.replace(param_dtype=dtype, dtype=dtype)
  slots = cache_slots(config, kv_compression, T)
  fmt = cache_format(config, kv_compression, capacity=slots)
  extra = evict_slot_bytes(config, kv_compression)
  if fmt is None and not extra:
    return None
  if fmt is None:
    per_slot, fixed = analytic.kv_bytes_per_token(config, dtype), 0.0
  else:
    L = config.num_kv_layers  # the cache's layers (L / s under cross-layer KV sharing)
    per_slot, fixed = L * fmt.bytes_per_token(), L * fmt.fixed_bytes(1)
  return (slots * (per_slot + extra) + fixed) / T


def cache_arrays(cache) -> tuple:
  """The arrays that hold a user's cached tokens (K, V, and eviction's
  positions and scores), without per-row counters."""
  if cache.evict is None:
    return (cache.k, cache.v)
  return (cache.k, cache.v, cache.evict.pos, cache.evict.acc)


def from_closed_form(config: ModelConfig, hw, mesh: str | int, T: int, B: int = 1,
                     dtype: str = "bfloat16", convention: str = "exact",
                     generated_tokens: int = 1000, kv_compression="") -> Metrics:
  """The framework's formulas on all of the mesh's devices as one group.
  kv_compression: the cache's bytes per token are its format's closed form
  (kv_token_bytes); decode stays bandwidth-bound (dequantization adds a few
  FLOPs per cache element read, far below the roofline's ridge)."""
  from lctx.cost import calibrated  # it builds on this module
  cal = calibrated.for_hardware(hw)
  spec = str(spec_lib.parse(kv_compression))
  tb = kv_token_bytes(config, spec, T, dtype)
  label, g = mesh_label(mesh), num_devices(mesh)
  conc = analytic.concurrency(config, T, hw, g, dtype, convention, kv_token_bytes=tb)
  prefill_s = analytic.prefill_seconds(config, T, hw, g, dtype, convention)
  compute = lambda b: analytic.decode_step_seconds(config, b, T, hw, g, dtype, convention,
                                                   kv_token_bytes=tb)
  kv_user = analytic.kv_bytes_per_user(config, T, dtype, tb)
  users, shortfall, switch_s = conc.users, conc.shortfall_bytes / g, None
  blocks = _kv_layers(config)
  transfer = lambda b: 0.0
  if offloaded(spec):  # every step brings each user's cache over the host link
    transfer = lambda b: b * kv_user / g / hw.host_bandwidth
    free = hw.hbm_bytes - analytic.weight_bytes(config, dtype, convention) / g
    users, shortfall = _fit_offloaded(hw, free, 0.0, 2 * kv_user / g / blocks, 0.0,
                                      kv_user / g)
    # A one-pass prefill streams each layer's block in and back out once.
    prefill_s = overlapped_seconds(prefill_s, 2 * kv_user / g / hw.host_bandwidth, blocks)
    switch_s = 0.0  # both users' caches already live in host memory
  step = lambda b: overlapped_seconds(compute(b), transfer(b), blocks)
  tokens_s, sessions_h = _sessions(users, 1, prefill_s, generated_tokens, step)
  return Metrics(
      config.name, hw.name, label, g, T, B, "analytic",
      kv_bytes_per_user_per_device=0.0 if offloaded(spec) else kv_user / g,
      kv_bytes_per_user_total=kv_user,
      weight_bytes_per_device=analytic.weight_bytes(config, dtype, convention) / g,
      decode_temp_bytes_per_device=0.0, prefill_temp_bytes_per_device=0.0,
      concurrency=users, shortfall_bytes_per_device=shortfall,
      prefill_flops_per_device=analytic.prefill_flops(config, T, convention) / g,
      prefill_s=prefill_s,
      decode_bytes_per_device=analytic.decode_step_bytes(config, B, T, dtype, convention,
                                                         kv_token_bytes=tb) / g,
      decode_step_s=step(B),
      context_switch_s=switch_s if switch_s is not None else analytic.context_switch_seconds(
          config, T, hw, dtype, kv_token_bytes=tb),
      generated_tokens=generated_tokens, decode_tokens_per_s=tokens_s,
      sessions_per_hour=sessions_h,
      prefill_s_calibrated=prefill_s / cal.matmul_efficiency_for(dtype),
      decode_step_s_calibrated=overlapped_seconds(compute(B) / cal.memory_efficiency,
                                                  transfer(B), blocks),
      calibration_source=cal.source, kv_compression=spec,
      decode_step_s_serial=compute(B) + transfer(B),
      host_bytes_per_user_per_device=kv_user / g if offloaded(spec) else 0.0)


def _kv_layers(config: ModelConfig) -> int:
  """Cache layers (blocks a streamed step fetches): L, or L / s with
  cross-layer KV sharing."""
  return getattr(config, "num_kv_layers", config.num_layers)


# Bytes each device sends per byte of the buffer a collective is counted by
# (lctx.cost.hlo: an all-gather by its output, every other kind by its input),
# for p participants; see roofline_seconds.
RING_FACTORS = {
    "all-reduce": lambda p: 2 * (p - 1) / p,  # reduce-scatter, then all-gather
    "all-gather": lambda p: (p - 1) / p,  # of the gathered (output) buffer
    "reduce-scatter": lambda p: (p - 1) / p,  # of the input buffer
    "all-to-all": lambda p: (p - 1) / p,  # keeps 1/p of its buffer, sends the rest
    "collective-permute": lambda p: 1.0,  # its whole buffer to one peer
    "collective-broadcast": lambda p: 1.0,  # pipelined along a chain: bytes once per link
}


def collective_seconds(kind: str, nbytes: float, participants: int, hw,
                       latency: float | None = None, efficiency: float = 1.0) -> float:
  """One collective of `kind` over `participants` devices, counted by `nbytes`
  (see RING_FACTORS): latency (default hw.collective_latency) + factor(p) x
  nbytes / (efficiency x hw.interconnect_bandwidth) (per direction; the
  calibrated mode passes its own latency and efficiency); nothing when p = 1."""
  if kind not in RING_FACTORS:
    raise ValueError(f"unknown collective kind {kind!r}; known: {sorted(RING_FACTORS)}")
  if participants <= 1:
    return 0.0
  bandwidth = efficiency * hw.interconnect_bandwidth
  return ((hw.collective_latency if latency is None else latency)
          + RING_FACTORS[kind](participants) * nbytes / bandwidth)


def roofline_seconds(costs: hlo.Costs, hw, dtype: str) -> float:
  """Sum over ops of max(FLOPs / peak, bytes / HBM bandwidth), plus every
  collective (x its count: loop trips multiply) at

      t = collective_latency + f(p) x bytes / interconnect_bandwidth

  with p its participants and interconnect_bandwidth one direction of one
  device's links. f is the ring algorithm's traffic per device (RING_FACTORS):
  all-reduce 2(p-1)/p x its buffer; all-gather (p-1)/p x its OUTPUT (the
  gathered buffer); reduce-scatter (p-1)/p x its INPUT; all-to-all (p-1)/p x
  its buffer; collective-permute and collective-broadcast 1 x their buffer. A
  collective over one device (p = 1) costs nothing. These are NCCL's "bus
  bandwidth" factors (nccl-tests doc/PERFORMANCE.md: busBw = algBw x 2(n-1)/n
  for AllReduce, (n-1)/n for AllGather, ReduceScatter and AlltoAll, 1 for
  Broadcast and Reduce) and the cost model of 'How to Scale Your Model'
  (JAX scaling book, 2025; sharding and GPU chapters: AllGather / ReduceScatter
  ~ bytes / W_unidirectional, AllReduce twice that, plus ~1 us per ICI hop when
  latency-bound). Compute and communication add: no overlap is assumed."""
  peak, bw = hw.flops(dtype), hw.hbm_bandwidth
  compute = sum(max(flops / peak, nbytes / bw) for flops, nbytes, _, _ in costs.ops.values())
  comm = sum(count * collective_seconds(kind, nbytes, p, hw)
             for kind, nbytes, p, count in costs.collective_ops)
  return compute + comm


def step_args(kind: str, B: int, T: int) -> tuple:
  """Abstract token (and, for prefill, length) arguments of an engine step."""
  if kind == "prefill":
    return (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))
  return (jax.ShapeDtypeStruct((B,), jnp.int32),)


# Weight dtypes a program can be costed with beyond the config's own: fp8
# linear-layer weights (e4m3, as served by TensorRT-LLM / vLLM fp8
# checkpoints; embeddings and lm_head stay in the config's dtype).
COST_WEIGHT_DTYPES = ("float8",)


def _with_weight_dtype(params, weight_dtype: str | None):
  if weight_dtype is None:
    return params
  if weight_dtype not in COST_WEIGHT_DTYPES:
    raise ValueError(f"weight_dtype={weight_dtype!r}; allowed: None or one of "
                     f"{COST_WEIGHT_DTYPES}")
  fp8 = lambda layers: {k: (jax.ShapeDtypeStruct(v.shape, jnp.float8_e4m3fn)
                            if k.startswith("w_") else v) for k, v in layers.items()}
  return {**params, **{k: fp8(params[k]) for k in STACKED if k in params}}


def _once(fn):
  """Memoizes fn (hashable arguments) so that each key is computed once, even
  when several threads ask for it together (a sweep compiles on a thread
  pool, and rows share programs: functools.lru_cache would compile twice)."""
  results, locks, guard = {}, {}, threading.Lock()
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    # Keyed by every parameter's value, defaults applied: f(a) and f(a, None) share one entry.
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    key = tuple(bound.arguments.items())
    with guard:
      lock = locks.setdefault(key, threading.Lock())
    with lock:
      if key not in results:
        results[key] = fn(*args, **kwargs)
    return results[key]
  return wrapped


@_once
def program_costs(config: ModelConfig, mesh: str, T: int, B: int, kind: str,
                  weight_dtype: str | None = None, chunk: int | None = None,
                  kv_compression: str = "") -> hlo.Costs:
  """Per-device costs of lctx's `kind` step for B users at cache capacity T on
  `mesh`, from abstract shapes. Compiled once per shape: a sweep reuses them.
  weight_dtype 'float8': the linear layers' weights are stored in fp8 e4m3
  (cost only: the model converts them to its compute dtype, which XLA fuses
  into the matmul's read, so bytes are the fp8 bytes; FLOPs are the same).
  chunk: a prefill run C tokens at a time (transformer.prefill).
  kv_compression: the cache's compression spec (canonical string); with
  token eviction the cache holds the kept slots (cache_slots) and the
  prefill scores and evicts inside the program. Raises ValueError for
  another weight_dtype."""
  plan = sharding.Plan(config, sharding.make_mesh(mesh))
  slots = cache_slots(config, kv_compression, T)
  plan.check(batch=B, capacity=slots, prompt_len=T if kind == "prefill" else None,
             compressed=kv_compression)
  params = _with_weight_dtype(abstract_params(config), weight_dtype)
  cache = abstract_cache(config, B, slots, kv_compression=kv_compression)
  step = engine.sharded_step(kind, plan, params, cache,
                             chunk=chunk if kind == "prefill" else None)
  return hlo.analyze(step.lower(params, *step_args(kind, B, T), cache))


def interpolate_costs(a: hlo.Costs, b: hlo.Costs, Ta: int, Tb: int,
                      T: int) -> hlo.Costs | None:
  """hlo.Costs at cache length T from the same program compiled at Ta < T < Tb:
  a decode step's per-op FLOPs and bytes, its collectives' bytes and its peak
  temporaries (a layer's cache slice) are affine in the cache length (its
  attention reads and scores grow with it; nothing else does), so the line
  through the two ends is exact when the two programs have the same ops,
  kernels and collectives; None otherwise (the caller compiles T itself)."""
  if (set(a.ops) != set(b.ops) or a.kernels != b.kernels
      or a.kernels_compiled != b.kernels_compiled or set(a.collectives) != set(b.collectives)
      or [(k, p, n) for k, _, p, n in a.collective_ops]
      != [(k, p, n) for k, _, p, n in b.collective_ops]):
    return None
  w = (T - Ta) / (Tb - Ta)
  line = lambda x, y: x + w * (y - x)
  out = hlo.Costs()
  out.ops = {k: line(a.ops[k], b.ops[k]) for k in a.ops}
  out.kernels, out.kernels_compiled = dict(a.kernels), dict(a.kernels_compiled)
  out.collective_ops = [(k, line(x, y[1]), p, n)
                        for (k, x, p, n), y in zip(a.collective_ops, b.collective_ops)]
  out.collectives.update({k: line(a.collectives[k], b.collectives[k]) for k in a.collectives})
  for f in ("flops", "transcendentals", "bytes_upper", "bytes_ideal", "host_transfer_bytes",
            "temp_bytes", "copy_bytes"):
    setattr(out, f, line(getattr(a, f), getattr(b, f)))
  out.unknown_trip_counts = max(a.unknown_trip_counts, b.unknown_trip_counts)
  return out


@_once
def swap_costs(config: ModelConfig, mesh: str, T: int, kv_compression: str = "") -> hlo.Costs:
  """Per-device costs of a context switch on `mesh` (no data axis): one user's
  cache of capacity T (every array of a compressed one, as stored) copied
  from device to pinned host memory while another's comes back, as a jitted
  program over JAX memory kinds."""
  plan = sharding.Plan(config, sharding.make_mesh(mesh))
  cache = abstract_cache(config, 1, cache_slots(config, kv_compression, T),
                         kv_compression=kv_compression)
  shardings = plan.cache_shardings(cache)
  arrays = jax.tree.leaves(cache_arrays(cache))
  placed = jax.tree.leaves(cache_arrays(shardings))
  # XLA's partitioner rejects a host placement of a replicated array on a
  # multi-device mesh (a RET_CHECK; a compressed cache's per-row counts or
  # cross-head scales): those move whole on every device, counted below.
  # An offloaded cache's arrays already live in host memory: nothing moves.
  kept = [(x, p) for x, p in zip(arrays, placed) if p.memory_kind != "pinned_host"]
  if not kept:
    return hlo.Costs()
  arrays, placed = zip(*kept)
  split = [(x, p) for x, p in zip(arrays, placed)
           if p.num_devices == 1 or not p.is_fully_replicated]
  whole = sum(x.size * jnp.dtype(x.dtype).itemsize for x, p in zip(arrays, placed)
              if p.num_devices > 1 and p.is_fully_replicated)
  kv = [x for x, _ in split]
  on_device = [p for _, p in split]
  on_host = [p.with_memory_kind("pinned_host") for p in on_device]

  def swap(leaving, returning):
    return jax.device_put(leaving, on_host), jax.device_put(returning, on_device)

  step = jax.jit(swap, in_shardings=(on_device, on_host), out_shardings=(on_host, on_device))
  costs = hlo.analyze(step.lower(kv, kv))
  costs.host_transfer_bytes += 2 * whole  # one copy out, one in
  return costs


def chunk_used(mesh: str | int, T: int, prefill_chunk: int | None) -> int:
  """The prefill chunk a row at context T uses: 0 (one pass) when none is
  asked or when it covers the prompt."""
  return prefill_chunk if prefill_chunk and prefill_chunk < T else 0


def programs(config: ModelConfig, mesh: str | int, T: int, B: int, dtype: str,
             prefill_chunk: int | None = None,
             decode_span: tuple[int, int] | None = None,
             kv_compression="") -> dict[str, tuple[str, int, hlo.Costs]]:
  """kind -> (mesh, batch, costs) of the programs behind a row: one user's
  prefill on its replica (run prefill_chunk tokens at a time: chunk_used),
  a decode step of B users on the whole mesh, and a context switch (one
  user's cache out to host memory, another's in). decode_span (lo, hi): a
  sweep's shortest and longest context; on a mesh without a seq axis, a
  decode step in between is interpolated from the steps compiled at lo and hi
  (interpolate_costs; exact there, tests/test_metrics.py), compiled itself
  when those two differ in structure. On seq meshes the decode step's peak
  temporaries are not affine in T (the chord ran 5-9% high), so it compiles.
  kv_compression: every program runs with the compressed cache (its spec)."""
  config = config.replace(param_dtype=dtype, dtype=dtype)
  spec = str(spec_lib.parse(kv_compression))
  label, replica = mesh_label(mesh), replica_mesh(mesh)
  d = sharding.parse_mesh_spec(label)["data"]
  if B % d:
    raise ValueError(f"batch {B} must be a multiple of the mesh's data size {d} "
                     f"(mesh {label})")
  chunk = chunk_used(mesh, T, prefill_chunk) or None
  decode_at = lambda t: program_costs(config, label, t, B, "decode", None, None, spec)
  decode = None
  seq = sharding.parse_mesh_spec(label)["seq"]
  if decode_span is not None and seq == 1 and decode_span[0] < T < decode_span[1]:
    lo, hi = decode_span
    decode = interpolate_costs(decode_at(lo), decode_at(hi), lo, hi, T)
  return {"prefill": (replica, 1, program_costs(config, replica, T, 1, "prefill", None, chunk,
                                               spec)),
          "decode": (label, B, decode or decode_at(T)),
          "swap": (replica, 1, swap_costs(config, replica, T, spec))}


def per_device_bytes(tree, shardings) -> float:
  """Bytes one device holds of a tree of (abstract) arrays laid out by `shardings`."""
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def from_hlo(config: ModelConfig, hw, mesh: str | int, T: int, B: int = 1,
             dtype: str = "bfloat16", generated_tokens: int = 1000,
             prefill_chunk: int | None = None,
             decode_span: tuple[int, int] | None = None, kv_compression="") -> Metrics:
  """Metrics of the programs lctx compiles for `mesh` (abstract shapes only).
  B must be a multiple of the mesh's data size. prefill_chunk: a server's
  prefill chunk (chunk_used): the prefill's FLOPs, time and temporaries (which
  bound concurrency) are the chunked program's. decode_span: see programs.
  kv_compression: a compressed cache (its physical bytes, its programs)."""
  from lctx.cost import calibrated  # it builds on this module
  spec = str(spec_lib.parse(kv_compression))
  runs = programs(config, mesh, T, B, dtype, prefill_chunk, decode_span, spec)
  prefill, decode, swap = (runs[kind][2] for kind in ("prefill", "decode", "swap"))
  prefill_temp = prefill.temp_bytes
  cal = calibrated.for_hardware(hw)
  config = config.replace(param_dtype=dtype, dtype=dtype)
  label = mesh_label(mesh)
  d = sharding.parse_mesh_spec(label)["data"]
  plan = sharding.Plan(config, sharding.make_mesh(replica_mesh(mesh)))
  params = abstract_params(config)
  one_user = abstract_cache(config, 1, cache_slots(config, spec, T), kv_compression=spec)
  weights = per_device_bytes(params, plan.param_shardings(params))
  cache_shardings = plan.cache_shardings(one_user)
  arrays, placed = jax.tree.leaves(cache_arrays(one_user)), jax.tree.leaves(
      cache_arrays(cache_shardings))
  on_host = [p.memory_kind == "pinned_host" for p in placed]
  kv = per_device_bytes([x for x, h in zip(arrays, on_host) if not h],
                        [p for p, h in zip(placed, on_host) if not h])
  host_kv = per_device_bytes([x for x, h in zip(arrays, on_host) if h],
                             [p for p, h in zip(placed, on_host) if h])
  blocks = _kv_layers(config)
  # A decode step's temporaries: a layer's weight slices (fixed) and each
  # user's slice of one layer's cache, which a scanned step copies out before
  # its matmuls (see hlo.peak_bytes); measured at B users, split by that rule.
  # A streamed (offload) cache: two layer blocks per user in flight.
  per_user = (kv + 2 * host_kv) / blocks
  fixed = max(decode.temp_bytes - (B // d) * per_user, 0.0)
  if host_kv:
    users, shortfall = _fit_offloaded(hw, hw.hbm_bytes - weights - kv, fixed, per_user,
                                      prefill_temp, host_kv)
  else:
    users, shortfall = _fit(hw.hbm_bytes, weights, kv, fixed, per_user, prefill_temp)
  compute_s = roofline_seconds(decode, hw, dtype)
  transfer_s = decode.host_transfer_bytes / hw.host_bandwidth
  step_s = overlapped_seconds(compute_s, transfer_s, blocks)
  # Another user in the batch reads its cache once more (the measured step is
  # at B; under cross-layer KV sharing every layer of a group reads the
  # group's cache layer: kv_reads); a streamed one also brings it over the host link.
  reads = analytic.kv_reads(config)
  step = lambda b: overlapped_seconds(
      compute_s + (b - B) / d * (kv + host_kv) * reads / hw.hbm_bandwidth,
      transfer_s * b / B, blocks)
  # A streamed cache's prefill fetches every layer's block per chunk (and
  # writes the chunk back): overlapped with each layer's compute as in decode.
  prefill_blocks = blocks * max(-(-T // (chunk_used(mesh, T, prefill_chunk) or T)), 1)
  prefill_transfer_s = prefill.host_transfer_bytes / hw.host_bandwidth
  prefill_s = overlapped_seconds(roofline_seconds(prefill, hw, dtype), prefill_transfer_s,
                                 prefill_blocks)
  tokens_s, sessions_h = _sessions(users * d, d, prefill_s, generated_tokens, step)
  return Metrics(
      config.name, hw.name, label, num_devices(mesh), T, B, "hlo",
      kv_bytes_per_user_per_device=kv,
      kv_bytes_per_user_total=sum(x.size * x.dtype.itemsize
                                  for x in jax.tree.leaves(cache_arrays(one_user))),
      weight_bytes_per_device=weights,
      decode_temp_bytes_per_device=decode.temp_bytes,
      prefill_temp_bytes_per_device=prefill_temp,
      concurrency=users * d, shortfall_bytes_per_device=shortfall,
      prefill_flops_per_device=prefill.flops, prefill_s=prefill_s,
      decode_bytes_per_device=decode.bytes_ideal, decode_step_s=step_s,
      # Each device moves its own share of the two caches over its own link.
      context_switch_s=swap.host_transfer_bytes / hw.host_bandwidth,
      generated_tokens=generated_tokens, decode_tokens_per_s=tokens_s,
      sessions_per_hour=sessions_h,
      prefill_s_calibrated=overlapped_seconds(calibrated.calibrated_seconds(
          prefill, hw, dtype, cal), prefill_transfer_s, prefill_blocks),
      decode_step_s_calibrated=overlapped_seconds(
          calibrated.calibrated_seconds(decode, hw, dtype, cal), transfer_s, blocks),
      calibration_source=cal.source, prefill_chunk=chunk_used(mesh, T, prefill_chunk),
      kv_compression=spec, decode_step_s_serial=compute_s + transfer_s,
      host_bytes_per_user_per_device=host_kv)


RATIO_FIELDS = ("kv_bytes_per_user_per_device", "weight_bytes_per_device", "concurrency", "prefill_s",
                "decode_step_s", "context_switch_s", "decode_tokens_per_s", "sessions_per_hour")


def ratios(analytic_row: Metrics, hlo_row: Metrics) -> dict[str, float | None]:
  """hlo / analytic for each headline field (None where the closed form is 0)."""
  return {f: (getattr(hlo_row, f) / getattr(analytic_row, f) if getattr(analytic_row, f)
              else None) for f in RATIO_FIELDS}
