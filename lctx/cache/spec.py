"""KV-cache compression specs: a string parsed once into a frozen, hashable
`CompressionSpec` (a jit static argument and a static pytree field).

Grammar (whitespace around every token is ignored):

  spec   := ""  |  policy ("+" policy)*          "" (or None) is dense: no compression
  policy := NAME  |  NAME ":" KEY "=" VALUE ("," KEY "=" VALUE)*

An int knob takes an int ("bits=4"; "bits=2.5" is an error), a float knob an
int or a decimal, a string knob one of its values exactly. Every knob not
given takes its default. A spec holds at most one policy of each kind, in
the order eviction, quantization, offload (KINDS). Eviction methods
(lctx.cache.evict, one file each) register themselves here (`register`).

  policy   kind          knobs [default]
  int8     quantization  scale in {head, token} [head], group int >= 0 [0]
  int4     quantization  as int8, two 4-bit values per byte
  fp8      quantization  scale in {tensor, head} [tensor], format in {e4m3, e5m2} [e4m3]
  kivi     quantization  bits in {2, 4, 8} [2], group int >= 1 [32],
                         residual int >= 0, a multiple of group [128]
  kvquant  quantization  bits in {2, 4, 8} [4], outliers float in [0, 0.5) [0.01],
                         sinks int >= 0 [1]
  offload  offload       (no knobs) the cache in host memory, streamed layer by layer
                         (lctx.cache.offload); with dense, int8 or int4 caches

  Eviction (lctx.cache.evict); every one also takes ratio float in [0, 1)
  (fraction removed, kvpress's convention) or budget int >= 0 (tokens kept;
  0: from ratio), and sinks int >= 0 (first tokens always kept):
  streaming_llm       eviction  sinks [4], positions in {original, cache}, decode
  h2o                 eviction  ratio [0.8], recent float in [0, 1] [0.5], decode
  snapkv              eviction  window int >= 1 [64], kernel odd int [5]
  tova                eviction  decode
  keyformer           eviction  ratio [0.4], recent float in [0, 1] [0.3], seed int [0], decode
  knorm               eviction  (ratio, budget, sinks only)
  observed_attention  eviction  (ratio, budget, sinks only)
  random              eviction  seed int >= 0 [0]
  oracle              eviction  spans "start-end/..." [""]: keeps those positions, then
                                the most recent (a quality baseline, lctx.quality)
  anti_oracle         eviction  spans as oracle: drops those positions first, even sinks
  decode in {append, evict} [append]: evict also evicts while decoding.

Examples: "snapkv:ratio=0.75,window=32+int8", "int8", "int4:group=64", "fp8:scale=head", "kivi:bits=2,group=32,residual=128",
"kvquant:bits=4,outliers=0.01,sinks=1". `describe()` (--kv_compression=help) is
the full table, from POLICIES. Errors are ValueErrors naming the policy, the
key and the allowed values; `CompressionSpec.check` adds the checks that need
the model config (head_dim, cache block), to run before compiling.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

KINDS = ("eviction", "quantization", "offload")  # at most one policy of each, in this order

# No "+" in numbers: it joins policies ("1e16", not "1e+16").
_NUMBER = {int: re.compile(r"-?\d+"), float: re.compile(r"-?(\d+\.?\d*|\.\d+)([eE]-?\d+)?")}
_A_TYPE = {int: "an int", float: "a float", str: "a string"}


@dataclasses.dataclass(frozen=True)
class Knob:
  """One key of a policy: its type, default, allowed values and meaning. The
  allowed values are `choices` when given, else the range [low, high) (either
  end may be open)."""

  type: type  # int, float or str
  default: object
  doc: str
  choices: tuple = ()
  low: float | None = None  # inclusive
  high: float | None = None  # exclusive

  @property
  def allowed(self) -> str:
    if self.choices:
      return "one of " + ", ".join(map(str, self.choices))
    bounds = [f">= {self.low}" if self.low is not None else "",
              f"< {self.high}" if self.high is not None else ""]
    if all(bounds):
      return f"{_A_TYPE[self.type]} in [{self.low}, {self.high})"
    return " ".join([_A_TYPE[self.type]] + [b for b in bounds if b])

  def convert(self, text: str) -> object:
    """The value written as `text`, or None when it is not of this knob's type."""
    pattern = _NUMBER.get(self.type)
    if pattern is None:
      return text
    return self.type(text) if pattern.fullmatch(text) else None

  def accepts(self, value) -> bool:
    if type(value) is not self.type or (self.type is float and not math.isfinite(value)):
      return False
    if self.choices:
      return value in self.choices
    return ((self.low is None or value >= self.low) and
            (self.high is None or value < self.high))


