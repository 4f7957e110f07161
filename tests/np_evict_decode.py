"""An independent plain-numpy (float64) Llama decoder with KV-cache token
eviction during prefill and decoding (decode=evict), one row at a time:
what tests/test_evict_decode.py checks lctx's kept positions and logits
against, step by step. Written from the methods' definitions, not from
lctx.cache.evict; only the decoder pieces of tests/np_reference.py are shared.

Protocol (per layer, per row; K KV heads, G = N / K query heads each):
  prefill   the prompt (T real tokens) runs full causal attention (hidden
            states do not depend on eviction); then each KV head keeps the
            n_kept(T) best prompt tokens: the protected ones (positions <
            sinks, the method's own) first, then the highest scores, ties to
            the lower position; kept slots sorted by position.
  decode    a token at position p (RoPE at p: positions continue from the
            original length) attends its KV head's kept slots and itself. Below
            the budget it is appended; at the budget the candidates are the
            slots (in slot order) and the new token (last), the non-protected
            candidate with the lowest score goes (ties to the higher candidate
            index, the newer; every candidate protected: the new token goes):
            the new token is then dropped, else it takes the freed
            slot. Accumulating methods (H2O, Keyformer) first add the new
            query's probabilities to every candidate's accumulator (the new
            token's starts at its own probability), whether full or not.

Scores:
  h2o            accumulated attention probability, summed over the queries,
                 averaged over the group's G heads; recent window
                 int(budget * recent) newest positions protected.
  keyformer      as h2o with probabilities softmax((z + g) / tau), g Gumbel
                 noise from `hash_uniform(seed, layer, head, q_pos, k_pos)`,
                 tau = 1 + 0.01 * (decode steps done before this one).
  tova           the newest query's probabilities averaged over all N heads
                 (per layer); the newest token protected.
  streaming_llm  the position (newest best); sinks protected (default 4).
"""

from __future__ import annotations

import numpy as np

from tests.np_reference import np_rms_norm, np_rope

DEFAULTS = {
    "h2o": dict(ratio=0.8, budget=0, sinks=0, recent=0.5),
    "keyformer": dict(ratio=0.4, budget=0, sinks=0, recent=0.3, seed=0),
    "tova": dict(ratio=0.0, budget=0, sinks=0),
    "streaming_llm": dict(ratio=0.0, budget=0, sinks=4),
}


def parse(spec: str) -> tuple[str, dict]:
  """'name:key=value,...' -> (name, knobs with the defaults filled in);
  the 'decode' knob is dropped (this decoder always evicts when decoding)."""
  name, _, rest = spec.partition(":")
  knobs = dict(DEFAULTS[name])
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    if key == "decode":
      assert value == "evict", spec
      continue
    knobs[key] = type(knobs[key])(float(value) if isinstance(knobs[key], float) else int(value))
  return name, knobs


def n_kept(t: int, ratio: float, budget: int) -> int:
  if t <= 0:
    return 0
  if budget > 0:
    return min(budget, t)
  return max(1, int(t * (1 - ratio)))


# ---- the counter hash (uint32 arithmetic, done in uint64 and masked) --------------

_M32 = np.uint64(0xFFFFFFFF)


def _mix(x):
  x = x ^ (x >> np.uint64(16))
  x = (x * np.uint64(0x7FEB352D)) & _M32
  x = x ^ (x >> np.uint64(15))
  x = (x * np.uint64(0x846CA68B)) & _M32
  return x ^ (x >> np.uint64(16))


def hash_bits(seed: int, *ints) -> np.ndarray:
  """The 32-bit hash of (seed, *ints), broadcast over the int arrays, as uint64."""
  h = (np.uint64(seed) * np.uint64(0x9E3779B9)) & _M32
  for x in ints:
    x = np.asarray(x, np.int64).astype(np.uint64) & _M32
    h = _mix(h ^ ((x * np.uint64(0x85EBCA6B)) & _M32))
  return h


def hash_uniform(seed: int, *ints) -> np.ndarray:
  """float32 ((h >> 9) + 0.5) * 2**-23, as lctx computes it: exact in
  float32, so strictly inside (0, 1)."""
  top = (hash_bits(seed, *ints) >> np.uint64(9)).astype(np.float32)
  return (top + np.float32(0.5)) * np.float32(2.0 ** -23)


def gumbel(seed, layer, head, q_pos, k_pos) -> np.ndarray:
  """Standard Gumbel noise -log(-log(u)) in float64 from the float32 u."""
  u = hash_uniform(seed, layer, head, q_pos, k_pos).astype(np.float64)
  with np.errstate(divide="ignore"):
    return -np.log(-np.log(u))


