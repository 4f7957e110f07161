"""Pointwise building blocks: RMSNorm, rotary position embeddings, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lctx.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * weight, with the statistics in fp32 (as Llama does)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] of RoPE, after the config's frequency scaling."""
  H = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
  scaling = config.rope_scaling
  if scaling.rope_type == "linear":
    inv_freq = inv_freq / scaling.factor
  elif scaling.rope_type == "llama3":
    # Long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1's recipe).
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [..., H/2] for integer positions of any shape."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the two halves of the head dim (the HF "rotate_half" layout).

  x: [B, T, heads, H]; cos, sin: [B, T, H/2].
  """
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  cos, sin = cos[..., None, :], sin[..., None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """down(silu(x @ gate) * (x @ up)); x: [..., D], w_gate/w_up: [D, F], w_down: [F, D]."""
  gate = x @ w_gate.astype(x.dtype)
  up = x @ w_up.astype(x.dtype)
  return (jax.nn.silu(gate) * up) @ w_down.astype(x.dtype)
