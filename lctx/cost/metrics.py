"""The four long-context metrics, from the closed form and from the compiled HLO.

For a model on g devices (tensor parallel over `model`) serving B users at
context T on a hardware spec: concurrency (HBM size), prefill latency
(FLOP/s), decode step latency (HBM bandwidth) and context-switch latency (host
link), each computed twice: `analytic` (lctx.cost.analytic) and `hlo` (per-op
rooflines over the partitioned program that lctx really compiles, and the
physical per-device bytes of its sharded weights and cache).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lctx import engine, sharding
from lctx.cache.dense import abstract_cache
from lctx.config import ModelConfig
from lctx.cost import analytic, hlo
from lctx.model.params import abstract_params

SOURCES = ("analytic", "hlo")


@dataclasses.dataclass(frozen=True)
class Metrics:
  model: str
  hardware: str
  num_devices: int
  context: int
  batch: int
  source: str
  kv_bytes_per_user: float  # per device
  weight_bytes_per_device: float
  concurrency: int
  shortfall_bytes: float  # HBM missing for one user when concurrency is 0
  prefill_flops_per_device: float
  prefill_s: float
  decode_bytes_per_device: float
  decode_step_s: float
  context_switch_s: float  # one user's KV out and another's in over the host link


def from_closed_form(config: ModelConfig, hw, g: int, T: int, B: int = 1,
                     dtype: str = "bfloat16", convention: str = "exact") -> Metrics:
  conc = analytic.concurrency(config, T, hw, g, dtype, convention)
  return Metrics(
      config.name, hw.name, g, T, B, "analytic",
      kv_bytes_per_user=analytic.kv_bytes_per_user(config, T, dtype) / g,
      weight_bytes_per_device=analytic.weight_bytes(config, dtype, convention) / g,
      concurrency=conc.users, shortfall_bytes=conc.shortfall_bytes,
      prefill_flops_per_device=analytic.prefill_flops(config, T, convention) / g,
      prefill_s=analytic.prefill_seconds(config, T, hw, g, dtype, convention),
      decode_bytes_per_device=analytic.decode_step_bytes(config, B, T, dtype, convention) / g,
      decode_step_s=analytic.decode_step_seconds(config, B, T, hw, g, dtype, convention),
      context_switch_s=analytic.context_switch_seconds(config, T, hw, dtype))


def roofline_seconds(costs: hlo.Costs, hw, dtype: str) -> float:
  """Sum over ops of max(FLOPs / peak, bytes / HBM bandwidth), plus collectives
  over the interconnect with ring formulas (all-reduce 2(p-1)/p, gathers and
  scatters (p-1)/p of the full buffer, a permute its bytes)."""
  peak, bw = hw.flops(dtype), hw.hbm_bandwidth
  compute = sum(max(flops / peak, nbytes / bw) for flops, nbytes, _ in costs.ops.values())
  comm = 0.0
  for kind, nbytes, p, count in costs.collective_ops:
    factor = {"all-reduce": 2 * (p - 1) / p, "collective-permute": 1.0}.get(kind, (p - 1) / p)
    comm += count * factor * nbytes / hw.interconnect_bandwidth
  return compute + comm


@functools.lru_cache(maxsize=None)
def _program_costs(config: ModelConfig, g: int, T: int, B: int, kind: str) -> hlo.Costs:
  """Compiled once per shape: a sweep reuses every program."""
  plan = sharding.Plan(config, sharding.make_mesh(f"model:{g}"))
  params, cache = abstract_params(config), abstract_cache(config, B, T)
  step = engine.sharded_step(kind, plan, params, cache)
  if kind == "prefill":
    args = (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))
  else:
    args = (jax.ShapeDtypeStruct((B,), jnp.int32),)
  return hlo.analyze(step.lower(params, *args, cache))


def per_device_bytes(tree, shardings) -> float:
  """Bytes one device holds of a tree of (abstract) arrays laid out by `shardings`."""
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def from_hlo(config: ModelConfig, hw, g: int, T: int, B: int = 1,
             dtype: str = "bfloat16") -> Metrics:
  """Metrics of the programs lctx compiles for `model:g` (abstract shapes only)."""
  config = config.replace(param_dtype=dtype, dtype=dtype)
  plan = sharding.Plan(config, sharding.make_mesh(f"model:{g}"))
  params, one_user = abstract_params(config), abstract_cache(config, 1, T)
  weights = per_device_bytes(params, plan.param_shardings(params))
  cache_shardings = plan.cache_shardings(one_user)
  kv = per_device_bytes((one_user.k, one_user.v), (cache_shardings.k, cache_shardings.v))
  free = hw.hbm_bytes - weights
  users = max(math.floor(free / kv), 0)
  prefill = _program_costs(config, g, T, 1, "prefill")
  decode = _program_costs(config, g, T, B, "decode")
  return Metrics(
      config.name, hw.name, g, T, B, "hlo", kv_bytes_per_user=kv,
      weight_bytes_per_device=weights, concurrency=users,
      shortfall_bytes=float(kv - free) if users == 0 else 0.0,
      prefill_flops_per_device=prefill.flops, prefill_s=roofline_seconds(prefill, hw, dtype),
      decode_bytes_per_device=decode.bytes_ideal,
      decode_step_s=roofline_seconds(decode, hw, dtype),
      # The whole cache crosses the host link: each device moves its own share.
      context_switch_s=2 * kv / hw.host_bandwidth)