def _softmax(z, visible=None):
  """Softmax over the last axis (over the visible entries only)."""
  if visible is not None:
    z = np.where(visible, z, -np.inf)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class Heads:
  """One (layer, KV head)'s kept slots, in slot order."""

  def __init__(self, pos, k, v, acc):
    self.pos = list(pos)  # original positions
    self.k = list(k)  # post-RoPE keys [H]
    self.v = list(v)
    self.acc = list(acc)  # accumulated scores (0 for methods that do not accumulate)


class NpEvictingRow:
  """One row's decoder with eviction (module docstring). prefill(tokens)
  then step(token) per decode step, each returning the logits [V] (float64).
  kept(l, k): the sorted kept positions of layer l, KV head k.
  budget_override: the row's budget during decoding (default n_kept(T)).
  decisions: (phase, step, layer, head, margin) of every eviction choice,
  the margin being the gap in score between the last token kept and the
  first dropped (prefill) or between the lowest and the next lowest
  non-protected candidate (decode): how close the choice came to a tie."""

  def __init__(self, config, params, spec: str, budget_override: int | None = None):
    self.name, self.knobs = parse(spec)
    self.P = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
    self.W = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    self.cfg = config
    self.L, self.N, self.K, self.H = (config.num_layers, config.num_heads, config.num_kv_heads,
                                      config.head_dim)
    self.G = self.N // self.K
    self.budget_override = budget_override
    self.decisions = []
    self.events = {"appended": 0, "replaced": 0, "dropped": 0}  # decode, per (layer, head)

  # ---- shared pieces ----

  def _qkv(self, l, x, positions):
    lp = {k: v[l] for k, v in self.W.items()}
    h = np_rms_norm(x, lp["attn_norm"], self.cfg.rms_norm_eps)
    q = np.einsum("td,dnh->tnh", h, lp["w_q"])
    k = np.einsum("td,dkh->tkh", h, lp["w_k"])
    v = np.einsum("td,dkh->tkh", h, lp["w_v"])
    theta = self.cfg.rope_theta
    return np_rope(q, positions, theta), np_rope(k, positions, theta), v

  def _out_mlp(self, l, x, attn_tnh):
    lp = {k: v[l] for k, v in self.W.items()}
    x = x + attn_tnh.reshape(len(x), -1) @ lp["w_o"].reshape(-1, x.shape[-1])
    h = np_rms_norm(x, lp["mlp_norm"], self.cfg.rms_norm_eps)
    gate = h @ lp["w_gate"]
    return x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]

  def _head(self, x_d):
    h = np_rms_norm(x_d, self.P["final_norm"], self.cfg.rms_norm_eps)
    return h @ (self.P["embed"].T if self.cfg.tie_word_embeddings else self.P["lm_head"])

  def _recent(self) -> int:
    return int(self.budget * self.knobs["recent"])

  def _protected(self, pos: np.ndarray, newest: int) -> np.ndarray:
    """Protected among positions `pos` when `newest` is the newest position."""
    keep = pos < self.knobs["sinks"]
    if self.name in ("h2o", "keyformer"):
      keep |= pos > newest - self._recent()
    elif self.name == "tova":
      keep |= pos == newest
    return keep

  # ---- prefill ----

  def prefill(self, tokens) -> np.ndarray:
    T = len(tokens)
    self.T0, self.next_pos, self.steps = T, T, 0
    self.budget = n_kept(T, self.knobs["ratio"], self.knobs["budget"])
    pos = np.arange(T)
    causal = np.tril(np.ones((T, T), bool))
    x = self.P["embed"][np.asarray(tokens)]
    self.heads = []
    for l in range(self.L):
      q, k, v = self._qkv(l, x, pos)
      kk, vv = np.repeat(k, self.G, axis=1), np.repeat(v, self.G, axis=1)
      z = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(self.H)  # [N, T, T]
      p = _softmax(z, causal)
      attn = np.einsum("nts,snh->tnh", p, vv)
      if self.name == "h2o":
        scores = p.reshape(self.K, self.G, T, T).sum(axis=(1, 2)) / self.G
      elif self.name == "keyformer":
        n = np.arange(self.N)[:, None, None]
        g = gumbel(self.knobs["seed"], l, n, pos[None, :, None], pos[None, None, :])
        pg = _softmax(z + g, causal)  # tau = 1 during the prefill
        scores = pg.reshape(self.K, self.G, T, T).sum(axis=(1, 2)) / self.G
      elif self.name == "tova":
        scores = np.broadcast_to(p[:, T - 1, :].mean(0), (self.K, T))
      else:
        scores = np.broadcast_to(pos.astype(np.float64), (self.K, T))
      prot = self._protected(pos, T - 1)
      layer = []
      for h in range(self.K):
        rank = sorted(range(T), key=lambda s: (not prot[s], 0.0 if prot[s] else -scores[h, s], s))
        chosen = rank[:self.budget]
        free_kept = [s for s in chosen if not prot[s]]
        free_dropped = [s for s in rank[self.budget:] if not prot[s]]
        if free_kept and free_dropped:
          self.decisions.append(("prefill", -1, l, h,
                                 scores[h, free_kept[-1]] - scores[h, free_dropped[0]]))
        chosen = sorted(chosen)
        acc = scores[h, chosen] if self.name in ("h2o", "keyformer") else np.zeros(len(chosen))
        layer.append(Heads(chosen, k[chosen, h], v[chosen, h], acc))
      self.heads.append(layer)
      x = self._out_mlp(l, x, attn)
    if self.budget_override is not None:
      self.budget = self.budget_override
    return self._head(x[T - 1])

  # ---- decode ----

  def step(self, token: int) -> np.ndarray:
    p_new = self.next_pos
    tau = 1.0 + 0.01 * self.steps
    x = self.P["embed"][np.asarray([token])]
    for l in range(self.L):
      q, k, v = self._qkv(l, x, np.array([p_new]))
      q, k, v = q[0], k[0], v[0]  # [N, H], [K, H], [K, H]
      attn = np.zeros((self.N, self.H))
      probs, logits, cand_pos = [], [], []
      for h, st in enumerate(self.heads[l]):
        keys = np.array(st.k + [k[h]])  # [n + 1, H]: the slots, then the new token
        vals = np.array(st.v + [v[h]])
        qh = q[h * self.G:(h + 1) * self.G]  # [G, H]
        z = qh @ keys.T / np.sqrt(self.H)
        pr = _softmax(z)
        attn[h * self.G:(h + 1) * self.G] = pr @ vals
        probs.append(pr), logits.append(z), cand_pos.append(np.array(st.pos + [p_new]))
      if self.name == "tova":  # per layer: by position, over all N query heads
        by_pos = {}
        for h in range(self.K):
          for j, ps in enumerate(cand_pos[h]):
            by_pos[ps] = by_pos.get(ps, 0.0) + probs[h][:, j].sum() / self.N
      for h, st in enumerate(self.heads[l]):
        cp = cand_pos[h]
        if self.name == "h2o":
          score = np.array(st.acc + [0.0]) + probs[h].sum(0) / self.G
        elif self.name == "keyformer":
          n = h * self.G + np.arange(self.G)[:, None]
          g = gumbel(self.knobs["seed"], l, n, p_new, cp[None, :])
          score = np.array(st.acc + [0.0]) + _softmax((logits[h] + g) / tau).sum(0) / self.G
        elif self.name == "tova":
          score = np.array([by_pos[ps] for ps in cp])
        else:
          score = cp.astype(np.float64)
        if self.name in ("h2o", "keyformer"):
          st.acc = list(score[:-1])
        new_acc = score[-1] if self.name in ("h2o", "keyformer") else 0.0
        if len(st.pos) < self.budget:
          st.pos.append(p_new), st.k.append(k[h]), st.v.append(v[h]), st.acc.append(new_acc)
          self.events["appended"] += 1
          continue
        prot = self._protected(cp, p_new)
        free = [j for j in range(len(cp)) if not prot[j]] or [len(cp) - 1]
        order = sorted(free, key=lambda j: (score[j], -j))
        if len(order) > 1:
          self.decisions.append(("decode", self.steps, l, h,
                                 score[order[1]] - score[order[0]]))
        out = order[0]
        if out < len(st.pos):  # the new token takes the evicted slot
          st.pos[out], st.k[out], st.v[out], st.acc[out] = p_new, k[h], v[h], new_acc
          self.events["replaced"] += 1
        else:
          self.events["dropped"] += 1
      x = self._out_mlp(l, x, attn[None])
    self.next_pos += 1
    self.steps += 1
    return self._head(x[0])

  def kept(self, l: int, h: int) -> list[int]:
    return sorted(self.heads[l][h].pos)

  def accumulated(self, l: int, h: int) -> dict[int, float]:
    """Kept position -> its accumulated score (H2O, Keyformer)."""
    st = self.heads[l][h]
    return dict(zip(st.pos, st.acc))

  def slots(self, l: int, h: int) -> list[int]:
    """The kept positions in slot order."""
    return list(self.heads[l][h].pos)