@dataclasses.dataclass(frozen=True)
class PolicyInfo:
  """A registered policy. `validate(policy)` checks its knobs together (at
  parse time); `check(policy, head_dim, block)` checks them against the model
  config (CompressionSpec.check). Both raise ValueError."""

  kind: str  # one of KINDS
  doc: str  # one line: what it does, and its source (paper or library)
  knobs: dict[str, Knob]
  validate: Callable[[Policy], None] | None = None
  check: Callable[[Policy, int, int | None], None] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"policy kind {self.kind!r} is not one of {', '.join(KINDS)}")


def _unknown_policy(name: str) -> ValueError:
  return ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)} "
                    f"(--kv_compression=help lists them with their knobs)")


def _knob(name: str, key: str) -> Knob:
  knobs = POLICIES[name].knobs
  if key not in knobs:
    raise ValueError(f"policy {name!r} has no key {key!r}; its keys: {', '.join(knobs)}")
  return knobs[key]


def _bad_value(name: str, key: str, value) -> ValueError:
  return ValueError(f"policy {name!r}: key {key!r} = {value!r} is not allowed; allowed: "
                    f"{_knob(name, key).allowed}")


@dataclasses.dataclass(frozen=True)
class Policy:
  """One policy with every knob: `params` is (key, value) pairs sorted by key,
  defaults filled in (the constructor fills and sorts them, so
  Policy("int4", (("group", 64),)) is the policy of "int4:group=64")."""

  name: str
  params: tuple[tuple[str, object], ...] = ()

  def __post_init__(self):
    if self.name not in POLICIES:
      raise _unknown_policy(self.name)
    knobs = POLICIES[self.name].knobs
    given = {}
    for key, value in self.params:
      knob = _knob(self.name, key)
      if key in given:
        raise ValueError(f"policy {self.name!r}: key {key!r} given twice; its keys: "
                         f"{', '.join(knobs)}")
      if knob.type is float and type(value) in (int, float):
        value = float(value) + 0.0  # ints accepted; -0.0 -> 0.0
      if not knob.accepts(value):
        raise _bad_value(self.name, key, value)
      given[key] = value
    values = {key: knob.default for key, knob in knobs.items()} | given
    object.__setattr__(self, "params", tuple(sorted(values.items())))
    if POLICIES[self.name].validate:
      POLICIES[self.name].validate(self)

  def __getitem__(self, key: str) -> object:
    for k, value in self.params:
      if k == key:
        return value
    raise KeyError(f"policy {self.name!r} has no key {key!r}; its keys: "
                   f"{', '.join(k for k, _ in self.params)}")

  @property
  def kind(self) -> str:
    return POLICIES[self.name].kind

  def __str__(self) -> str:
    knobs = POLICIES[self.name].knobs
    changed = [f"{k}={v}".replace("e+", "e") for k, v in self.params if v != knobs[k].default]
    return self.name + (":" + ",".join(changed) if changed else "")


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
  """Policies in the order given (at most one per kind, kinds in KINDS order);
  no policies is dense. str() is the canonical spec string."""

  policies: tuple[Policy, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "policies", tuple(self.policies))
    for kind in KINDS:
      same = [p.name for p in self.policies if p.kind == kind]
      if len(same) > 1:
        raise ValueError(f"at most one {kind} policy, got {' and '.join(same)} (a spec holds "
                         f"at most one policy of each kind: {', '.join(KINDS)})")
    for a, b in zip(self.policies, self.policies[1:]):
      if KINDS.index(a.kind) > KINDS.index(b.kind):
        raise ValueError(f"policy {b.name!r} ({b.kind}) must come before {a.name!r} "
                         f"({a.kind}): policies go in the order {' + '.join(KINDS)}")

  @property
  def dense(self) -> bool:
    return not self.policies

  def of_kind(self, kind: str) -> Policy | None:
    """The policy of that kind, if any."""
    return next((p for p in self.policies if p.kind == kind), None)

  @property
  def quantization(self) -> Policy | None:
    return self.of_kind("quantization")

  def __str__(self) -> str:
    return "+".join(map(str, self.policies))

  def check(self, head_dim: int, block: int | None = None) -> None:
    """The checks that need the model config: raises ValueError (naming the
    policy, key, value and allowed values) if a knob does not fit a head of
    `head_dim` channels or a cache block of `block` tokens."""
    for policy in self.policies:
      if POLICIES[policy.name].check:
        try:
          POLICIES[policy.name].check(policy, head_dim, block)
        except ValueError as e:
          raise ValueError(f"kv compression spec {str(self)!r}: {e}") from None


