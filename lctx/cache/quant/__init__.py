"""Quantized KV-cache formats, one per file, built from a parsed policy."""

from __future__ import annotations

from lctx.cache.quant.base import Format, View


def make_format(policy, config, capacity: int | None = None) -> Format | None:
  """The format of a quantization policy (lctx.cache.spec.Policy) for a model
  config; None where the policy keeps every token of a `capacity`-slot cache
  in full precision (kivi: residual >= capacity; kvquant: sinks >=
  capacity): that cache is the dense one, byte for byte."""
  common = dict(num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=config.dtype,
                spec=str(policy))
  name = policy.name
  if name in ("int8", "int4"):
    from lctx.cache.quant.absmax import Absmax
    return Absmax(**common, bits=8 if name == "int8" else 4, group=policy["group"],
                  scale=policy["scale"])
  if name == "fp8":
    from lctx.cache.quant.fp8 import Fp8
    return Fp8(**common, scale=policy["scale"], format=policy["format"])
  if name == "kivi":
    if capacity is not None and policy["residual"] >= capacity:
      return None
    from lctx.cache.quant.kivi import Kivi
    return Kivi(**common, bits=policy["bits"], group=policy["group"],
                residual=policy["residual"])
  if name == "kvquant":
    if capacity is not None and policy["sinks"] >= capacity:
      return None
    from lctx.cache.quant.kvquant import KVQuant
    return KVQuant(**common, bits=policy["bits"], outliers=policy["outliers"],
                   sinks=policy["sinks"])
  raise ValueError(f"kv_compression policy {name!r} has no cache format")


__all__ = ["Format", "View", "make_format"]
