"""Closed-form serving costs of the long-context peak-performance framework.

See shared/design/FRAMEWORK.md. Pure functions of a ModelConfig and plain
numbers; results in bytes, seconds and FLOPs. B users, T context tokens,
g devices (tensor parallelism taken as free of communication, as in the paper).

Two conventions:
  "exact"  parameter count P from the config; 2 FLOPs per multiply-add, and
           FLOPs are what the forward pass computes: an embedding lookup is 0
           FLOPs, every token goes through the L layers' matrices, the output
           head (D x V) runs on the last prompt token only (one per user), and
           causal attention counts its T(T+1)/2 visible (query, key) pairs,
           the diagonal included (a token sees itself), at 4*H + 3 FLOPs per
           pair and head (QK^T and AV, and the softmax's max, subtract and
           sum): about 2*L*T^2*N*H. Norm and SwiGLU elementwise work and a
           blocked kernel's surplus (half of each diagonal block, padding to a
           block multiple) are left out: they belong to an implementation,
           and the compiled HLO (lctx.cost.hlo) shows them. Attention biases
           (Qwen2, Llama attention_bias) and q/k norm weights (Qwen3) are
           parameters (in P, the weight bytes and a decode step's reads) but
           elementwise work, so they add no FLOPs here either. A decode step
           reads only the B looked-up rows of an untied embedding table.
  "paper"  P rounded as the paper does (`paper_params`, default: config P to 2
           significant digits, 34e9 for Yi-34B); prefill 2*P*T (embedding table
           and all-T logits included) + attention L*D*T^2 (the count that fits
           the paper's 14.1 s at 50K); a decode step reads all weights.

Cross-layer KV sharing (config.kv_share_every = s): the cache holds L / s
layers, so a token's cache bytes (capacity, concurrency, context switch) and
the K/V projections' parameters and FLOPs are divided by s; attention FLOPs
are not (every layer still attends), and neither are the KV bytes a decode
step reads: each layer of a group reads its group's cache layer, s reads per
cache layer (kv_reads).

Hardware arguments are duck-typed: a plain number, or any object with the
attributes of lctx.cost.hardware.HardwareSpec (`flops(dtype)` or `peak_flops`,
`hbm_bytes`, `hbm_bandwidth`, `host_bandwidth`).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from numbers import Integral, Real
from typing import Any

GB = 10**9
GiB = 2**30

CONVENTIONS = ("exact", "paper")
UNITS = ("GB", "GiB")
DECODE_MODELS = ("memory", "roofline")
# 'float8' is the hardware files' name for either fp8 format (their peak_flops key).
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "float8_e4m3fn": 1,
            "float8_e5m2": 1, "int8": 1}


# ---- validation ---------------------------------------------------------------

def _check_convention(convention: str) -> str:
  if convention not in CONVENTIONS:
    raise ValueError(f"convention {convention!r} not allowed; allowed: {CONVENTIONS}")
  return convention


def _check_pos_int(name: str, value) -> int:
  if not isinstance(value, Integral) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _check_pos(name: str, value) -> float:
  if not isinstance(value, Real) or isinstance(value, bool) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}")
  return value


def itemsize(dtype: str) -> int:
  if dtype not in ITEMSIZE:
    raise ValueError(f"dtype {dtype!r} not allowed; allowed: {tuple(ITEMSIZE)}")
  return ITEMSIZE[dtype]


def _hw(hw: Any, attr: str) -> float:
  """A plain number, or hw.<attr>."""
  if isinstance(hw, Real) and not isinstance(hw, bool):
    return _check_pos(attr, hw)
  if not hasattr(hw, attr):
    raise ValueError(f"hw must be a number or have attribute {attr!r}, got {hw!r}")
  return _check_pos(f"hw.{attr}", getattr(hw, attr))


def _peak_flops(hw: Any, dtype: str) -> float:
  """hw.flops(dtype), hw.peak_flops[dtype], hw.peak_flops, or a plain number."""
  if callable(getattr(hw, "flops", None)):
    return _check_pos(f"hw.flops({dtype!r})", hw.flops(dtype))
  peak = getattr(hw, "peak_flops", None)
  if isinstance(peak, dict):
    if dtype not in peak:
      raise ValueError(f"dtype {dtype!r} not in hw.peak_flops; allowed: {tuple(peak)}")
    return _check_pos(f"hw.peak_flops[{dtype!r}]", peak[dtype])
  return _hw(hw, "peak_flops") if peak is not None else _hw(hw, "flops")


# ---- sizes ----------------------------------------------------------------------

def num_params(config, convention: str = "exact", paper_params: float | None = None) -> float:
  """P: exact count, or the paper's rounded one (override, else 2 significant digits)."""
  if _check_convention(convention) == "exact":
    return config.num_params
  if paper_params is not None:
    return _check_pos("paper_params", paper_params)
  return float(f"{config.num_params:.2g}")


