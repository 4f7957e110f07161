"""Seeded synthetic long-context tasks: MQAR and selective copy.

Two tasks whose answers sit at known context positions, each in two forms:
evaluation `Example`s (lctx.quality.tasks: a context the policy under test
compresses, then a teacher-forced continuation) and training batches
(tokens, next-token targets and a loss mask, all [B, L]).

MQAR, multi-query associative recall (Arora et al. 2023, "Zoology", arXiv
2312.04927): the sequence opens with P key-value pairs `k1 v1 ... kP vP`
(positions 0..2P-1), keys drawn without replacement from the lower half of
the content ids, values without replacement from the upper half; then each
key is asked again and the token after it must be its value.

Selective copy (Gu & Dao 2023, "Mamba", arXiv 2312.00752, section 4.1.1):
n data tokens scattered at random positions among NOISE tokens, then a
MARKER, after which the data tokens must be reproduced in order. Here the
data tokens are distinct (drawn without replacement from all content ids),
(Mamba's data tokens come from a 16-token vocabulary), so that "the data
token after d_i" is unique.

Vocabulary (VOCAB_SIZE = 128 ids; small, so that every token's embedding is
trained often in a short CPU run):
  0 PAD     after a training sequence's end (loss-masked, never predicted)
  1 FILLER  MQAR filler between the pairs and the queries (and induction gaps)
  2 NOISE   selective copy noise
  3 MARKER  selective copy: "copy the data tokens now"
  4-7       reserved
  8-67      MQAR keys (KEY_IDS, the lower half of the content ids, 60 ids)
  68-127    MQAR values (VALUE_IDS, the upper half, 60 ids)
  8-127     selective copy and induction tokens (CONTENT_IDS)

A third task, induction (repeated random tokens, induction_batch), is only a
training aid: it makes the induction head that both tasks rely on form early.

Every generator is deterministic: a seed (int or tuple of ints, fed to
numpy.random.default_rng) gives the same tokens on every machine.
"""

from __future__ import annotations

import numpy as np

from lctx.quality.tasks import Example

VOCAB_SIZE = 128
PAD, FILLER, NOISE, MARKER = 0, 1, 2, 3
NUM_SPECIAL = 8
CONTENT_IDS = np.arange(NUM_SPECIAL, VOCAB_SIZE)
_HALF = NUM_SPECIAL + (VOCAB_SIZE - NUM_SPECIAL) // 2
KEY_IDS = np.arange(NUM_SPECIAL, _HALF)
VALUE_IDS = np.arange(_HALF, VOCAB_SIZE)

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def _rng(seed) -> np.random.Generator:
  return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _pairs(rng: np.random.Generator, P: int) -> tuple[np.ndarray, np.ndarray]:
  """P distinct keys (KEY_IDS) and P distinct values (VALUE_IDS), int32 [P] each."""
  if not 0 < P <= len(KEY_IDS):
    raise ValueError(f"MQAR needs 1 <= num_pairs <= {len(KEY_IDS)}, got {P}")
  keys = rng.choice(KEY_IDS, P, replace=False).astype(np.int32)
  values = rng.choice(VALUE_IDS, P, replace=False).astype(np.int32)
  return keys, values


# ---- evaluation examples --------------------------------------------------------------

def mqar_example(seed: int, context_len: int = 512, num_pairs: int = 32) -> Example:
  """One MQAR evaluation example (the layout the trained model is measured on).

  context [T = context_len]: k1 v1 ... kP vP, then FILLER up to T.
  continuation [2P]: q1 a1 q2 a2 ... (every key once, in random order, each
    followed by its value); answers ((1,), (3,), ...): each value, predicted by
    the logits at its query; spans: [2i, 2i + 2) for pair i (its key and value).
  """
  T, P = context_len, num_pairs
  if T < 2 * P:
    raise ValueError(f"MQAR context_len {T} cannot hold {P} pairs (needs >= {2 * P})")
  rng = _rng(seed)
  keys, values = _pairs(rng, P)
  context = np.full(T, FILLER, np.int32)
  context[0:2 * P:2], context[1:2 * P:2] = keys, values
  order = rng.permutation(P)
  continuation = np.stack([keys[order], values[order]], axis=1).reshape(-1)
  return Example(context=tuple(context.tolist()), continuation=tuple(continuation.tolist()),
                 answers=tuple((2 * i + 1,) for i in range(P)),
                 spans=tuple((2 * i, 2 * i + 2) for i in range(P)),
                 task="mqar", depth=None, seed=int(seed))


