"""Quality tasks: seeded, deterministic examples that record where the answer sits.

An `Example` is a context (compressed by the policy under test), then a
continuation fed token by token after it (the question, then the answer,
teacher-forced), with the indices of the answer tokens in the continuation
and the context positions that hold what the answer needs.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  """One task instance, token ids only.

  context: token ids [T] (the part the compression policy sees and compresses).
  continuation: token ids [Q] fed after the context, teacher-forced (the
    question, then the answer tokens; for MQAR the queries and their values).
  answers: the answers, each a tuple of indices into `continuation` of its
    tokens; token j is predicted by the logits of the token before it (of the
    context's last token when j == 0). An answer is right when every one of its
    tokens is the argmax: exactly what greedy decoding would produce.
  spans: [start, end) context positions holding what the answers need (the
    needle, the key-value pairs, the copied tokens): the oracle keeps them,
    the anti-oracle drops them, answer recall counts them.
  task, depth (fraction of the context before the needle, None where the task
    has none), seed: metadata for the result rows.
  """
  context: tuple[int, ...]
  continuation: tuple[int, ...]
  answers: tuple[tuple[int, ...], ...]
  spans: tuple[tuple[int, int], ...]
  task: str
  depth: float | None = None
  seed: int = 0

  def __post_init__(self):
    Q = len(self.continuation)
    if not self.context:
      raise ValueError(f"{self.task}: the context is empty; allowed: at least one token")
    if not self.answers:  # nothing to score: accuracy and KL would be empty means
      raise ValueError(f"{self.task}: no answers; allowed: at least one tuple of continuation "
                       f"indices")
    for a in self.answers:
      if not a or any(not 0 <= j < Q for j in a):
        raise ValueError(f"{self.task}: answer token indices {a} outside the continuation "
                         f"[0, {Q})")
    for s, e in self.spans:
      if not 0 <= s < e <= len(self.context):
        raise ValueError(f"{self.task}: span [{s}, {e}) outside the context "
                         f"[0, {len(self.context)})")

  @property
  def first_answer(self) -> int:
    """Index in the continuation of the first answer token: what comes before
    it is the question (fed into the prefill in the query-aware protocol)."""
    return min(min(a) for a in self.answers)


# --- Text tasks on a chat model (SmolLM2-135M-Instruct): token-level builders.
#
# A context is the chat template's head, an instruction, and a haystack of
# whole sentences with the needle(s) inserted at sentence boundaries; the
# continuation is the question, the template's turn change, a primer that
# starts the assistant's answer ("The pass key is") and the answer. Pieces
# are tokenized separately and joined at spaces and newlines, where the
# byte-level BPE splits anyway, so the joined ids are the text's own
# tokenization. Every example of a (task, length, depth) cell has the same
# haystack and token counts, so its answer spans are the same for all of them
# (they run as one batch, the oracles too); examples differ in the keys and
# values drawn from the seed.

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
                  "Here we go. There and back again.")  # Mohtashami & Jaggi 2023, arXiv 2305.16300
NEEDLE_KEYS = ("apple", "river", "garden", "window", "tiger", "silver", "doctor", "planet",
               "orange", "bridge", "winter", "castle", "forest", "dragon", "island", "rocket",
               "pencil", "mirror", "coffee", "violin", "button", "candle", "jacket", "meadow")


def prose(min_chars: int = 0) -> str:
  """Real English prose shipped with Python itself: the paragraphs of the
  language reference in `pydoc_data.topics` (help() texts) that read as
  sentences (grammar and code blocks left out), in sorted topic order.
  The text depends on the Python minor version (recorded in the sweep's meta)."""
  from pydoc_data import topics
  paras = []
  for name in sorted(topics.topics):
    for para in topics.topics[name].split("\n\n"):
      lines = para.split("\n")
      if any(not ln or ln[0] in " *=-" for ln in lines) or "::" in para:
        continue
      text = " ".join(ln.strip() for ln in lines)
      if text.endswith(".") and len(text) > 80 and "`" not in text:
        paras.append(text)
  text = " ".join(paras)
  if len(text) < min_chars:
    raise ValueError(f"pydoc_data prose has {len(text)} characters, fewer than {min_chars}")
  return text


def _sentences(text: str) -> list[str]:
  """Sentences, each with its leading space (so they join by concatenation)."""
  import re
  return [" " + s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


class ChatBuilder:
  """Token ids of chat prompts for a tokenizer with a chat template
  (lctx.tokenizer.Tokenizer): head = the template up to the user's text,
  turn = from the end of the user's text to the assistant's first token."""

  def __init__(self, tok):
    self.tok = tok
    marker = "\x00MARK\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}])
    head, turn = text.split(marker)
    self.head, self.turn = self.encode(head), self.encode(turn)
    self._cache: dict[str, tuple[int, ...]] = {}

  def encode(self, text: str) -> tuple[int, ...]:
    return tuple(self.tok.encode(text, add_special_tokens=False))

  def sentence_ids(self, text: str) -> list[tuple[int, ...]]:
    if text not in self._cache:
      self._cache[text] = [self.encode(s) for s in _sentences(text)]
    return self._cache[text]

  def example(self, task: str, instruction: str, filler: str, length: int,
              needles: list[tuple[float, str, bool]], question: str, primer: str,
              answer: str, depth: float, seed: int) -> Example:
    """An example of exactly `length` context tokens: `instruction`, then
    the end of a sentence and whole sentences of `filler` (repeated as
    needed) with each needle text inserted at the sentence boundary nearest
    its depth (fraction of the haystack's sentences before it); needles
    flagged True are answer spans."""
    head = self.head + self.encode(instruction)
    needle_ids = [(d, self.encode(" " + t.strip()), asked) for d, t, asked in needles]
    room = length - len(head) - sum(len(n) for _, n, _ in needle_ids)
    sents, total, base = [], 0, self.sentence_ids(filler)
    while True:
      s = base[len(sents) % len(base)]
      if total + len(s) > room:
        break
      sents.append(s)
      total += len(s)
    if not sents:
      raise ValueError(f"{task}: context length {length} has no room for a haystack; "
                       f"allowed: >= {length - room + len(base[0])} tokens")
    at = sorted(((round(d * len(sents)), i) for i, (d, _, _) in enumerate(needle_ids)))
    # The haystack opens with the end of the sentence that did not fit, so the
    # context is exactly `length` tokens (an excerpt starting mid-sentence):
    # every task at a length then has the same shape and compiles once.
    context, spans, k = list(head) + list(s[len(s) - (room - total):]), [], 0
    for j in range(len(sents) + 1):
      while k < len(at) and at[k][0] == j:
        _, ids, asked = needle_ids[at[k][1]]
        if asked:
          spans.append((len(context), len(context) + len(ids)))
        context += ids
        k += 1
      if j < len(sents):
        context += sents[j]
    q = self.encode("\n\n" + question) + self.turn + self.encode(primer)
    a = self.encode(" " + answer)
    return Example(tuple(context), q + a, (tuple(range(len(q), len(q) + len(a))),),
                   tuple(spans), task, depth, seed)


def _number(rng, digits: int) -> str:
  return str(rng.integers(10 ** (digits - 1), 10 ** digits))


def passkey(builder: ChatBuilder, length: int, depth: float, n: int, seed: int = 0) -> list[Example]:
  """Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300): a 5-digit
  pass key stated twice in one needle at `depth` of repeated filler; asked
  at the end. Answer: the key's digits."""
  _check_args("passkey", depth, n, seed)
  rng = np.random.default_rng([seed, length, int(depth * 1000), 1])
  out = []
  for _ in range(n):
    key = _number(rng, 5)
    out.append(builder.example(
        "passkey", "There is an important piece of information hidden inside a lot of "
        "irrelevant text. Find it and memorize it. I will quiz you about it.",
        PASSKEY_FILLER, length, [(depth, f"The pass key is {key}. Remember it. {key} is the "
                                 "pass key.", True)],
        "What is the pass key?", "The pass key is", key, depth, seed))
  return out


def needle(builder: ChatBuilder, length: int, depth: float, n: int, seed: int = 0,
           keys: int = 1) -> list[Example]:
  """RULER's needle in a haystack (Hsieh et al. 2024, arXiv 2404.06654,
  niah_single / niah_multikey): "One of the special magic numbers for
  {word} is: {7 digits}." in real prose (`prose`); with keys > 1, the other
  needles (other words) sit at depths depth + i / keys (mod 1) and only the
  asked one is an answer span. Task "needle_single" or "needle_multikey"."""
  _check_args("needle", depth, n, seed)
  if not 1 <= keys <= len(NEEDLE_KEYS):
    raise ValueError(f"needle: keys = {keys}; allowed: an int in [1, {len(NEEDLE_KEYS)}]")
  rng = np.random.default_rng([seed, length, int(depth * 1000), keys, 2])
  task = "needle_single" if keys == 1 else "needle_multikey"
  out = []
  for _ in range(n):
    words = [str(w) for w in rng.choice(NEEDLE_KEYS, keys, replace=False)]
    values = [_number(rng, 7) for _ in words]
    needles = [((depth + i / keys) % 1.0 if i else depth,
                f"One of the special magic numbers for {w} is: {v}.", i == 0)
               for i, (w, v) in enumerate(zip(words, values))]
    out.append(builder.example(
        task, "Some special magic numbers are hidden within the following text. Make sure to "
        "memorize them. I will quiz you about the numbers afterwards.",
        _PROSE(), length, needles,
        f"What is the special magic number for {words[0]} mentioned in the provided text?",
        f"The special magic number for {words[0]} mentioned in the provided text is",
        values[0], depth, seed))
  return out


def variable_tracking(builder: ChatBuilder, length: int, depth: float, n: int, seed: int = 0,
                      hops: int = 1, spread: bool = False) -> list[Example]:
  """RULER's variable tracking (arXiv 2404.06654), asked for the value: a
  chain "VAR A = 12345." "VAR B = VAR A." ... (`hops` assignments after the
  first) in repeated filler, asked "What is the value of VAR <last>?".
  Every statement of the chain is an answer span.

  Where the chain sits: at `depth`, its statements one after the other
  (default), or with `spread` the first at `depth` and the rest spread over
  what follows, as RULER scatters them. The defaults (1 hop, together) are
  what SmolLM2-135M-Instruct reads: uncompressed, 2 hops spread answer 0 of
  10 at 512 tokens and 3 of 20 at 256; 1 hop spread 8 of 20 at 512 and 16 of
  20 at 256; 1 hop together 13 of 20 at 512 and 19 of 20 at 256 (greedy,
  4 examples at each of depths 0, 0.25, 0.5, 0.75, 1; the model mostly
  answers "1." when it loses the chain). RULER's default is 4 hops."""
  _check_args("variable_tracking", depth, n, seed)
  if hops < 1:
    raise ValueError(f"variable_tracking: hops = {hops}; allowed: an int >= 1")
  rng = np.random.default_rng([seed, length, int(depth * 1000), hops, int(spread), 3])
  letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
  out = []
  for _ in range(n):
    names = [_name(builder, rng, letters) for _ in range(hops + 1)]
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                              for i in range(1, hops + 1)]
    at = [depth + (1 - depth) * i / (hops + 1) if spread else depth for i in range(hops + 1)]
    ex = builder.example(
        "variable_tracking", "Memorize and track the chain of variable assignments hidden "
        "in the following text.", PASSKEY_FILLER, length,
        [(d, s, True) for d, s in zip(at, chain)],
        f"What is the value of VAR {names[-1]}?", f"The value of VAR {names[-1]} is",
        value, depth, seed)
    out.append(ex)
  return out


def _check_args(task: str, depth: float, n: int, seed: int) -> None:
  """ValueError naming the argument: depth in [0, 1] (a needle past the end
  would be left out silently), n and seed ints >= 0."""
  if not 0 <= depth <= 1:  # NaN fails too
    raise ValueError(f"{task}: depth = {depth}; allowed: a fraction in [0, 1]")
  for name, v in (("n", n), ("seed", seed)):
    if not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{task}: {name} = {v!r}; allowed: an int >= 0")


def _name(builder: ChatBuilder, rng, letters) -> str:
  """A random 5-letter upper-case name (RULER's) that is 3 tokens after a
  space and 4 with a '.' or '?' after it, so every example of a cell has
  the same token counts and answer spans."""
  while True:
    name = "".join(rng.choice(letters, 5))
    if (len(builder.encode(" " + name)) == 3 and len(builder.encode(" " + name + ".")) == 4
        and len(builder.encode(" " + name + "?")) == 4):
      return name


def fidelity(builder: ChatBuilder, length: int, n: int, seed: int = 0,
             continuation: int = 64) -> list[Example]:
  """Next-token fidelity on real English (`prose`, no chat template): the
  context is `length` tokens of it from a seeded offset, the continuation
  the next `continuation` tokens, each scored (KL and top-1 agreement
  against the uncompressed cache; accuracy is next-token accuracy)."""
  ids = builder.encode(_PROSE())
  if len(ids) < length + continuation:
    raise ValueError(f"fidelity: the prose has {len(ids)} tokens, fewer than context "
                     f"{length} + continuation {continuation}")
  rng = np.random.default_rng([seed, length, 4])
  out = []
  for o in rng.integers(0, len(ids) - length - continuation, n):
    span = ids[o:o + length + continuation]
    out.append(Example(tuple(span[:length]), tuple(span[length:]),
                       tuple((j,) for j in range(continuation)), (), "fidelity", None, seed))
  return out


@functools.cache
def _PROSE() -> str:
  return prose()
