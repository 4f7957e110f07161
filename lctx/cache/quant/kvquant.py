"""KVQuant-style KV cache: pre-RoPE per-channel keys, per-token values,
dense-and-sparse outliers and full-precision attention sinks.

After KVQuant (Hooper et al. 2024, arXiv 2401.18079), with its uniform
variant: codes are symmetric absmax integers (qmax = 2^(bits-1) - 1: 127,
7 or 1), not KVQuant's non-uniform (sensitivity-weighted k-means) datatype,
and calibration is online rather than offline.

- Keys are quantized per channel BEFORE RoPE (KVQuant's "pre-RoPE key
  quantization": channel outliers are aligned before the rotation mixes
  channel pairs): one float32 scale per (row, KV head, channel), [B, K, H, 1],
  set by the first write that sees a nonzero amax in that channel (amax over
  the real tokens' non-outlier entries; sink and padding tokens excluded):
  the prompt calibrates it, as KVQuant calibrates its per-channel ranges
  offline, and with chunked prefill the first chunk does (so the key codes
  of a chunked prefill differ from a one-pass prefill's, whose range is the
  whole prompt's; every other array, and the key codes given the same range,
  are the same). Later entries beyond the calibrated range are clipped to
  +-qmax * scale (outliers aside).
  Attention rotates each dequantized key block at its positions (slot =
  position), `sources(..., rotate)`.
- Values are quantized per token: absmax per (token, KV head) over the
  non-outlier channels, the scale [B, K, S, 1] in the compute dtype, rounded
  up (base.round_up_scale) so no code leaves the range.
- Outliers (dense-and-sparse): per vector (one token, one KV head, H
  channels) the n_out = ceil(outliers * H) entries largest in magnitude
  (ties: the lower channel) are kept exactly, "outlier_values" in the compute
  dtype and "outlier_index" uint8 (int16 if H > 256): keys [B, K, n_out, S],
  values [B, K, S, n_out]. They are zeroed before quantization (code 0) and
  scattered back after dequantization. KVQuant picks outliers per channel
  with calibrated thresholds; here they are the top n_out of each vector, so
  every vector costs the same and the arrays are static.
- Sinks: the first `sinks` tokens (positions 0 .. sinks - 1) are kept in
  full precision in "sink" buffers, keys [B, K, H, sinks] (pre-RoPE) and
  values [B, K, sinks, H] (KVQuant's "attention sink-aware quantization"
  keeps the first token in fp16). Their quantized slots are written but
  never read.

Codes: bits 8: int8; bits 4 and 2: unsigned offsets code + 2^(bits-1) packed
p = 8 / bits per byte along the channels: with Hp = ceil(H / p) bytes per
vector (channels zero-padded to p Hp), channel c lives in byte c mod Hp, bits
[(c // Hp) bits, (c // Hp + 1) bits) (for int4: channel c in the low nibble,
c + H/2 in the high one, as lctx.cache.quant.absmax).

Arrays per layer: keys "codes" [B, K, Hp, S] ("scale" [B, K, H, 1] float32,
"outlier_values" / "outlier_index" [B, K, n_out, S], "sink" [B, K, H, sinks]);
values "codes" [B, K, S, Hp], "scale" [B, K, S, 1], "outlier_values" /
"outlier_index" [B, K, S, n_out], "sink" [B, K, sinks, H]. No outlier arrays
when n_out = 0, no sink arrays when sinks = 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lctx.cache.quant.base import Format, View, round_up_scale, unpack_parts
from lctx.cache.segments import Blocks

_CHANNEL = {"k": 2, "v": 3}  # the channel axis of a side's [B, K, ., .] array
_SLOT = {"k": 3, "v": 2}  # its slot axis


@dataclasses.dataclass(frozen=True)
class KVQuant(Format):
  num_kv_heads: int
  head_dim: int
  dtype: str  # the compute dtype: sinks, outliers, value scales and reads
  bits: int = 4  # 2, 4 or 8
  outliers: float = 0.01  # fraction of each vector's channels kept exactly, in [0, 0.5)
  sinks: int = 1  # first tokens kept in full precision
  spec: str = "kvquant"

  pre_rope = True

  def __post_init__(self):
    if self.bits not in (2, 4, 8):
      raise ValueError(f"kvquant bits={self.bits}; allowed: 2, 4, 8")
    if not 0 <= self.outliers < 0.5:
      raise ValueError(f"kvquant outliers={self.outliers}; allowed: a float in [0, 0.5)")
    if self.sinks < 0:
      raise ValueError(f"kvquant sinks={self.sinks}; allowed: an int >= 0")

  # ---- sizes ------------------------------------------------------------------------

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1

  @property
  def _inv_qmax(self):
    """1 / qmax in float32: scales are amax * (1 / qmax), as XLA computes a
    division by a constant anyway (written out, so references can match it)."""
    return jnp.float32(1 / self.qmax)

  @property
  def n_out(self) -> int:
    """Outliers per vector: ceil(outliers * H) (an fp product within 1e-9 of
    an integer counts as that integer: 0.1 * 30 is 3, not 4)."""
    return math.ceil(self.outliers * self.head_dim - 1e-9)

  @property
  def _per_byte(self) -> int:
    return 8 // self.bits

  @property
  def packed_dim(self) -> int:
    """Bytes per quantized vector: ceil(H / (8 / bits))."""
    return -(-self.head_dim // self._per_byte)

  @property
  def index_dtype(self):
    return jnp.uint8 if self.head_dim <= 256 else jnp.int16

  def _itemsize(self, dtype) -> int:
    return jnp.dtype(dtype).itemsize

  def bytes_per_token(self) -> int:
    K = self.num_kv_heads
    per_vector = self.packed_dim + self.n_out * (self._itemsize(self.dtype) +
                                                 self._itemsize(self.index_dtype))
    return 2 * K * per_vector + K * self._itemsize(self.dtype)  # + the value scale

  def fixed_bytes(self, batch: int) -> int:
    K, H = self.num_kv_heads, self.head_dim
    return batch * K * H * 4 + 2 * batch * K * self.sinks * H * self._itemsize(self.dtype)

  # ---- arrays -----------------------------------------------------------------------

  def _layout(self, side, batch, n, x):
    """[B, K, x, n] (keys) or [B, K, n, x] (values)."""
    K = self.num_kv_heads
    return (batch, K, x, n) if side == "k" else (batch, K, n, x)

  def init_layer(self, batch, capacity):
    H, dt = self.head_dim, self.dtype
    sides = []
    for side in ("k", "v"):
      d = {"codes": jnp.zeros(self._layout(side, batch, capacity, self.packed_dim),
                              jnp.int8 if self.bits == 8 else jnp.uint8)}
      d["scale"] = (jnp.zeros((batch, self.num_kv_heads, H, 1), jnp.float32) if side == "k"
                    else jnp.zeros(self._layout("v", batch, capacity, 1), dt))
      if self.n_out:
        d["outlier_values"] = jnp.zeros(self._layout(side, batch, capacity, self.n_out), dt)
        d["outlier_index"] = jnp.zeros(self._layout(side, batch, capacity, self.n_out),
                                       self.index_dtype)
      if self.sinks:
        d["sink"] = jnp.zeros(self._layout(side, batch, self.sinks, H), dt)
      sides.append(d)
    return tuple(sides)

  # ---- encoding ---------------------------------------------------------------------

  def split_outliers(self, side, x):
    """x [B, K, H, n] (keys) or [B, K, n, H] (values) -> (inliers: x with
    each vector's n_out largest-magnitude entries zeroed, float32; outlier
    values (compute dtype) and channel indices, n_out along the channel
    axis)."""
    c = _CHANNEL[side]
    xl = jnp.moveaxis(x.astype(jnp.float32), c, -1)  # [..., H]
    if not self.n_out:
      return x.astype(jnp.float32), None, None
    _, idx = jax.lax.top_k(jnp.abs(xl), self.n_out)  # ties: the lower channel first
    vals = jnp.take_along_axis(xl, idx, axis=-1)
    inl = jnp.put_along_axis(xl, idx, 0.0, axis=-1, inplace=False)
    back = lambda a: jnp.moveaxis(a, -1, c)
    return back(inl), back(vals).astype(self.dtype), back(idx).astype(self.index_dtype)

  def key_amax(self, inliers, real):
    """Per-channel amax [B, K, H, 1] of key inliers [B, K, H, n] over real slots [B, n]."""
    return jnp.where(real[:, None, None, :], jnp.abs(inliers), 0.0).max(axis=3, keepdims=True)

  def quantize(self, side, inliers, scale):
    """Integer codes (float32, in [-qmax, qmax]) of inliers with scale
    (broadcasting; 0: unset, code 0)."""
    s = scale.astype(jnp.float32)
    y = jnp.where(s > 0, inliers / jnp.where(s > 0, s, 1.0), 0.0)
    return jnp.clip(jnp.round(y), -self.qmax, self.qmax)

  def value_scale(self, inliers):
    """Per-token scale [B, K, n, 1] (compute dtype, rounded up) of value inliers [B, K, n, H]."""
    amax = jnp.abs(inliers).max(axis=3, keepdims=True)
    return round_up_scale(amax * self._inv_qmax, self.dtype)

  def pack(self, side, codes):
    """Codes (float32 integers) -> int8, or uint8 with 8 / bits per byte along the channels."""
    if self.bits == 8:
      return codes.astype(jnp.int8)
    c, p, Hp = _CHANNEL[side], self._per_byte, self.packed_dim
    u = (codes + 2 ** (self.bits - 1)).astype(jnp.uint8)
    pad = [(0, 0)] * u.ndim
    pad[c] = (0, p * Hp - self.head_dim)
    u = jnp.pad(u, pad, constant_values=2 ** (self.bits - 1))  # padding channels: code 0
    parts = jnp.split(u, p, axis=c)
    out = parts[0]
    for j, part in enumerate(parts[1:], 1):
      out = out | (part << (j * self.bits))
    return out

  def unpack(self, side, packed):
    """The inverse of pack: codes as int8 [.., H, ..]."""
    if self.bits == 8:
      return packed
    c = _CHANNEL[side]
    u = jax.lax.slice_in_dim(unpack_parts(packed, self.bits, c), 0, self.head_dim, axis=c)
    return u.astype(jnp.int8) - 2 ** (self.bits - 1)

  def dequantize(self, side, codes, scale, values=None, index=None):
    """Packed codes with their scale (and outliers) -> the compute dtype,
    outliers scattered back exactly."""
    x = (self.unpack(side, codes).astype(jnp.float32) * scale.astype(jnp.float32))
    x = x.astype(self.dtype)
    if values is None:
      return x
    # Each outlier put back by a select against the channel index: pointwise,
    # fused into the read (a scatter per block measured 7x slower on XLA:CPU).
    c = _CHANNEL[side]
    shape = [1] * x.ndim
    shape[c] = self.head_dim
    channel = jnp.arange(self.head_dim, dtype=jnp.int32).reshape(shape)
    for j in range(self.n_out):
      at = jax.lax.slice_in_dim(index, j, j + 1, axis=c).astype(jnp.int32)
      value = jax.lax.slice_in_dim(values, j, j + 1, axis=c).astype(self.dtype)
      x = jnp.where(channel == at, value, x)
    return x

  # ---- writes -----------------------------------------------------------------------

  def _write(self, view, k, v, real, put):
    """Encodes keys k [B, K, H, n] and values v [B, K, n, H] and stores every
    per-slot array with put(view, side, name, entries). real [B, n]: the
    slots whose keys may calibrate the key scale."""
    k_in, k_val, k_idx = self.split_outliers("k", k)
    old = view.get("k", "scale")
    k_scale = jnp.where(old > 0, old, self.key_amax(k_in, real) * self._inv_qmax)
    view = view.set("k", "scale", k_scale)
    v_in, v_val, v_idx = self.split_outliers("v", v)
    v_scale = self.value_scale(v_in)
    entries = {"k": {"codes": self.pack("k", self.quantize("k", k_in, k_scale))},
               "v": {"codes": self.pack("v", self.quantize("v", v_in, v_scale)),
                     "scale": v_scale}}
    if self.n_out:
      entries["k"] |= {"outlier_values": k_val, "outlier_index": k_idx}
      entries["v"] |= {"outlier_values": v_val, "outlier_index": v_idx}
    for side, d in entries.items():
      for name, e in d.items():
        view = put(view, side, name, e)
    return view

  def write_prefix(self, view, k, v, lengths):
    return self.write_chunk(view, k, v, 0, lengths)

  def write_chunk(self, view, k, v, start, lengths):
    B, C = v.shape[0], v.shape[2]
    slot = start + jnp.arange(C)
    lengths = jnp.asarray(lengths, jnp.int32)
    real = (slot >= self.sinks)[None, :] & (slot[None, :] < lengths[:, None])
    view = self._write(view, k.astype(self.dtype), v.astype(self.dtype), real,
                       lambda view, side, name, e: view.set_slots(side, name, e, start))
    if self.sinks:  # the chunk's first min(C, sinks) tokens may be sinks; later slots are dropped
      m = min(C, self.sinks)
      slots = jnp.broadcast_to(slot[:m], (B, m))
      view = view.set_tokens("k", "sink", k[:, :, :, :m].astype(self.dtype), slots)
      view = view.set_tokens("v", "sink", v[:, :, :m].astype(self.dtype), slots)
    return view

  def write_token(self, view, k, v, slots_b):
    S = view.size("v", "codes")
    slots_b = jnp.asarray(slots_b, jnp.int32)
    real = ((slots_b >= self.sinks) & (slots_b < S))[:, None]

    def put(view, side, name, e):
      return view.set_token(side, name, jnp.squeeze(e, _SLOT[side]), slots_b)

    k4, v4 = k[..., None].astype(self.dtype), v[:, :, None].astype(self.dtype)
    view = self._write(view, k4, v4, real, put)
    if self.sinks:  # slots >= sinks are dropped
      view = view.set_token("k", "sink", k4[..., 0], slots_b)
      view = view.set_token("v", "sink", v4[:, :, 0], slots_b)
    return view

  # ---- reads ------------------------------------------------------------------------

  def read_slots(self, view, side, lo, n):
    """Dequantized slots [lo, lo + n) of one side, before RoPE for keys."""
    get = lambda name: view.slots(side, name, lo, n)
    scale = view.get("k", "scale") if side == "k" else get("scale")
    if self.n_out:
      return self.dequantize(side, get("codes"), scale, get("outlier_values"),
                             get("outlier_index"))
    return self.dequantize(side, get("codes"), scale)

  def sources(self, view: View, length, rotate=None):
    """Two sources: the sinks (positions 0 .. sinks - 1, in full precision)
    and the quantized slots [sinks, length). Keys are rotated by `rotate`
    (required: they are stored before RoPE)."""
    if rotate is None:
      raise ValueError("KVQuant stores keys before RoPE: sources needs rotate=")
    S, K = view.size("v", "codes"), self.num_kv_heads
    positions = lambda lo, n: lo + jnp.arange(n, dtype=jnp.int32)

    def read(lo, n):
      k = rotate(self.read_slots(view, "k", lo, n), positions(lo, n))
      return k, self.read_slots(view, "v", lo, n)

    def valid(slot):
      lens = jnp.asarray(length, jnp.int32)
      lens = lens[:, None] if lens.ndim else lens
      return (slot >= self.sinks)[None, :] & (slot[None, :] < lens)

    out = []
    if self.sinks:
      def read_sink(lo, n):
        k = rotate(view.slots("k", "sink", lo, n), positions(lo, n))
        return k, view.slots("v", "sink", lo, n)
      out.append(Blocks(read_sink, length, self.sinks, K))
    out.append(Blocks(read, length, S, K, valid))
    return out


__all__ = ["KVQuant"]
