"""Token eviction methods (lctx.cache.evict.base: the scorer / selector
contract). One file per method; METHODS maps spec names to them."""

from __future__ import annotations

from lctx.cache.evict.base import Method
from lctx.cache.evict.h2o import H2O
from lctx.cache.evict.keyformer import Keyformer
from lctx.cache.evict.knorm import Knorm
from lctx.cache.evict.observed_attention import ObservedAttention
from lctx.cache.evict.oracle import AntiOracle, Oracle
from lctx.cache.evict.random import Random
from lctx.cache.evict.snapkv import SnapKV
from lctx.cache.evict.streaming_llm import StreamingLLM
from lctx.cache.evict.tova import TOVA

METHODS: dict[str, Method] = {m.name: m for m in (
    StreamingLLM(), H2O(), SnapKV(), TOVA(), Keyformer(), Knorm(), ObservedAttention(), Random(),
    Oracle(), AntiOracle())}


def method(policy) -> Method:
  """The Method of an eviction Policy."""
  return METHODS[policy.name]

from lctx.cache import spec as _spec  # noqa: E402

_spec.register(METHODS)


def check_format(policy, fmt) -> None:
  """ValueError when eviction cannot run on a quantized cache format: keys
  stored before RoPE (KVQuant) are rotated by slot at read time, which
  compacted slots no longer match; decoding with eviction overwrites single
  slots per KV head, which only the dense cache does here."""
  if fmt is None:
    return
  name = fmt.spec
  if fmt.pre_rope:
    raise ValueError(f"eviction {policy.name!r} with {name!r}: keys stored before RoPE are "
                     f"rotated by their slot, which eviction reorders; allowed with eviction: "
                     f"int8, int4, fp8, kivi")
  if dict(policy.params).get("decode") == "evict":
    raise ValueError(f"eviction {policy.name!r} with decode=evict and {name!r}: decoding "
                     f"with eviction overwrites single slots of a dense cache; allowed: "
                     f"decode=append with a quantized cache, or no quantization")
  if dict(policy.params).get("positions") == "cache":
    raise ValueError(f"eviction {policy.name!r} with positions=cache and {name!r}: re-rotating "
                     f"kept keys needs them in full precision; allowed: positions=original")