DENSE = CompressionSpec()


def parse(spec: str | CompressionSpec | None) -> CompressionSpec:
  """The CompressionSpec of a spec string (see the module docstring); a
  CompressionSpec passes through unchanged, None and "" are DENSE."""
  if isinstance(spec, CompressionSpec):
    return spec
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return DENSE
  if not isinstance(spec, str):
    raise TypeError(f"kv compression spec must be a string or CompressionSpec, got {spec!r}")
  try:
    return CompressionSpec(tuple(_parse_policy(text) for text in spec.split("+")))
  except ValueError as e:
    raise ValueError(f"kv compression spec {spec!r}: {e}") from None


def _parse_policy(text: str) -> Policy:
  name, colon, rest = (s.strip() for s in text.partition(":"))
  if not name:
    raise ValueError("empty policy: '+' with nothing on one side, or ':' without a name"
                     f"; known policies: {', '.join(POLICIES)}")
  if name not in POLICIES:
    raise _unknown_policy(name)
  keys = ", ".join(POLICIES[name].knobs)
  params = []
  for item in rest.split(",") if colon else ():
    key, eq, value = (s.strip() for s in item.partition("="))
    if not eq or not key:
      raise ValueError(f"policy {name!r}: {item.strip()!r} is not key=value "
                       f"(after ':', key=value pairs joined by ','); its keys: {keys}")
    converted = _knob(name, key).convert(value)
    if converted is None:
      raise _bad_value(name, key, value)
    params.append((key, converted))
  return Policy(name, tuple(params))


def describe() -> str:
  """The --kv_compression=help text: the grammar, then every policy with its
  kind, description and knobs (type, default, allowed values, meaning)."""
  lines = ["--kv_compression: KV-cache compression. '' = dense (none); else policies joined by",
           "'+', each NAME or NAME:KEY=VALUE,KEY=VALUE, at most one of each kind, in the order",
           f"{', '.join(KINDS)}. Examples: kivi:bits=2,group=32,residual=128; "
           "snapkv:ratio=0.75,window=32+int8; h2o:ratio=0.8,decode=evict; int8+offload."]
  for name, info in POLICIES.items():
    lines += ["", f"{name} ({info.kind}): {info.doc}"]
    width = max(map(len, info.knobs), default=0)
    for key, knob in info.knobs.items():
      lines.append(f"  {key:<{width}}  {knob.type.__name__}, default {knob.default}, "
                   f"{knob.allowed}: {knob.doc}")
  return "\n".join(lines)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _check_int(policy: Policy, head_dim: int, block: int | None) -> None:
  """int8/int4: a nonzero group divides head_dim; int4 packs two values per
  byte, so head_dim and the group are even."""
  even = policy.name == "int4"
  if even and head_dim % 2:
    raise ValueError(f"policy {policy.name!r} packs two values per byte and needs an even "
                     f"head_dim, got head_dim {head_dim} (use int8 or fp8)")
  group = policy["group"]
  allowed = [d for d in _divisors(head_dim) if not (even and d % 2)]
  if group and group not in allowed:
    raise ValueError(f"policy {policy.name!r}: key 'group' = {group} must be 0 or "
                     f"{'an even' if even else 'a'} divisor of head_dim {head_dim}; allowed: "
                     f"{', '.join(map(str, [0] + allowed))}")