def selective_copy_example(seed: int, context_len: int = 512, num_tokens: int = 16) -> Example:
  """One selective copy evaluation example.

  context [T]: NOISE everywhere but n sorted random positions holding distinct
    data tokens d1..dn (CONTENT_IDS); continuation [n + 1]: MARKER d1 ... dn;
  answers ((1,), ..., (n,)): every data token (d1 predicted at the marker);
  spans: (p_i, p_i + 1) at each data position.
  """
  T, n = context_len, num_tokens
  if not 0 < n <= min(T, len(CONTENT_IDS)):
    raise ValueError(f"selective copy needs 1 <= num_tokens <= min(context_len, "
                     f"{len(CONTENT_IDS)}), got {n} with context_len {T}")
  rng = _rng(seed)
  positions = np.sort(rng.choice(T, n, replace=False))
  data = rng.choice(CONTENT_IDS, n, replace=False).astype(np.int32)
  context = np.full(T, NOISE, np.int32)
  context[positions] = data
  return Example(context=tuple(context.tolist()),
                 continuation=(MARKER, *data.tolist()),
                 answers=tuple((i + 1,) for i in range(n)),
                 spans=tuple((int(p), int(p) + 1) for p in positions),
                 task="selective_copy", depth=None, seed=int(seed))


# ---- training batches -----------------------------------------------------------------

def _shifted(seqs: np.ndarray, answer_pos: np.ndarray) -> Batch:
  """(tokens, targets, mask) from full sequences [B, L + 1] and a boolean
  [B, L + 1] marking the tokens to predict: targets[t] = seqs[t + 1], and the
  mask is 1 at position t when token t + 1 is an answer."""
  tokens = seqs[:, :-1].astype(np.int32)
  targets = seqs[:, 1:].astype(np.int32)
  mask = answer_pos[:, 1:].astype(np.float32)
  return tokens, targets, mask


def mqar_batch(seed, batch: int, seq_len: int, num_pairs: int | tuple[int, int] = 32, *,
               alpha: float = 0.5, eval_layout_frac: float = 0.5) -> Batch:
  """MQAR training batch: tokens, targets int32 [B, L], mask float32 [B, L]
  (L = seq_len; the loss counts only values that follow a query).

  Each row draws P pairs (num_pairs, or uniform in [lo, hi]) and one of two
  layouts after them:
    Zoology's: the L - 2P tokens after the pairs are 2-token slots; P of them,
      drawn without replacement with probability proportional to g^-alpha
      (g = 1, 2, ... the slot's gap after the pairs, a power law), hold a query
      and its value, the others FILLER;
    the evaluation layout (with probability eval_layout_frac): a random amount
      of FILLER, then all P queries back to back (random order), then PAD.
  """
  rng = _rng(seed)
  lo, hi = (num_pairs, num_pairs) if isinstance(num_pairs, int) else num_pairs
  if 2 * 2 * hi > seq_len:
    raise ValueError(f"MQAR seq_len {seq_len} cannot hold {hi} pairs and their queries")
  L1 = seq_len + 1
  seqs = np.full((batch, L1), FILLER, np.int32)
  answer = np.zeros((batch, L1), bool)
  for b in range(batch):
    P = int(rng.integers(lo, hi + 1))
    keys, values = _pairs(rng, P)
    seqs[b, 0:2 * P:2], seqs[b, 1:2 * P:2] = keys, values
    order = rng.permutation(P)
    if rng.random() < eval_layout_frac:
      start = 2 * P + int(rng.integers(0, L1 - 4 * P + 1))
      q = start + 2 * np.arange(P)
      seqs[b, start + 2 * P:] = PAD
    else:
      slots = (L1 - 2 * P) // 2
      p = np.arange(1, slots + 1, dtype=np.float64) ** -alpha
      q = 2 * P + 2 * np.sort(rng.choice(slots, P, replace=False, p=p / p.sum()))
    seqs[b, q], seqs[b, q + 1] = keys[order], values[order]
    answer[b, q + 1] = True
  return _shifted(seqs, answer)


