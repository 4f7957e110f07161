"""Per-device costs read from a program's partitioned HLO, in native dtypes.

The program analysed is XLA's module right after SPMD partitioning (per-device
shapes, inserted collectives) and before any backend pass, so a CPU host sees
what a GPU/TPU would run: the CPU backend's bf16->f32 rewrites come later
(../shared/design/JAX_NOTES.md). For a single device the module before
optimizations plays that role.

Counting conventions (per device):
  flops           dots: 2 x output elements x contracted size; elementwise and
                  reductions: one per element (reductions: per input element);
                  data movement (copy, transpose, slice, broadcast...): 0
  transcendentals exp, log, tanh, logistic, rsqrt, sqrt, power, sin, cos, ...
  bytes_upper     every op's operands and outputs (no fusion at all)
  bytes_ideal     only what must touch memory under perfect fusion: dot
                  operands and outputs, reduction inputs and outputs,
                  collectives, writes into buffers (dynamic-update-slice /
                  scatter updates); slices are read by their consumers; and a
                  chain of pointwise ops and reductions from one matmul into
                  the next stays on chip (flash attention's scores, a fused
                  MLP's hidden units), so its ends and its reductions are free;
                  dot operands that JAX's CPU lowering widens (bf16 -> f32)
                  count in their native dtype
  while loops     body x trip count (read from the loop condition's bound)
  conditionals    the branch moving the fewest bytes (lctx writes a finished
                  row of attention output once per row, not on every pair),
                  unless another computes markedly more FLOPs (then that one:
                  an upper bound, a skipped attention block counts as
                  computed); bytes_upper: the largest branch
  host_transfer_bytes
                  bytes crossing between host and device memory, from JAX's
                  memory placements (see host_transfer_bytes)
  temp_bytes      peak bytes of live buffers other than the arguments (outputs
                  included) when the program runs in its listed order, under
                  the same fusion model as bytes_ideal: a value is a buffer
                  unless it is a pointwise intermediate whose every user fuses
                  it, or sits inside a matmul chain; slices, in-place updates,
                  loops and conditionals alias their operands; a called
                  computation adds its own peak while it runs (see peak_bytes)
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
from collections import defaultdict
from typing import Any

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "token": 0}
FREE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "reshape",
            "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "domain",
            "add-dependency"}
MOVE_OPS = {"copy", "transpose", "broadcast", "slice", "concatenate", "pad", "reverse",
            "convert", "bitcast-convert", "copy-start", "copy-done", "dynamic-reshape"}
TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh",
                  "logistic", "rsqrt", "sqrt", "cbrt", "power", "sine", "cosine", "tan",
                  "atan2", "erf"}
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast"}

_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")


def _dtype_bytes(dtype: str) -> float:
  if dtype.startswith("f8"):
    return 1
  return DTYPE_BYTES.get(dtype, 4)


def shape_arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
          for m in _ARRAY.finditer(shape.split("{")[0] if not shape.startswith("(") else shape)]


def shape_bytes(shape: str) -> float:
  return sum(_dtype_bytes(dt) * math.prod(dims) for dt, dims in shape_arrays(shape))


def shape_elements(shape: str) -> int:
  return sum(math.prod(dims) for _, dims in shape_arrays(shape))


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str  # the text inside the parentheses (a constant's value)
  attrs: str
  op_name: str


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instr]]
  entry: str
  _fusion: dict = dataclasses.field(default_factory=dict, repr=False)

  def fusion(self, name: str) -> tuple[dict[str, bool], dict[str, bool], dict[str, str]]:
    """(from_dot, to_dot, widened) of a computation (see _matmul_chains and
    _widened_for_dots), shared by the cost and the liveness walks."""
    if name not in self._fusion:
      instrs = self.computations[name]
      self._fusion[name] = (*_matmul_chains(instrs), _widened_for_dots(instrs))
    return self._fusion[name]


def parse(text: str) -> Module:
  comps: dict[str, list[Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m and not line.lstrip().startswith("HloModule"):
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    depth, split = 1, len(rest)
    for i, ch in enumerate(rest):  # the operand list ends at the matching parenthesis
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        split = i
        break
    operands = re.findall(r"%([\w.\-]+)", rest[:split])
    op_name = re.search(r'op_name="([^"]*)"', rest)
    comps[current].append(Instr(name, shape, opcode, operands, rest[:split], rest[split + 1:],
                                op_name.group(1) if op_name else ""))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return Module(comps, entry)


@dataclasses.dataclass
class Costs:
  flops: float = 0.0
  transcendentals: float = 0.0
  bytes_upper: float = 0.0
  bytes_ideal: float = 0.0
  host_transfer_bytes: float = 0.0  # set by analyze (see host_transfer_bytes); not summed
  collectives: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # kind -> bytes
  collective_ops: list = dataclasses.field(default_factory=list)  # (kind, bytes, participants, count)
  ops: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: np.zeros(3)))
  unknown_trip_counts: int = 0
  temp_bytes: float = 0.0  # the whole program's peak (set by module_costs; not summed)

  def add(self, other: "Costs", times: float = 1.0) -> None:
    for f in ("flops", "transcendentals", "bytes_upper", "bytes_ideal"):
      setattr(self, f, getattr(self, f) + times * getattr(other, f))
    for k, v in other.collectives.items():
      self.collectives[k] += times * v
    self.collective_ops += [(k, b, p, c * times) for k, b, p, c in other.collective_ops]
    for k, v in other.ops.items():
      self.ops[k] = self.ops[k] + times * v
    self.unknown_trip_counts += other.unknown_trip_counts

  @property
  def collective_bytes(self) -> float:
    return sum(self.collectives.values())

  def top_ops(self, peak_flops: float, bandwidth: float, n: int = 20) -> list[dict[str, Any]]:
    """The n ops (by source op_name) with the most predicted time, each
    max(FLOPs / peak_flops, ideal bytes / bandwidth) in seconds."""
    rows = [{"op_name": k, "flops": float(v[0]), "bytes_ideal": float(v[1]),
             "bytes_upper": float(v[2]), "seconds": max(v[0] / peak_flops, v[1] / bandwidth)}
            for k, v in self.ops.items()]
    return sorted(rows, key=lambda r: r["seconds"], reverse=True)[:n]


def _participants(attrs: str) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the named axes form a group
    sizes = dict((k.strip("' "), int(v)) for k, v in (p.split("=") for p in m.group(1).split(",")))
    return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:  # iota form [groups, size]<=[n]
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"source_target_pairs=\{(.*?)\}\s*(,|$)", attrs)
  return 2 if m else 1


def _trip_count(module: Module, instr: Instr) -> int | None:
  """A while loop's trip count: XLA's known_trip_count when present, else the
  integer bound its condition compares against (JAX loops count from 0)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", instr.attrs)
  bounds = [int(i.args) for i in module.computations.get(cond.group(1), []) if cond
            and i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args.strip())]
  return max(bounds) if bounds else None


