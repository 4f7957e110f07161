"""Symmetric absmax integer quantization of the KV cache: int8 and int4.

Each token's key and value vectors are quantized on their own (per-token
scales, as in KIVI's value path and TensorRT-LLM / vLLM's int8 KV cache):
scale = absmax / qmax over a group of `group` channels (0: the whole head) of
one KV head (`scale=head`) or of every KV head (`scale=token`), qmax = 127
(int8) or 7 (int4, codes in [-7, 7] stored as 4-bit offsets, two per byte:
channel c in the low nibble, channel c + H/2 in the high one). code =
round(x / scale), x' = code * scale: the error is at most half a step
(scale / 2) per element. Scales are stored in the compute dtype, rounded up
(base.round_up_scale) so no code leaves the range.

Arrays per layer: keys "codes" [B, K, H, S] int8 (int4: [B, K, H/2, S]
uint8) and "scale" [B, K or 1, H/group, S]; values "codes" [B, K, S, H]
(int4: [B, K, S, H/2]) and "scale" [B, K or 1, S, H/group].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lctx.cache.quant.base import SlotFormat, round_up_scale, unpack_parts

_CHANNEL = {"k": 2, "v": 3}  # the channel (head_dim) axis of a key / value array of one layer


@dataclasses.dataclass(frozen=True)
class Absmax(SlotFormat):
  num_kv_heads: int
  head_dim: int
  dtype: str
  bits: int = 8  # 8 or 4
  group: int = 0  # channels per scale; 0: the whole head
  scale: str = "head"  # "head" | "token"
  spec: str = "int8"

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1

  @property
  def _group(self) -> int:
    return self.group or self.head_dim

  def encode(self, side, x):
    c, g = _CHANNEL[side], self._group
    xf = x.astype(jnp.float32)
    # [..., H, ...] -> [..., H/g, g, ...]: amax over each group (and over the KV heads).
    shape = xf.shape[:c] + (self.head_dim // g, g) + xf.shape[c + 1:]
    grouped = xf.reshape(shape)
    amax = jnp.abs(grouped).max(axis=(c + 1, 1) if self.scale == "token" else c + 1,
                                keepdims=True)
    scale = round_up_scale(amax / self.qmax, self.dtype)
    s32 = scale.astype(jnp.float32)
    codes = jnp.round(grouped / jnp.where(s32 > 0, s32, 1.0))
    codes = jnp.clip(codes, -self.qmax, self.qmax).reshape(xf.shape)
    return {"codes": self._pack(codes, c), "scale": jnp.squeeze(scale, c + 1)}

  def decode(self, side, entries):
    c, g = _CHANNEL[side], self._group
    codes = self._unpack(entries["codes"], c).astype(jnp.float32)
    scale = jnp.repeat(entries["scale"].astype(jnp.float32), g, axis=c)
    return (codes * scale).astype(self.dtype)

  def _pack(self, codes, c):
    if self.bits == 8:
      return codes.astype(jnp.int8)
    u = (codes + 8).astype(jnp.uint8)  # [-7, 7] -> [1, 15]
    lo, hi = jnp.split(u, 2, axis=c)
    return lo | (hi << 4)

  def _unpack(self, packed, c):
    if self.bits == 8:
      return packed
    return unpack_parts(packed, 4, c).astype(jnp.int8) - 8

  def bytes_per_token(self) -> float:
    K, H = self.num_kv_heads, self.head_dim
    scales = (K if self.scale == "head" else 1) * (H // self._group)
    return 2 * (K * H * self.bits / 8 + scales * jnp.dtype(self.dtype).itemsize)
