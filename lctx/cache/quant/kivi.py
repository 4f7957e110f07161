"""KIVI: asymmetric 2/4/8-bit KV cache, keys per channel, values per token,
the most recent tokens in full precision (Liu et al. 2024, arXiv 2402.02750).

Quantization (`quantize` / `dequantize`): a group of G numbers x is stored as
codes c = round((x - zero) / scale) in [0, 2^b - 1], zero = min(x) and
scale = (max(x) - zero) / (2^b - 1), both in the compute dtype; x' = zero +
c * scale (in fp32, then cast to the compute dtype). The zero point is min(x)
rounded *down* to the compute dtype (never above any x, so no code is
negative) and the scale is computed against that stored zero and rounded up
(base.round_up_scale, so no code exceeds 2^b - 1): every element is then
within half of the stored step (scale / 2) of x, up to fp32 rounding, and a
constant group (scale 0) is reconstructed exactly.

Keys are quantized per channel over groups of G consecutive tokens (one
scale/zero per channel per token group), values per token over groups of G
channels (one scale/zero per token per channel group).

Which tokens are quantized is a function of a row's token count n alone:
with R = residual and G = group, tokens [0, nq(n)) are quantized, nq(n) =
G * floor(max(n - R, 0) / G), and tokens [nq(n), n) (between R and R + G - 1
of them once n >= R) are kept in full precision in a ring buffer of W = R + G
slots, token t at ring slot t % W (W is a multiple of G, so a group's ring
slots are contiguous). A group is quantized once, when it leaves the window
(the token count passes gG + G + R), and appended at its slots: the
quantized prefix is never re-quantized (COMPRESSION.md's pitfall).

Arrays per layer (S = capacity, a multiple of G; P = 8 / b codes per byte):
  keys    "codes"    uint8 [B, K, H/P, S]
          "scale"    [B, K, H, S/G], "zero" [B, K, H, S/G]  (compute dtype)
          "residual" [B, K, H, W]                           (compute dtype)
          "count"    int32 [B, 1, 1, 1]: the row's token count as of the
                     last write (see `sources`)
  values  "codes"    uint8 [B, K, S, H/P]
          "scale"    [B, K, S, H/G], "zero" [B, K, S, H/G]
          "residual" [B, K, W, H]
Packing (b < 8): the H channels are split into P contiguous quarters (b = 2)
or halves (b = 4) of H/P channels; byte j holds channel j + p*H/P in bits
[p*b, (p+1)*b), p = 0..P-1 (as absmax's int4: contiguous slices, no
interleaving shuffle). b = 8: one code per byte.

Why "count": a chunk of prefill is written before its queries read the
cache's tokens [0, start) (lctx.model.transformer._format_chunk), and a
chunk may flush groups holding tokens < start whose full-precision copies
the rebuilt ring no longer holds; `sources(view, n)` therefore reads tokens
[0, n) as the cache holds them after the write (quantized below
nq(count), else from the ring), which needs the count the ring was built
for. In decode, n == count.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cache.quant.base import Format, View, round_up_scale, unpack_parts
from lctx.cache.segments import Blocks

def round_down(x_f32, dtype):
  """x_f32 rounded to `dtype`, never up (the stored value is <= x)."""
  stored = x_f32.astype(dtype)
  down = jnp.nextafter(stored, jnp.asarray(-np.inf, dtype))
  return jnp.where(stored.astype(jnp.float32) > x_f32, down, stored)


def quantize(x, bits: int, dtype):
  """Asymmetric min/max quantization of groups along the last axis.

  x: [..., G] any float dtype. Returns (codes [..., G] uint8 in [0, 2^bits - 1],
  unpacked; scale [...] and zero [...] in `dtype`). zero = min rounded down
  to dtype, scale = (max - zero) * fp32(1 / (2^bits - 1)) rounded up to
  dtype, code = round((x - zero) / scale) clipped to the range.
  """
  qmax = 2 ** bits - 1
  xf = x.astype(jnp.float32)
  zero = round_down(xf.min(axis=-1), dtype)
  z32 = zero.astype(jnp.float32)
  # range * fp32(1 / qmax), as XLA rewrites a division by a constant (a code
  # rounding a hair past qmax is clipped: the error stays within half a step).
  scale = round_up_scale((xf.max(axis=-1) - z32) * np.float32(1 / qmax), dtype)
  s32 = scale.astype(jnp.float32)
  codes = jnp.round((xf - z32[..., None]) / jnp.where(s32 > 0, s32, 1.0)[..., None])
  return jnp.clip(codes, 0, qmax).astype(jnp.uint8), scale, zero


def dequantize(codes, scale, zero):
  """codes [..., G] (unpacked), scale and zero [...] -> x' [..., G] fp32."""
  return (zero.astype(jnp.float32)[..., None]
          + codes.astype(jnp.float32) * scale.astype(jnp.float32)[..., None])


