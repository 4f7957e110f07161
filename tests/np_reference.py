"""A plain-numpy Llama decoder (tiny configs: no biases, no QK norm, plain
RoPE) that decodes through a quantized KV cache, written independently of
lctx.model: what a compressed cache's tests compare lctx's logits against.

The protocol is lctx's: the prompt attends itself at full precision (its K/V
are at hand during prefill); every decode step's token attends the keys and
values the cache returns for positions [0, n] (its own included), as given
by `kv_view(layer, k_pre, k_post, v, T0)` over the full-precision history:
k_pre / k_post [n, K, H] (keys before / after RoPE), v [n, K, H], T0 the
prompt length; it returns the (k_post, v) [n, K, H] attention reads.
"""

from __future__ import annotations

import numpy as np


def np_rms_norm(x, w, eps):
  return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w


def np_rope(x, positions, theta):
  """x [n, heads, H] rotated at positions [n] (pairs (i, i + H/2))."""
  H = x.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, H, 2, dtype=np.float64) / H)
  angles = np.asarray(positions, np.float64)[:, None] * freqs  # [n, H/2]
  c, s = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  a, b = x[..., :H // 2], x[..., H // 2:]
  return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _attend(q, k, v, visible):
  """q [t, N, H]; k, v [n, K, H]; visible [t, n] bool -> [t, N, H]."""
  N, K, H = q.shape[1], k.shape[1], q.shape[2]
  g = N // K
  kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [n, N, H]
  s = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(H)
  s = np.where(visible[None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("nts,snh->tnh", p, vv)


def decode_logits(config, params, prompt, new_tokens, kv_view):
  """Logits [1 + len(new_tokens), V] (float64): the prompt's last token's,
  then each fed token's, decoding one row through kv_view (module docstring).
  params: lctx params (stacked layers), converted to numpy here."""
  P = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
  layers = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
  L, eps, theta = config.num_layers, config.rms_norm_eps, config.rope_theta
  tokens = list(prompt)
  T0 = len(tokens)
  hist = [dict(k_pre=None, k_post=None, v=None) for _ in range(L)]

  def head(x):
    h = np_rms_norm(x, P["final_norm"], eps)
    return h @ (P["embed"].T if config.tie_word_embeddings else P["lm_head"])

  def run(tok, start):  # tokens at positions [start, start + len(tok))
    x = P["embed"][np.asarray(tok)]
    pos = np.arange(start, start + len(tok))
    for l in range(L):
      lp = {k: v[l] for k, v in layers.items()}
      h = np_rms_norm(x, lp["attn_norm"], eps)
      q = np.einsum("td,dnh->tnh", h, lp["w_q"])
      k = np.einsum("td,dkh->tkh", h, lp["w_k"])
      v = np.einsum("td,dkh->tkh", h, lp["w_v"])
      q, k_post = np_rope(q, pos, theta), np_rope(k, pos, theta)
      st = hist[l]
      for name, new in (("k_pre", k), ("k_post", k_post), ("v", v)):
        st[name] = new if st[name] is None else np.concatenate([st[name], new])
      if start == 0:  # prefill: the prompt's own K/V at full precision, causal
        n = len(tok)
        attn = _attend(q, k_post, v, np.tril(np.ones((n, n), bool)))
      else:
        kk, vv = kv_view(l, st["k_pre"], st["k_post"], st["v"], T0)
        attn = _attend(q, kk, vv, np.ones((len(tok), kk.shape[0]), bool))
      x = x + attn.reshape(len(tok), -1) @ lp["w_o"].reshape(-1, x.shape[-1])
      h = np_rms_norm(x, lp["mlp_norm"], eps)
      gate = h @ lp["w_gate"]
      x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]
    return head(x[-1])

  out = [run(tokens, 0)]
  for t in new_tokens:
    out.append(run([t], len(tokens)))
    tokens.append(t)
  return np.stack(out)


def absmax_roundtrip(x, bits, group, per_token_across_heads=False, scale_dtype=np.float32):
  """Symmetric absmax quantize-dequantize of vectors x [n, K, H] per (token,
  KV head) (or per token across heads), in groups of `group` channels (0: H)."""
  n, K, H = x.shape
  g = group or H
  qmax = 2 ** (bits - 1) - 1
  xg = x.reshape(n, K, H // g, g).astype(np.float64)
  amax = np.abs(xg).max(axis=(1, 3) if per_token_across_heads else 3, keepdims=True)
  scale = (amax / qmax).astype(np.float32)
  scale = np.where(scale.astype(np.float64) < amax / qmax, np.nextafter(scale, np.float32(np.inf)),
                   scale).astype(np.float64)
  codes = np.clip(np.round(xg / np.where(scale > 0, scale, 1.0)), -qmax, qmax)
  return (codes * scale).reshape(n, K, H)