def _validate_kivi(policy: Policy) -> None:
  group, residual = policy["group"], policy["residual"]
  if residual % group:
    raise ValueError(f"policy 'kivi': key 'residual' = {residual} must be a multiple of "
                     f"group = {group}; allowed: 0, {group}, {2 * group}, {3 * group}, ...")


def _check_kivi(policy: Policy, head_dim: int, block: int | None) -> None:
  """Value groups are channels (group divides head_dim); key groups are
  tokens of a cache block (group divides block)."""
  group = policy["group"]
  allowed = [d for d in _divisors(head_dim) if block is None or block % d == 0]
  if group not in allowed:
    where = f"head_dim {head_dim} (value groups are channels)"
    if block is not None:
      where += f" and the cache block {block} (key groups are tokens of a block)"
    raise ValueError(f"policy 'kivi': key 'group' = {group} must divide {where}; allowed: "
                     f"{', '.join(map(str, allowed))}")


# kvquant needs no config check: outliers < 0.5 leaves most of any head quantized.
_INT_KNOBS = {
    "scale": Knob(str, "head", "head: one scale per (token, KV head); token: one per token "
                  "across all KV heads", choices=("head", "token")),
    "group": Knob(int, 0, "channels sharing a scale; 0 = the whole head", low=0),
}
_BITS = (2, 4, 8)

POLICIES: dict[str, PolicyInfo] = {
    "int8": PolicyInfo(
        "quantization", "symmetric absmax int8 (absmax quantization as in LLM.int8(), "
        "Dettmers et al. 2022, arXiv 2208.07339)", _INT_KNOBS, check=_check_int),
    "int4": PolicyInfo(
        "quantization", "symmetric absmax int4, two values packed per byte (like llama.cpp's "
        "q4_0 KV cache type)", _INT_KNOBS, check=_check_int),
    "fp8": PolicyInfo(
        "quantization", "float8 with a scale fixed by the first write (vLLM's "
        "kv_cache_dtype=fp8_e4m3 / fp8_e5m2)", {
            "scale": Knob(str, "tensor", "tensor: one scale per layer's K (and V); head: one "
                          "per KV head", choices=("tensor", "head")),
            "format": Knob(str, "e4m3", "float8 format: e4m3 (more precision) or e5m2 (more "
                           "range)", choices=("e4m3", "e5m2")),
        }),
    "kivi": PolicyInfo(
        "quantization", "asymmetric per-channel keys, per-token values, recent tokens in full "
        "precision (KIVI, Liu et al. 2024, arXiv 2402.02750)", {
            "bits": Knob(int, 2, "bits per quantized value", choices=_BITS),
            "group": Knob(int, 32, "tokens per key group, channels per value group", low=1),
            "residual": Knob(int, 128, "most recent tokens kept in full precision; a multiple "
                             "of group", low=0),
        }, validate=_validate_kivi, check=_check_kivi),
    "kvquant": PolicyInfo(
        "quantization", "per-channel keys, per-token values, outlier channels and attention "
        "sinks in full precision (KVQuant, Hooper et al. 2024, arXiv 2401.18079)", {
            "bits": Knob(int, 4, "bits per quantized value", choices=_BITS),
            "outliers": Knob(float, 0.01, "fraction of each vector's channels kept in full "
                             "precision", low=0, high=0.5),
            "sinks": Knob(int, 1, "first tokens kept in full precision", low=0),
        }),
    "offload": PolicyInfo(
        "offload", "the cache lives in pinned host memory; a decode step brings each layer to "
        "the device one layer ahead of use (FlexGen, Sheng et al. 2023, arXiv 2303.06865)",
        {}),
}


def register(methods) -> None:
  """Adds eviction methods (lctx.cache.evict.METHODS: name -> Method) to
  POLICIES; lctx.cache.evict calls it once when it is imported."""
  for name, m in methods.items():
    POLICIES[name] = PolicyInfo("eviction", m.doc, m.knobs, validate=m.validate)


# The eviction methods register themselves (they import this module for Knob).
import lctx.cache.evict  # noqa: E402,F401