def pack(codes, bits: int, axis: int):
  """uint8 codes (< 2^bits) -> bytes with 8/bits codes each along `axis`:
  the axis is split into 8/bits contiguous parts, part p in bits [p*bits, (p+1)*bits)."""
  if bits == 8:
    return codes
  parts = jnp.split(codes, 8 // bits, axis=axis)
  out = parts[0]
  for p, part in enumerate(parts[1:], 1):
    out = out | (part << (p * bits))
  return out


def unpack(packed, bits: int, axis: int):
  """The inverse of pack: [..., n, ...] bytes -> [..., n * 8/bits, ...] uint8 codes."""
  return unpack_parts(packed, bits, axis)


@dataclasses.dataclass(frozen=True)
class Kivi(Format):
  num_kv_heads: int
  head_dim: int
  dtype: str
  spec: str = "kivi"
  bits: int = 2  # 2, 4 or 8
  group: int = 32  # G: tokens per key group, channels per value group
  residual: int = 128  # R: a multiple of group

  def __post_init__(self):
    H, G = self.head_dim, self.group
    if self.bits not in (2, 4, 8):
      raise ValueError(f"{self.spec}: bits = {self.bits}; allowed: 2, 4, 8")
    if G < 1 or H % G or self.residual % G or self.residual < 0:
      raise ValueError(f"{self.spec}: group = {G} must divide head_dim {H} and residual "
                       f"{self.residual}")
    if H % (8 // self.bits):
      raise ValueError(f"{self.spec}: head_dim {H} must be a multiple of {8 // self.bits} "
                       f"({8 // self.bits} {self.bits}-bit codes per byte)")

  # ---- sizes --------------------------------------------------------------------

  @property
  def slot_multiple(self) -> int:
    return self.group

  @property
  def window(self) -> int:
    """W = R + G: the full-precision ring's slots."""
    return self.residual + self.group

  def nq(self, n):
    """Quantized tokens of a row holding n tokens: G * floor(max(n - R, 0) / G)."""
    return self.group * (jnp.maximum(n - self.residual, 0) // self.group)

  def bytes_per_token(self) -> float:
    K, H, G = self.num_kv_heads, self.head_dim, self.group
    item = jnp.dtype(self.dtype).itemsize
    # codes of K and V, then scale + zero: keys K*H/G per token, values K*H/G per token
    return 2 * K * H * self.bits / 8 + 4 * K * H / G * item

  def fixed_bytes(self, batch: int) -> int:
    K, H = self.num_kv_heads, self.head_dim
    return 2 * batch * K * H * self.window * jnp.dtype(self.dtype).itemsize + 4 * batch

  def init_layer(self, batch: int, capacity: int) -> tuple[dict, dict]:
    K, H, G, W, P = self.num_kv_heads, self.head_dim, self.group, self.window, 8 // self.bits
    if capacity % G:
      raise ValueError(f"{self.spec}: capacity {capacity} must be a multiple of group {G}")
    z = lambda *shape, dtype=self.dtype: jnp.zeros(shape, dtype)
    k = {"codes": z(batch, K, H // P, capacity, dtype=jnp.uint8),
         "scale": z(batch, K, H, capacity // G), "zero": z(batch, K, H, capacity // G),
         "residual": z(batch, K, H, W), "count": z(batch, 1, 1, 1, dtype=jnp.int32)}
    v = {"codes": z(batch, K, capacity, H // P, dtype=jnp.uint8),
         "scale": z(batch, K, capacity, H // G), "zero": z(batch, K, capacity, H // G),
         "residual": z(batch, K, W, H)}
    return k, v

  # ---- encode / decode of whole groups ------------------------------------------

  def encode_keys(self, k):
    """k [B, K, H, n] (n a multiple of G, the tokens of n/G whole groups) ->
    codes [B, K, H/P, n] packed, scale and zero [B, K, H, n/G]."""
    B, K, H, n = k.shape
    codes, scale, zero = quantize(k.reshape(B, K, H, n // self.group, self.group), self.bits,
                                  self.dtype)
    return pack(codes.reshape(B, K, H, n), self.bits, 2), scale, zero

  def encode_values(self, v):
    """v [B, K, n, H] -> codes [B, K, n, H/P] packed, scale and zero [B, K, n, H/G]."""
    B, K, n, H = v.shape
    codes, scale, zero = quantize(v.reshape(B, K, n, H // self.group, self.group), self.bits,
                                  self.dtype)
    return pack(codes.reshape(B, K, n, H), self.bits, 3), scale, zero

  def decode_keys(self, codes, scale, zero):
    """The inverse of encode_keys -> [B, K, H, n] in the compute dtype."""
    c = unpack(codes, self.bits, 2)
    B, K, H, n = c.shape
    x = dequantize(c.reshape(B, K, H, n // self.group, self.group), scale, zero)
    return x.reshape(B, K, H, n).astype(self.dtype)

  def decode_values(self, codes, scale, zero):
    """The inverse of encode_values -> [B, K, n, H] in the compute dtype."""
    c = unpack(codes, self.bits, 3)
    B, K, n, H = c.shape
    x = dequantize(c.reshape(B, K, n, H // self.group, self.group), scale, zero)
    return x.reshape(B, K, n, H).astype(self.dtype)

  # ---- writes -------------------------------------------------------------------

  def _ring(self, view: View, k, v, start, n1) -> View:
    """The ring rebuilt for tokens [nq(n1), n1) of each row after tokens
    [start, start + C) (k [B, K, H, C], v [B, K, C, H]) arrived: ring slot i
    holds token t = nq(n1) + ((i - nq(n1)) mod W); tokens >= start come from
    the chunk, earlier ones are already at their slot."""
    C, W = k.shape[3], self.window
    nq1 = self.nq(n1)[:, None]
    t = nq1 + (jnp.arange(W)[None, :] - nq1) % W  # [B, W]
    new = (t >= start) & (t < n1[:, None])
    idx = jnp.clip(t - start, 0, C - 1)
    ring_k = jnp.take_along_axis(k, idx[:, None, None, :], axis=3)
    ring_v = jnp.take_along_axis(v, idx[:, None, :, None], axis=2)
    ring_k = jnp.where(new[:, None, None, :], ring_k.astype(self.dtype), view.get("k", "residual"))
    ring_v = jnp.where(new[:, None, :, None], ring_v.astype(self.dtype), view.get("v", "residual"))
    return view.set("k", "residual", ring_k).set("v", "residual", ring_v)

  def _set_count(self, view: View, n) -> View:
    # A scatter into slot 0 of each row (not a fresh array): the unrolled
    # layout's donated count buffers are then updated in place too.
    return view.set_token("k", "count", n.astype(jnp.int32)[:, None, None],
                          jnp.zeros_like(n, jnp.int32))

  def write_prefix(self, view, k, v, lengths):
    """The prompt's groups are all quantized and stored (every row, slots
    [0, T rounded up to G)): a row reads only its first nq(lengths[b]) slots,
    and the later ones are overwritten by flushes before they are read.
    The ring gets tokens [nq(n), n) of each row."""
    B, _, _, T = k.shape
    G = self.group
    lengths = jnp.asarray(lengths, jnp.int32)
    Tp = -(-T // G) * G
    kp = jnp.pad(k, [(0, 0), (0, 0), (0, 0), (0, Tp - T)])
    vp = jnp.pad(v, [(0, 0), (0, 0), (0, Tp - T), (0, 0)])
    for side, enc in (("k", self.encode_keys(kp)), ("v", self.encode_values(vp))):
      codes, scale, zero = enc
      view = view.set_slots(side, "codes", codes, 0)
      view = view.set_slots(side, "scale", scale, 0).set_slots(side, "zero", zero, 0)
    view = self._ring(view, k, v, 0, jnp.minimum(lengths, T))
    return self._set_count(view, jnp.minimum(lengths, T))

  def write_chunk(self, view, k, v, start, lengths):
    """Row b goes from n0 = min(lengths[b], start) to n1 = min(lengths[b],
    start + C) tokens: the groups [nq(n0), nq(n1)) are quantized from a
    window of positions [nq(start), nq(start) + ceil(C/G) G) (the old ring
    below start, the chunk above; it holds every group that any row flushes,
    as only rows with n0 = start flush) and written only by the rows that
    flush them; then the ring is rebuilt for [nq(n1), n1)."""
    C, G, W = k.shape[3], self.group, self.window
    S = view.size("v", "codes")
    start = jnp.asarray(start, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    n0, n1 = jnp.minimum(lengths, start), jnp.minimum(lengths, start + C)
    NG = -(-C // G)
    a0 = self.nq(start)
    pos = a0 + jnp.arange(NG * G)  # the window's positions
    old = pos < start
    ring_idx = pos % W
    chunk_idx = jnp.clip(pos - start, 0, C - 1)
    kw = jnp.where(old, jnp.take(view.get("k", "residual"), ring_idx, axis=3),
                   jnp.take(k, chunk_idx, axis=3).astype(self.dtype))
    vw = jnp.where(old[:, None], jnp.take(view.get("v", "residual"), ring_idx, axis=2),
                   jnp.take(v, chunk_idx, axis=2).astype(self.dtype))
    first = a0 + G * jnp.arange(NG)  # each window group's first position
    flush = (first[None, :] >= self.nq(n0)[:, None]) & (first[None, :] < self.nq(n1)[:, None])
    group_slots = jnp.where(flush, first[None, :] // G, S // G)  # [B, NG]
    token_slots = jnp.where(jnp.repeat(flush, G, axis=1), pos[None, :], S)  # [B, NG*G]
    for side, enc, slots in (("k", self.encode_keys(kw), group_slots),
                             ("v", self.encode_values(vw), token_slots)):
      codes, scale, zero = enc
      view = view.set_tokens(side, "codes", codes, token_slots)
      view = view.set_tokens(side, "scale", scale, slots)  # keys: per group; values: per token
      view = view.set_tokens(side, "zero", zero, slots)
    view = self._ring(view, k, v, start, n1)
    return self._set_count(view, n1)

  def write_token(self, view, k, v, slots_b):
    """The token goes to ring slot n % W (n = slots_b); then rows whose
    nq grows (n + 1 - R a positive multiple of G) flush the group
    [nq(n), nq(n) + G) from its contiguous ring slots; the other rows run the
    same ops and write nothing (out-of-range slots)."""
    G, W = self.group, self.window
    S = view.size("v", "codes")
    n = jnp.asarray(slots_b, jnp.int32)
    view = view.set_token("k", "residual", k.astype(self.dtype), n % W)
    view = view.set_token("v", "residual", v.astype(self.dtype), n % W)
    g0 = self.nq(n)
    flush = self.nq(n + 1) > g0
    r0 = g0 % W
    kg = jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, G, axis=2))(
        view.get("k", "residual"), r0)  # [B, K, H, G]
    vg = jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, G, axis=1))(
        view.get("v", "residual"), r0)  # [B, K, G, H]
    token_slots = jnp.where(flush[:, None], g0[:, None] + jnp.arange(G)[None, :], S)
    group_slot = jnp.where(flush, g0 // G, S // G)
    codes, scale, zero = self.encode_keys(kg)
    view = view.set_tokens("k", "codes", codes, token_slots)
    view = view.set_token("k", "scale", scale[..., 0], group_slot)
    view = view.set_token("k", "zero", zero[..., 0], group_slot)
    codes, scale, zero = self.encode_values(vg)
    view = view.set_tokens("v", "codes", codes, token_slots)
    view = view.set_tokens("v", "scale", scale, token_slots)
    view = view.set_tokens("v", "zero", zero, token_slots)
    return self._set_count(view, n + 1)

  # ---- reads --------------------------------------------------------------------

  def _read_quantized(self, view: View, lo, n: int):
    """Slots [lo, lo + n) dequantized: (k [B, K, H, n], v [B, K, n, H])."""
    G = self.group
    v = self.decode_values(*(view.slots("v", name, lo, n) for name in ("codes", "scale", "zero")))
    codes = view.slots("k", "codes", lo, n)
    if n % G == 0:  # SourceSegment's blocks: lo is then a multiple of G too
      scale, zero = (view.slots("k", name, lo // G, n // G) for name in ("scale", "zero"))
      return self.decode_keys(codes, scale, zero), v
    # Any other block: the groups covering it, each slot's picked out.
    groups = view.size("k", "scale")
    m = min(-(-(n + G - 1) // G), groups)
    g_lo = jnp.minimum(lo // G, groups - m)
    idx = (lo + jnp.arange(n)) // G - g_lo
    scale, zero = (jnp.take(view.slots("k", name, g_lo, m), idx, axis=3).astype(jnp.float32)
                   for name in ("scale", "zero"))
    k = zero + unpack(codes, self.bits, 2).astype(jnp.float32) * scale
    return k.astype(self.dtype), v

  def sources(self, view, length, rotate=None):
    """Tokens [0, n) of each row, n = min(length, count) (count: the tokens
    written): (1) the quantized slots [0, min(n, nq(count))), dequantized
    block by block; (2) the ring (W slots, one static block), slot i holding
    token nq(count) + ((i - nq(count)) mod W), shown where that is < n."""
    S, W = view.size("v", "codes"), self.window
    count = view.get("k", "count")[:, 0, 0, 0]
    n = jnp.minimum(jnp.broadcast_to(jnp.asarray(length, jnp.int32), count.shape), count)
    nqc = self.nq(count)

    def valid(slot):
      t = nqc[:, None] + (slot[None, :] - nqc[:, None]) % W
      return t < n[:, None]

    ring = lambda lo, m: (view.slots("k", "residual", lo, m), view.slots("v", "residual", lo, m))
    return [Blocks(lambda lo, m: self._read_quantized(view, lo, m), jnp.minimum(n, nqc), S,
                   self.num_kv_heads),
            Blocks(ring, W, W, self.num_kv_heads, valid)]