def selective_copy_batch(seed, batch: int, seq_len: int, num_tokens: int = 16) -> Batch:
  """Selective copy training batch: tokens, targets int32 [B, L], mask float32
  [B, L] (loss on the n copied tokens only).

  Each row is the evaluation layout with a random context length T: T tokens
  of NOISE with n distinct data tokens at random positions, MARKER, the data
  tokens in order, then PAD. T is uniform in [n, Tmax] (Tmax = L - n - 1, the
  longest that fits) for half of the rows and in [Tmax / 2, Tmax] for the
  others, so long contexts (sparse data, long gaps: the hard case) are
  frequent.
  """
  rng = _rng(seed)
  n = num_tokens
  if 2 * n + 1 > seq_len:
    raise ValueError(f"selective copy seq_len {seq_len} cannot hold {n} data tokens twice")
  L1 = seq_len + 1
  seqs = np.full((batch, L1), PAD, np.int32)
  answer = np.zeros((batch, L1), bool)
  for b in range(batch):
    T_max = L1 - n - 1  # context + marker + n copies fit in L + 1
    T = int(rng.integers(n if rng.random() < 0.5 else max(n, T_max // 2), T_max + 1))
    positions = np.sort(rng.choice(T, n, replace=False))
    data = rng.choice(CONTENT_IDS, n, replace=False)
    seqs[b, :T] = NOISE
    seqs[b, positions] = data
    seqs[b, T] = MARKER
    seqs[b, T + 1:T + 1 + n] = data
    answer[b, T + 1:T + 1 + n] = True
  return _shifted(seqs, answer)


def induction_batch(seed, batch: int, seq_len: int) -> Batch:
  """Repeated random tokens (the induction-head task of Olsson et al. 2022,
  "In-context learning and induction heads"): tokens, targets int32 [B, L],
  mask float32 [B, L].

  Each row: m distinct random content tokens x (m uniform in [4, M], M the
  largest that fits twice, at most len(CONTENT_IDS)), a random run of FILLER,
  x again, then PAD; the loss counts x's repeat but its first token. The
  model can only predict the repeat by finding the earlier occurrence of its
  current token and copying the token after it, which is exactly what an MQAR
  query needs; dense supervision makes this circuit form in a few hundred
  steps, far sooner than from MQAR's few answers per row.
  """
  rng = _rng(seed)
  L1 = seq_len + 1
  M = min(L1 // 2, len(CONTENT_IDS))
  if M < 4:
    raise ValueError(f"induction seq_len {seq_len} too short (needs >= 7)")
  seqs = np.full((batch, L1), PAD, np.int32)
  answer = np.zeros((batch, L1), bool)
  for b in range(batch):
    m = int(rng.integers(4, M + 1))
    gap = int(rng.integers(0, L1 - 2 * m + 1))
    x = rng.choice(CONTENT_IDS, m, replace=False)
    seqs[b, :m] = x
    seqs[b, m:m + gap] = FILLER
    seqs[b, m + gap:2 * m + gap] = x
    answer[b, m + gap + 1:2 * m + gap] = True
  return _shifted(seqs, answer)


def mixed_batch(seed, batch: int, seq_len: int, num_pairs: int | tuple[int, int] = 32,
                num_tokens: int = 16, mix: tuple[float, float, float] = (0.5, 0.5, 0.0),
                **mqar_kwargs) -> Batch:
  """Rows of MQAR, selective copy and induction in proportions mix = (mqar,
  copy, induction) (row counts rounded, MQAR takes the rest), in that order,
  [B, L] each as in mqar_batch, selective_copy_batch and induction_batch."""
  rng = _rng(seed)
  total = sum(mix)
  n_copy = int(round(batch * mix[1] / total))
  n_ind = int(round(batch * mix[2] / total))
  n_mqar = batch - n_copy - n_ind
  parts = []
  if n_mqar > 0:
    parts.append(mqar_batch(rng, n_mqar, seq_len, num_pairs, **mqar_kwargs))
  if n_copy:
    parts.append(selective_copy_batch(rng, n_copy, seq_len, num_tokens))
  if n_ind:
    parts.append(induction_batch(rng, n_ind, seq_len))
  return tuple(np.concatenate(xs) for xs in zip(*parts))