def weight_bytes(config, dtype: str | None = None, convention: str = "exact",
                 paper_params: float | None = None) -> float:
  """All weights: P * itemsize (dtype defaults to config.param_dtype)."""
  return num_params(config, convention, paper_params) * itemsize(dtype or config.param_dtype)


def kv_bytes_per_token(config, dtype: str | None = None) -> int:
  """2 * L * K * H * itemsize (dtype defaults to config.dtype): what a token
  holds in the cache; with cross-layer KV sharing L / s cache layers."""
  return (2 * config.num_kv_layers * config.num_kv_heads * config.head_dim *
          itemsize(dtype or config.dtype))


def kv_reads(config) -> int:
  """Reads of each cache layer per decode step: 1, or kv_share_every (s)
  under cross-layer KV sharing, where all s layers of a group attend the
  group's cache layer (each after the previous layer's output: the reads
  cannot be merged)."""
  return config.kv_share_every


def kv_bytes_per_user(config, T: int, dtype: str | None = None,
                      token_bytes: float | None = None) -> float:
  """KV cache of one user holding T tokens: T * kv_bytes_per_token, or T *
  token_bytes for a compressed cache (its bytes per token over all layers,
  metadata included: lctx.cache.quant formats' closed forms)."""
  T = _check_pos_int("T", T)
  return T * (kv_bytes_per_token(config, dtype) if token_bytes is None else token_bytes)


# ---- prefill (compute-bound) ------------------------------------------------------

def layer_matmul_params(config) -> int:
  """Weights of the L layers' matrices (Q, K, V, O and the SwiGLU gate, up and
  down): the parameters every token multiplies; norms, attention biases, q/k
  norm weights and embeddings excluded. N * H need not equal D. With
  cross-layer KV sharing only L / s layers have K and V matrices."""
  D, F, N, K, H = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  return (config.num_layers * (2 * D * N * H + 3 * D * F)
          + config.num_kv_layers * 2 * D * K * H)


def flops_per_token(config, convention: str = "exact",
                    paper_params: float | None = None) -> float:
  """Matmul FLOPs of one token through the whole model, attention excluded.

  exact: 2 * (layer matrices + the D x V head); the embedding lookup is free.
  paper: 2 * P, all parameters as the framework counts them.
  """
  if _check_convention(convention) == "paper":
    return 2 * num_params(config, convention, paper_params)
  return 2 * (layer_matmul_params(config) + config.hidden_size * config.vocab_size)


