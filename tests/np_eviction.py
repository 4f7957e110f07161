"""Plain-numpy scorers of NVIDIA kvpress 0.5.5's prefill presses, written from
kvpress's source, over a plain-numpy Llama forward: the independent reference
that lctx's KV-cache eviction is tested against (tests/test_kvpress_parity.py,
fixture made by tests/fixtures/kvpress/make_fixture.py).

kvpress compresses each layer's cache right after that layer's attention ran
on the whole prompt (a forward hook; BasePress.forward_hook). A ScorerPress
scores every cached position, higher = kept, and keeps
`scores.topk(n_kept)` per (batch, KV head) with
`n_kept = max(1, int(T * (1 - ratio)))` (kvpress.utils.compute_n_kept; Python
float64 arithmetic, so T=300 at ratio 0.9 keeps 29, not 30). Compression does
not change the prompt's forward: every layer's scores come from the
uncompressed forward.

Shapes: T prompt length, D hidden size, N query heads, K KV heads, H head_dim,
G = N // K query heads per KV head (query head n belongs to KV head n // G, as
transformers' repeat_kv lays them out). Everything here is float64.

What the scorers read: the post-RoPE keys (what the cache holds: Knorm's norm
is of the *rotated* key) and post-RoPE queries. SnapKV and TOVA in kvpress
recompute the last `window` queries from the layer's attention input
(`hidden_states` of the hook: the residual stream after input_layernorm) with
q_proj and RoPE at positions T-window..T-1 when the attention weights are not
returned (sdpa), or slice the eager attention weights; both equal the last rows
of the full causal attention, which is what is computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tests.np_reference import np_rms_norm, np_rope

METHODS = ("streaming_llm", "knorm", "snapkv", "tova", "observed_attention")


# ---- the model -----------------------------------------------------------------------

def load_checkpoint(path) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {HF tensor name: float64 array}) of an HF Llama
  checkpoint directory holding config.json and model.safetensors."""
  path = Path(path)
  config = json.loads((path / "config.json").read_text())
  weights = {k: v.astype(np.float64) for k, v in load_file(path / "model.safetensors").items()}
  return config, weights


def rope_theta(config: dict) -> float:
  return float((config.get("rope_parameters") or {}).get("rope_theta") or config["rope_theta"])