def _called(instr: Instr, key: str) -> list[str]:
  """Computations an instruction calls: key=%name or key={%a, %b}."""
  m = re.search(key + r"=(\{[^}]*\}|%?[\w.\-]+)", instr.attrs)
  return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",")] if m else []


def computation_costs(module: Module, name: str, _memo: dict | None = None) -> Costs:
  memo = {} if _memo is None else _memo
  if name in memo:
    return memo[name]
  instrs = module.computations[name]
  shapes = {i.name: i.shape for i in instrs}
  from_dot, to_dot, native = module.fusion(name)
  total = Costs()
  for instr in instrs:
    op = instr.opcode
    base = op.removesuffix("-start").removesuffix("-done")
    c = Costs()
    out_b = shape_bytes(instr.shape)
    in_b = sum(shape_bytes(shapes.get(o, "")) for o in instr.operands)
    if op == "while":
      body = _called(instr, "body")
      trips = _trip_count(module, instr)
      if trips is None:
        total.unknown_trip_counts += 1
        trips = 1
      for b in body:
        total.add(computation_costs(module, b, memo), trips)
      continue
    if op == "conditional":
      branches = _called(instr, "branch_computations") or (
          _called(instr, "true_computation") + _called(instr, "false_computation"))
      costs = [computation_costs(module, b, memo) for b in branches]
      if costs:  # the lightest branch unless another computes markedly more
        cheap = min(costs, key=lambda k: (k.bytes_ideal, k.flops))
        dear = max(costs, key=lambda k: k.flops)
        chosen = dear if dear.flops > 2 * cheap.flops + 1000 else cheap  # index math is not work
        total.add(chosen)
        total.bytes_upper += max(k.bytes_upper for k in costs) - chosen.bytes_upper
      continue
    if op in ("call", "fusion", "async-start"):
      for callee in _called(instr, "to_apply") + _called(instr, "calls"):
        total.add(computation_costs(module, callee, memo))
      continue
    if op in FREE_OPS or op.endswith("-done"):
      continue
    if op == "dot":
      lhs = shape_arrays(shapes.get(instr.operands[0], ""))
      dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
      contracted = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d) \
          if lhs and dims else 1
      c.flops = 2 * shape_elements(instr.shape) * contracted
      c.bytes_ideal = (sum(shape_bytes(shapes.get(native.get(o, o), "")) for o in instr.operands
                           if not from_dot.get(o)) + (0 if to_dot[instr.name] else out_b))
    elif base in COLLECTIVES:
      moved = out_b if base in ("all-gather",) else in_b
      c.collectives[base] += moved
      c.collective_ops.append((base, moved, _participants(instr.attrs), 1))
      c.bytes_ideal = in_b + out_b
    elif op in ("reduce", "reduce-window"):
      c.flops = sum(shape_elements(shapes.get(o, "")) for o in instr.operands[:len(
          instr.operands) // 2 or 1])
      # Reducing an on-chip intermediate (scores on their way into the next
      # matmul: the softmax max and sum) touches no memory.
      source = instr.operands[0] if instr.operands else ""
      on_chip = from_dot.get(source, False) and to_dot.get(source, False)
      c.bytes_ideal = 0 if on_chip else in_b + out_b
    elif op in ("dynamic-slice", "gather"):
      pass  # a read fused into its consumer, which counts it
    elif op in ("dynamic-update-slice", "scatter"):
      update = shape_bytes(shapes.get(instr.operands[1 if op == "dynamic-update-slice" else 2],
                                      ""))
      c.bytes_ideal = update  # the written slice
      in_b = update + sum(shape_bytes(shapes.get(o, "")) for o in instr.operands[2:])
      out_b = update  # in place: only the written slice moves
    elif op in MOVE_OPS or op == "custom-call":
      if _PLACEMENT in instr.attrs:  # a host <-> device copy reads and writes its value once
        c.bytes_ideal = out_b
    elif op in TRANSCENDENTAL:
      c.transcendentals = shape_elements(instr.shape)
    else:  # elementwise arithmetic, compare, select, ...
      c.flops = shape_elements(instr.shape)
    c.bytes_upper = in_b + out_b
    c.ops[instr.op_name or instr.name] = np.array([c.flops, c.bytes_ideal, c.bytes_upper])
    total.add(c)
  memo[name] = total
  return total


# A conditional passes values through (lctx's conds select a mask or not), so it
# does not break a matmul-to-matmul chain.
_NOT_FUSIBLE = {"parameter", "get-tuple-element", "constant", "iota", "tuple", "while",
                "call", "custom-call", "dynamic-slice", "gather",
                "dynamic-update-slice", "scatter", "rng", "rng-bit-generator", "sort"} | COLLECTIVES


def _fusible(instr: Instr) -> bool:
  base = instr.opcode.removesuffix("-start").removesuffix("-done")
  return base not in _NOT_FUSIBLE and instr.opcode != "dot"


def _widened_for_dots(instrs: list[Instr]) -> dict[str, str]:
  """converted value -> its source, for converts whose every user is a dot.

  JAX lowers some mixed-precision dots on CPU (bf16 operands, f32 result) by
  converting the operands first; GPU and TPU dots read the bf16 operand and
  accumulate in f32, so the operand is read, and held, in its native dtype."""
  users: dict[str, set[str]] = defaultdict(set)
  for i in instrs:
    for o in i.operands:
      users[o].add(i.opcode)
  return {i.name: i.operands[0] for i in instrs
          if i.opcode == "convert" and i.operands and users[i.name] == {"dot"}}


def _matmul_chains(instrs: list[Instr]) -> tuple[dict[str, bool], dict[str, bool]]:
  """from_dot[v]: v is a matmul output or computed from one by fusible ops only;
  to_dot[v]: v feeds a matmul through fusible ops only. HLO text lists every
  instruction after its operands, so one pass each way suffices."""
  from_dot: dict[str, bool] = {}
  for i in instrs:
    from_dot[i.name] = i.opcode == "dot" or (_fusible(i) and any(
        from_dot.get(o, False) for o in i.operands))
  to_dot = dict.fromkeys(from_dot, False)
  for i in reversed(instrs):
    if i.opcode == "dot" or (_fusible(i) and to_dot[i.name]):
      for o in i.operands:
        if o in to_dot and (i.opcode == "dot" or _fusible(i)):
          to_dot[o] = True
  return from_dot, to_dot


# Ops whose output is (part of) an operand's buffer: no new memory. Slices are
# read in place by their users; updates are written in place; a loop or a
# conditional hands its operands' buffers on; the partitioner's copies of the
# arguments are layout no-ops that XLA elides, and transposes fold into the
# dots or layouts that use them (bytes_ideal counts both free too).
_ALIASING = {"bitcast", "reshape", "get-tuple-element", "tuple", "opt-barrier", "while",
             "conditional", "copy", "transpose", "dynamic-update-slice", "scatter", "slice",
             "dynamic-slice", "add-dependency", "domain"}
_ALIAS_FIRST = {"dynamic-update-slice", "scatter", "slice", "dynamic-slice", "get-tuple-element",
                "bitcast", "reshape", "add-dependency", "copy", "transpose"}
_CALLERS = {"while", "conditional", "call", "fusion", "async-start"}  # not a reducer's scalars
_CALLS = ("body", "condition", "to_apply", "calls", "branch_computations", "true_computation",
          "false_computation")


def peak_bytes(module: Module, name: str, _memo: dict | None = None) -> float:
  """Peak bytes of the buffers computation `name` creates (its parameters are
  its caller's) while it runs in listed order. A buffer lives from its
  definition to the last use of any value aliasing it, the root's to the end;
  while an instruction calls other computations, their own peaks add."""
  memo = {} if _memo is None else _memo
  if name in memo:
    return memo[name]
  instrs = module.computations[name]
  from_dot, to_dot, native = module.fusion(name)
  users: dict[str, list[Instr]] = defaultdict(list)
  for i in instrs:
    for o in i.operands:
      users[o].append(i)
  root = instrs[-1].name if instrs else ""

  def materialized(i: Instr) -> bool:
    if i.opcode == "dot":
      return not to_dot[i.name]
    if from_dot[i.name] and to_dot[i.name]:
      return False  # inside a matmul chain: on chip
    if not _fusible(i) or i.opcode in ("reduce", "reduce-window"):
      return True  # a reduction ends its fusion
    return i.name == root or any(not _fusible(u) for u in users[i.name])

  refs: dict[str, set[str]] = {}  # value -> the buffers it is (part of)
  size: dict[str, float] = {}
  for i in instrs:
    if i.opcode in _ALIASING or i.name in native:
      src = i.operands[:1] if i.opcode in _ALIAS_FIRST or i.name in native else i.operands
      refs[i.name] = set().union(*(refs.get(o, set()) for o in src))
    elif i.opcode in FREE_OPS:
      refs[i.name] = set()
    elif materialized(i):
      refs[i.name], size[i.name] = {i.name}, shape_bytes(i.shape)
    else:  # fused into its users: its inputs stay live until they run
      refs[i.name] = set().union(*(refs.get(o, set()) for o in i.operands))
  first = {i.name: t for t, i in enumerate(instrs) if i.name in size}
  last = dict(first)
  for t, i in enumerate(instrs):
    for o in i.operands:
      for buf in refs.get(o, ()):
        last[buf] = max(last[buf], t)
  for buf in refs.get(root, ()):
    last[buf] = len(instrs)
  delta = np.zeros(len(instrs) + 2)
  for buf, n in size.items():
    delta[first[buf]] += n
    delta[last[buf] + 1] -= n
  live = np.cumsum(delta)
  peak = 0.0
  for t, i in enumerate(instrs):
    nested = max((peak_bytes(module, c, memo) for key in _CALLS for c in _called(i, key)),
                 default=0.0) if i.opcode in _CALLERS else 0.0
    peak = max(peak, live[t] + nested)
  memo[name] = peak
  return peak


def module_costs(text: str) -> Costs:
  module = parse(text)
  costs = computation_costs(module, module.entry)
  costs.temp_bytes = float(peak_bytes(module, module.entry))
  return costs


# ---- host <-> device transfers ----------------------------------------------------

_PLACEMENT = 'custom_call_target="annotate_device_placement"'
_SHARDING_MARK = re.compile(r'custom_call_target="(xla\.sdy\.\w+|Sharding|SPMDFullToShardShape|'
                            r'SPMDShardToFullShape)"')
_HOST_KINDS = ('_xla_buffer_placement="pinned_host"', '_xla_buffer_placement="unpinned_host"')


def _split_top(text: str) -> list[str]:
  """'a[1]{0}, (b, c)' -> ['a[1]{0}', '(b, c)']: commas outside brackets."""
  parts, depth, start = [], 0, 0
  for k, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(text[start:k].strip())
      start = k + 1
  return parts + [text[start:].strip()] if text.strip() else parts


def _entry_host_layouts(text: str) -> tuple[set[int], set[int]]:
  """Indices of the entry's parameters and results laid out in host memory
  (memory space S(5) in entry_computation_layout)."""
  m = re.search(r"entry_computation_layout=\{\((.*?)\)->(.*?)\}(?:,\s*\w+=|\s*$)", text,
                re.MULTILINE)
  if not m:
    return set(), set()
  params = _split_top(m.group(1))
  result = m.group(2).strip()
  results = _split_top(result[1:-1]) if result.startswith("(") else [result]
  return ({k for k, p in enumerate(params) if "S(5)" in p},
          {k for k, r in enumerate(results) if "S(5)" in r})


def shard_bytes(shape: str, attrs: str) -> float:
  """Bytes of one device's shard of a pre-partitioning value with HLO sharding
  `sharding={devices=[a,b,...]...}` in attrs (the whole value if replicated)."""
  m = re.search(r"sharding=\{devices=\[([\d,]+)\]", attrs)
  arrays = shape_arrays(shape)
  if not m or len(arrays) != 1:
    return shape_bytes(shape)
  dtype, dims = arrays[0]
  tiles = [int(t) for t in m.group(1).split(",")][:len(dims)]  # extra tile dims replicate
  return _dtype_bytes(dtype) * math.prod(-(-d // t) for d, t in zip(dims, tiles))


def host_transfer_bytes(text: str, sharded: bool) -> float:
  """Bytes one device moves between host and device memory in a module that
  still carries JAX's memory placements (annotate_device_placement custom
  calls; host arguments and results in S(5)): a value annotated for the
  memory it is not in crosses the link once; a host argument read by device
  code crosses once; a device value returned into host memory crosses once.
  Loops multiply by their trip count. `sharded`: the module is not yet
  partitioned, so a value's shard is read from its HLO sharding."""
  module = parse(text)
  host_params, host_results = _entry_host_layouts(text)
  size = (lambda i: shard_bytes(i.shape, i.attrs)) if sharded else (
      lambda i: shape_bytes(i.shape))

  def walk(name: str, entry: bool) -> float:
    instrs = module.computations[name]
    by_name = {i.name: i for i in instrs}
    on_host, read, total = set(), set(), 0.0
    for i in instrs:
      if i.opcode == "parameter" and entry and int(i.args.strip() or -1) in host_params:
        on_host.add(i.name)
      elif i.opcode == "custom-call" and _PLACEMENT in i.attrs:
        to_host = any(k in i.attrs for k in _HOST_KINDS)
        if to_host != (i.operands[0] in on_host):
          total += size(i)
        if to_host:
          on_host.add(i.name)
        read.add(i.operands[0])
      elif (i.opcode in ("bitcast", "reshape", "copy", "transpose", "get-tuple-element") or
            _SHARDING_MARK.search(i.attrs)) and i.operands and i.operands[0] in on_host:
        on_host.add(i.name)  # the same value, still in host memory
      elif i.opcode == "while":
        trips = _trip_count(module, i) or 1
        total += trips * sum(walk(b, False) for b in _called(i, "body"))
      elif i.opcode == "conditional":
        branches = _called(i, "branch_computations") or (
            _called(i, "true_computation") + _called(i, "false_computation"))
        total += max((walk(b, False) for b in branches), default=0.0)
      elif i.opcode == "call":
        total += sum(walk(c, False) for c in _called(i, "to_apply"))
      if i.opcode != "tuple" and i.name not in on_host:
        for o in i.operands:  # device code reading a host value: it crosses once
          if o in on_host and o not in read and o != i.name and o in by_name and \
              by_name[o].opcode == "parameter":
            total += size(by_name[o])
            read.add(o)
    if entry and host_results and instrs:
      root = instrs[-1]
      outs = root.operands if root.opcode == "tuple" else [root.name]
      for k, o in enumerate(outs):
        if k in host_results and o not in on_host and o in by_name:
          total += size(by_name[o])
    return total

  return walk(module.entry, True)


def _host_placement_hlo(lowered) -> str:
  """The module with memory placements still in it and HLO shardings assigned,
  just before SPMD partitioning. The CPU compiler strips placements before it
  partitions; with that pass disabled its partitioner refuses them, after the
  module needed here is written, so the compile error is expected."""
  with tempfile.TemporaryDirectory() as tmp:
    try:
      lowered.compile(compiler_options={
          "xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning",
          "xla_disable_hlo_passes": "strip-memory-placement-annotations",
          "xla_backend_optimization_level": 0})
    except Exception:  # pylint: disable=broad-except
      pass
    for pattern in ("*before_spmd-partitioning*.txt", "*before_optimizations.txt"):
      found = sorted(glob.glob(os.path.join(tmp, pattern)))
      if found:
        with open(found[0]) as f:
          return f.read()
  raise RuntimeError("XLA wrote no HLO dump before SPMD partitioning")


# The executable is never run: skip the backend's optimizations (~35% faster)
# and, on CPU, its fusion emitters (halves the compile; absent from some XLAs).
_OPTIONAL_OPTIONS = ("xla_cpu_use_fusion_emitters",)
_CHEAP_CODEGEN = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def partitioned_hlo(lowered) -> str:
  """The per-device module after SPMD partitioning, before backend passes.

  One device is not partitioned: then the module right after the first call
  inliner (nested jits flattened, still before the CPU's bf16 rewrite) stands in.
  """
  with tempfile.TemporaryDirectory() as tmp:
    options = {"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning|call-inliner",
               **_CHEAP_CODEGEN}
    try:
      lowered.compile(compiler_options=options)
    except Exception as e:  # pylint: disable=broad-except
      if "No such compile option" not in str(e):
        raise
      lowered.compile(compiler_options={k: v for k, v in options.items()
                                        if k not in _OPTIONAL_OPTIONS})
    for pattern in ("*after_spmd-partitioning*.txt", "*after_call-inliner*.txt",
                    "*before_optimizations.txt"):
      found = sorted(glob.glob(os.path.join(tmp, pattern)))  # numbered in pass order
      if found:
        with open(found[0]) as f:
          return f.read()
  raise RuntimeError("XLA wrote no HLO dump; is xla_dump_to supported by this backend?")


def analyze(lowered) -> Costs:
  """Per-device costs of a lowered jax program (e.g. jax.jit(f).lower(*abstract_args))."""
  text = partitioned_hlo(lowered)
  costs = module_costs(text)
  if _PLACEMENT in text:  # a backend that partitions memory placements keeps them
    costs.host_transfer_bytes = host_transfer_bytes(text, sharded=False)
  elif re.search(r'memory_kind = "(pinned|unpinned)_host"|annotate_device_placement',
                 lowered.as_text()):
    costs.host_transfer_bytes = host_transfer_bytes(_host_placement_hlo(lowered), sharded=True)
  return costs