def prefill_flops(config, T: int, convention: str = "exact",
                  paper_params: float | None = None) -> float:
  """Forward FLOPs of one user's T-token prompt, up to its first token's logits.

  exact: 2 * layer matrices * T (every token) + 2 * D * V (the head, on the
  last token only: a prefill returns one token's logits per user) + causal
  attention L * N * T(T+1)/2 * (4 H + 3): T(T+1)/2 visible pairs (diagonal
  included), 4 H FLOPs per pair and head for QK^T and AV, and 3 for the
  softmax (running max, subtract, sum; the exponential is a transcendental,
  not a FLOP). For llama-3.1-8b at T = 4096 that is 6.16e13, within 1% of the
  compiled one-device prefill (6.22e13; the rest is the blocked kernel's
  surplus and the norms' and SwiGLU's elementwise work).
  paper: 2 * P * T (embedding table and all-T logits included) + L * D * T^2.
  """
  T = _check_pos_int("T", T)
  L, D, N, H = config.num_layers, config.hidden_size, config.num_heads, config.head_dim
  if _check_convention(convention) == "paper":
    return flops_per_token(config, convention, paper_params) * T + L * D * T * T
  return (2 * layer_matmul_params(config) * T + 2 * D * config.vocab_size
          + L * N * (T * (T + 1) // 2) * (4 * H + 3))


def prefill_seconds(config, T: int, hw, g: int = 1, dtype: str | None = None,
                    convention: str = "exact", paper_params: float | None = None) -> float:
  """flops / (g * peak_flops(dtype)); dtype (compute) defaults to config.dtype."""
  g = _check_pos_int("g", g)
  dtype = dtype or config.dtype
  itemsize(dtype)
  return prefill_flops(config, T, convention, paper_params) / (g * _peak_flops(hw, dtype))


def recompute_seconds(config, T: int, hw, g: int = 1, dtype: str | None = None,
                      convention: str = "exact", paper_params: float | None = None) -> float:
  """The alternative to a context switch: prefill the user's T tokens again
  (prefill_seconds, so the same FLOP count: exact or paper)."""
  return prefill_seconds(config, T, hw, g, dtype, convention, paper_params)


# ---- decode (memory-bound) ----------------------------------------------------------

def decode_step_bytes(config, B: int, T: int, dtype: str | None = None,
                      convention: str = "exact", paper_params: float | None = None,
                      kv_dtype: str | None = None, kv_token_bytes: float | None = None) -> float:
  """HBM bytes one decode step reads for B users each holding T tokens.

  dtype: weights (default config.param_dtype); kv_dtype: cache (default dtype,
  else config.dtype). Same defaults in decode_step_seconds and concurrency.
  kv_token_bytes: a compressed cache's bytes per token (kv_bytes_per_user);
  a compressed cache is read whole, metadata included.

  exact: all weights minus the (V - B) embedding rows not looked up (untied
  only; tied tables are read whole as the head) + B * kv. paper: weights + B * kv.
  kv: the user's cache read kv_reads times (cross-layer KV sharing: every
  layer of a group reads the group's cache layer, L layers' worth of reads
  from L / s layers of cache). Activations (B * D per layer) are negligible
  and not counted.
  """
  B = _check_pos_int("B", B)
  w_dtype = dtype or config.param_dtype
  w = weight_bytes(config, w_dtype, convention, paper_params)
  if convention == "exact" and not config.tie_word_embeddings:
    w -= max(config.vocab_size - B, 0) * config.hidden_size * itemsize(w_dtype)
  return w + B * kv_reads(config) * kv_bytes_per_user(config, T, kv_dtype or dtype,
                                                      kv_token_bytes)


def decode_step_seconds(config, B: int, T: int, hw, g: int = 1, dtype: str | None = None,
                        convention: str = "exact", paper_params: float | None = None,
                        kv_dtype: str | None = None, model: str = "memory",
                        kv_token_bytes: float | None = None) -> float:
  """Seconds per decode step (one token for each of B users), per device.

  memory:   decode_step_bytes / (g * W_hbm).
  roofline: B*kv/W_hbm + max(B*flops_per_token/C, weights/W_hbm), each
            divided by g (the scaling-book form 2*B*P/C; compute wins once
            B > C / W_hbm). flops_per_token: 2*P under the paper convention;
            exact: the layers' matrices and the head, no embedding lookup.
  """
  if model not in DECODE_MODELS:
    raise ValueError(f"model {model!r} not allowed; allowed: {DECODE_MODELS}")
  g = _check_pos_int("g", g)
  bw = _hw(hw, "hbm_bandwidth")
  total = decode_step_bytes(config, B, T, dtype, convention, paper_params, kv_dtype,
                            kv_token_bytes)
  if model == "memory":
    return total / (g * bw)
  kv = B * kv_reads(config) * kv_bytes_per_user(config, T, kv_dtype or dtype, kv_token_bytes)
  compute = B * flops_per_token(config, convention, paper_params) / _peak_flops(
      hw, dtype or config.dtype)
  return (kv / bw + max(compute, (total - kv) / bw)) / g


# ---- concurrency (HBM size) -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Concurrency:
  """How many users' KV caches fit beside the weights."""

  users: int  # never negative
  shortfall_bytes: float  # extra HBM needed for one user when users == 0, else 0
  free_bytes: float  # g * HBM - weights - reserve (negative if weights do not fit)
  kv_bytes_per_user: int
  weight_bytes: float
  unit: str


def concurrency(config, T: int, hw, g: int = 1, dtype: str | None = None,
                convention: str = "exact", unit: str = "GB", reserve_bytes: float = 0,
                paper_params: float | None = None, kv_dtype: str | None = None,
                kv_token_bytes: float | None = None) -> Concurrency:
  """floor((g * HBM - weights - reserve) / kv_bytes_per_user), at least 0.
  kv_token_bytes: a compressed cache's bytes per token (kv_bytes_per_user).

  unit "GB": all decimal bytes. unit "GiB": the paper's mixed arithmetic: free
  memory as a decimal-GB number (80 - 68 = 12) divided by the KV per user as a
  GiB number (11.44), i.e. each user effectively costs kv * GB / GiB bytes.
  """
  if unit not in UNITS:
    raise ValueError(f"unit {unit!r} not allowed; allowed: {UNITS}")
  g = _check_pos_int("g", g)
  if not isinstance(reserve_bytes, Real) or reserve_bytes < 0:
    raise ValueError(f"reserve_bytes must be a number >= 0, got {reserve_bytes!r}")
  w = weight_bytes(config, dtype, convention, paper_params)
  kv = kv_bytes_per_user(config, T, kv_dtype or dtype, kv_token_bytes)
  free = Fraction(g) * Fraction(_hw(hw, "hbm_bytes")) - Fraction(w) - Fraction(reserve_bytes)
  per_user = Fraction(kv) * (Fraction(GB, GiB) if unit == "GiB" else 1)  # exact, no float floor
  users = max(math.floor(free / per_user), 0)
  shortfall = float(per_user - free) if users == 0 else 0.0
  return Concurrency(users, shortfall, float(free), kv, w, unit)


# ---- context switching (host link) ------------------------------------------------------

def context_switch_seconds(config, T: int, host_bandwidth, dtype: str | None = None,
                           T_in: int | None = None,
                           kv_token_bytes: float | None = None) -> float:
  """(kv_out + kv_in) / host bandwidth: one user of T tokens swapped out, another
  of T_in (default T) swapped in. host_bandwidth: B/s, or an object with it.
  kv_token_bytes: a compressed cache's bytes per token (it moves as stored)."""
  out = kv_bytes_per_user(config, T, dtype, kv_token_bytes)
  inn = kv_bytes_per_user(config, T if T_in is None else T_in, dtype, kv_token_bytes)
  return (out + inn) / _hw(host_bandwidth, "host_bandwidth")


# ---- report helpers ---------------------------------------------------------------------

def to_unit(n_bytes: float, unit: str = "GB") -> float:
  if unit not in UNITS:
    raise ValueError(f"unit {unit!r} not allowed; allowed: {UNITS}")
  return n_bytes / (GB if unit == "GB" else GiB)


def fmt_bytes(n_bytes: float, unit: str = "GB", digits: int = 3) -> str:
  return f"{to_unit(n_bytes, unit):.{digits}f} {unit}"