def llama_layers(config: dict, weights: dict[str, np.ndarray], tokens) -> list[dict[str, np.ndarray]]:
  """Per layer of a Llama prefill over `tokens` [T] (ints), a dict of
    x [T, D]     the residual stream entering the layer
    h [T, D]     the attention input, rms_norm(x) (kvpress's `hidden_states`)
    q [T, N, H]  post-RoPE queries
    k [T, K, H]  post-RoPE keys (what the KV cache holds)
  Plain RoPE (rotate-half pairs (i, i + H/2)), no biases, no QK norm."""
  N, K = config["num_attention_heads"], config["num_key_value_heads"]
  D = config["hidden_size"]
  H = config.get("head_dim") or D // N
  eps, theta = config["rms_norm_eps"], rope_theta(config)
  G = N // K
  tokens = np.asarray(tokens)
  T = len(tokens)
  pos = np.arange(T)
  x = weights["model.embed_tokens.weight"][tokens]
  out = []
  for l in range(config["num_hidden_layers"]):
    w = lambda name: weights[f"model.layers.{l}.{name}"]
    h = np_rms_norm(x, w("input_layernorm.weight"), eps)
    q = np_rope((h @ w("self_attn.q_proj.weight").T).reshape(T, N, H), pos, theta)
    k = np_rope((h @ w("self_attn.k_proj.weight").T).reshape(T, K, H), pos, theta)
    v = (h @ w("self_attn.v_proj.weight").T).reshape(T, K, H)
    out.append(dict(x=x, h=h, q=q, k=k))
    p = causal_attention(q, k)  # [N, T, T]
    attn = np.einsum("nts,snh->tnh", p, np.repeat(v, G, axis=1)).reshape(T, N * H)
    x = x + attn @ w("self_attn.o_proj.weight").T
    h2 = np_rms_norm(x, w("post_attention_layernorm.weight"), eps)
    gate, up = h2 @ w("mlp.gate_proj.weight").T, h2 @ w("mlp.up_proj.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w("mlp.down_proj.weight").T
  return out


def causal_attention(q: np.ndarray, k: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
  """Softmax attention weights [N, t, T] of the query rows q[rows] (positions
  T-t..T-1 when rows is a tail slice) over all T keys, causally masked,
  scaled by 1/sqrt(H). q [T, N, H], k [T, K, H]; KV head n // G serves query
  head n. The softmax runs over every visible key (window keys included)."""
  T, N, H = q.shape
  G = N // k.shape[1]
  qpos = np.arange(T)[rows]
  s = np.einsum("tnh,snh->nts", q[rows], np.repeat(k, G, axis=1)) / np.sqrt(H)
  s = np.where(np.arange(T)[None, None, :] <= qpos[None, :, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


# ---- the scorers: [K, T], higher = kept ----------------------------------------------

def n_kept(T: int, ratio: float) -> int:
  """kvpress.utils.compute_n_kept: max(1, int(T * (1 - ratio))) (0 at ratio >= 1)."""
  return 0 if ratio >= 1.0 else max(1, int(T * (1 - ratio)))


def streaming_llm_scores(T: int, K: int, ratio: float, n_sink: int = 4) -> np.ndarray:
  """StreamingLLMPress.score: ones, zeroed on [n_sink, n_sink + n_pruned) with
  n_pruned = T - int(T * (1 - ratio)): keeps the first n_sink and the last
  n_kept - n_sink positions (no ties at the boundary: exactly n_kept ones)."""
  scores = np.ones((K, T))
  scores[:, n_sink:n_sink + T - int(T * (1 - ratio))] = 0.0
  return scores


def knorm_scores(k: np.ndarray) -> np.ndarray:
  """KnormPress.score: minus the L2 norm of each post-RoPE key; k [T, K, H] -> [K, T]
  (keeps the smallest-norm keys; no position is protected)."""
  return -np.linalg.norm(k, axis=-1).T


def snapkv_scores(q: np.ndarray, k: np.ndarray, window: int = 64, kernel: int = 5) -> np.ndarray:
  """SnapKVPress.score; q [T, N, H], k [T, K, H] -> [K, T].

  The last `window` queries attend causally over all T keys (softmax over all
  of them); the window's own key columns are then dropped, the weights
  averaged over the window queries -> [N, T - window], smoothed by
  avg_pool1d(kernel, stride 1, padding kernel // 2, zeros counted: always
  divided by `kernel`), averaged over the G query heads of each KV head ->
  [K, T - window]; the window positions get max(all scores) + 1, so they are
  always kept (when n_kept < window, which of them is topk's tie-breaking)."""
  T = q.shape[0]
  assert T > window, (T, window)
  N, K = q.shape[1], k.shape[1]
  p = causal_attention(q, k, slice(T - window, T))[..., :T - window]  # [N, window, T - window]
  s = p.mean(axis=1)  # [N, T - window]
  pad = kernel // 2
  padded = np.pad(s, ((0, 0), (pad, pad)))
  pooled = sum(padded[:, i:i + s.shape[1]] for i in range(kernel)) / kernel
  grouped = pooled.reshape(K, N // K, T - window).mean(axis=1)  # [K, T - window]
  return np.concatenate([grouped, np.full((K, window), grouped.max() + 1)], axis=1)


def tova_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
  """TOVAPress.score; q [T, N, H], k [T, K, H] -> [K, T].

  The last query's attention over all T keys (softmax includes its own key),
  its own column dropped, averaged over ALL N query heads (not per KV group)
  and the same row given to every KV head; the last position gets max + 1
  (always kept)."""
  T, K = q.shape[0], k.shape[1]
  p = causal_attention(q, k, slice(T - 1, T))[:, 0, :T - 1]  # [N, T - 1]
  s = np.repeat(p.mean(axis=0)[None], K, axis=0)  # [K, T - 1]
  return np.concatenate([s, np.full((K, 1), s.max() + 1)], axis=1)


def observed_attention_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
  """ObservedAttentionPress.score (eager attention weights); q [T, N, H],
  k [T, K, H] -> [K, T]: the full causal attention summed over the query rows,
  column j divided by T - j (the number of queries that see key j: a mean
  over them), then averaged over the G query heads of each KV head."""
  T, N, K = q.shape[0], q.shape[1], k.shape[1]
  s = causal_attention(q, k).sum(axis=1) / np.arange(T, 0, -1)  # [N, T]
  return s.reshape(K, N // K, T).mean(axis=1)


def scores(method: str, q: np.ndarray, k: np.ndarray, ratio: float, *, n_sink: int = 4,
           window: int = 64, kernel: int = 5) -> np.ndarray:
  """One layer's kvpress scores [K, T] for `method` (one of METHODS)."""
  T, K = k.shape[0], k.shape[1]
  if method == "streaming_llm":
    return streaming_llm_scores(T, K, ratio, n_sink)
  if method == "knorm":
    return knorm_scores(k)
  if method == "snapkv":
    return snapkv_scores(q, k, window, kernel)
  if method == "tova":
    return tova_scores(q, k)
  if method == "observed_attention":
    return observed_attention_scores(q, k)
  raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")


def kept(scores: np.ndarray, n: int) -> np.ndarray:
  """The n highest-scoring positions of each row of scores [..., T], int32
  [..., n], ascending. Ties go to the lower position (stable sort); kvpress's
  torch topk breaks ties its own way, so compare only where no tie straddles
  the boundary."""
  top = np.argsort(-scores, axis=-1, kind="stable")[..., :n]
  return np.sort(top, axis=-1).astype(np.int32)


def kept_positions(path, tokens, method: str, ratio: float, **knobs) -> np.ndarray:
  """int32 [L, 1, K, n_kept]: per layer, batch 1 and KV head, the positions
  kvpress's `method` keeps after prefilling `tokens` [T] on the checkpoint at
  `path` (knobs: n_sink, window, kernel)."""
  config, weights = load_checkpoint(path)
  layers = llama_layers(config, weights, tokens)
  n = n_kept(len(tokens), ratio)
  return np.stack([kept(scores(method, d["q"], d["k"], ratio, **knobs), n)[None] for d in layers])
