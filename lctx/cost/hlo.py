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
                  scatter updates); slices are read by their consumers; a
                  matmul's output is written and read back by the next
                  matmul, except in a flash-style attention chain (a matmul
                  whose output reaches the next through a softmax: the scores
                  stay on chip, see _flash_chains); dot operands that JAX's
                  CPU lowering widens (bf16 -> f32) count in their native dtype
  while loops     body x trip count (XLA's known_trip_count, else the count the
                  model declares for a run-time bound (TRIPS_SCOPE), else the
                  loop condition's constant bound)
  conditionals    the branch moving the fewest bytes (lctx writes a finished
                  row of attention output once per row, not on every pair),
                  unless another computes markedly more FLOPs (then that one:
                  an upper bound, a skipped attention block counts as
                  computed); bytes_upper: the largest branch
  host_transfer_bytes
                  bytes crossing between host and device memory, from JAX's
                  memory placements (see host_transfer_bytes)
  temp_bytes      peak bytes of live buffers other than the arguments (outputs
                  included) when the program runs in its listed order (an
                  in-place cache write as early as its operands allow), under
                  the same fusion model as bytes_ideal: a value is a buffer
                  unless it is a pointwise intermediate whose every user fuses
                  it, or sits inside a flash attention chain; in-place
                  updates, loops and conditionals alias their operands; a
                  slice aliases its operand unless a matmul reads it (then it
                  is copied out); an update of a non-donated argument copies
                  it; a called computation adds its own peak while it runs
                  (see peak_bytes). Within 15% of XLA:CPU's buffer assignment
                  of lctx's fp32 programs (tests/test_hlo_temps.py)
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

from lctx.model.attention import TRIPS_SCOPE

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
  replica_count: int = 1  # from the HloModule header (collectives' group modes)
  loop_bodies: frozenset = frozenset()  # computations that are while-loop bodies
  num_partitions: int = 1

  def fusion(self, name: str) -> tuple[dict[str, bool], dict[str, str]]:
    """(on_chip, widened) of a computation (see _flash_chains and
    _widened_for_dots), shared by the cost and the liveness walks."""
    if name not in self._fusion:
      instrs = self.computations[name]
      self._fusion[name] = (_flash_chains(instrs), _widened_for_dots(instrs),
                            _dequantized_for_dots(instrs))
    return self._fusion[name][:2]

  def dequantized(self, name: str) -> dict[str, list[str]]:
    """See _dequantized_for_dots."""
    self.fusion(name)
    return self._fusion[name][2]


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
  header = re.search(r"^\s*HloModule\b.*$", text, re.MULTILINE)
  counts = {k: int(v) for k, v in re.findall(r"\b(replica_count|num_partitions)=(\d+)",
                                              header.group(0) if header else "")}
  bodies = frozenset(b for instrs in comps.values() for i in instrs if i.opcode == "while"
                     for b in _called(i, "body"))
  return Module(comps, entry, replica_count=counts.get("replica_count", 1),
                num_partitions=counts.get("num_partitions", 1), loop_bodies=bodies)


@dataclasses.dataclass
class Costs:
  flops: float = 0.0
  transcendentals: float = 0.0
  bytes_upper: float = 0.0
  bytes_ideal: float = 0.0
  host_transfer_bytes: float = 0.0  # set by analyze (see host_transfer_bytes); not summed
  collectives: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # kind -> bytes
  collective_ops: list = dataclasses.field(default_factory=list)  # (kind, bytes, participants, count)
  # op_name -> [FLOPs, ideal bytes, upper bytes, FLOPs of its dots]
  ops: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: np.zeros(4)))
  unknown_trip_counts: int = 0
  temp_bytes: float = 0.0  # the whole program's peak (set by module_costs; not summed)
  # Kernel launches per run by class (lctx.cost.kernels; set by analyze; not summed).
  kernels: dict = dataclasses.field(default_factory=dict)
  # The same as XLA launches them (attention and XLA-made loops unfused).
  kernels_compiled: dict = dataclasses.field(default_factory=dict)
  # Bytes the optimized program's copy/convert kernels move (set by analyze;
  # not summed): XLA:CPU's weight-slice copies and dtype widening.
  copy_bytes: float = 0.0

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


# Collectives whose HLO carries use_global_device_ids (XLA passes it to
# GetCollectiveOpGroupMode as an engaged optional); the others read a channel
# id as cross-partition.
_GLOBAL_IDS_OPS = {"all-reduce", "all-gather", "reduce-scatter"}
_AXIS_REF = re.compile(r"^'?([^':]+?)'?(?::\((\d+)\)(\d+))?$")  # 'x' or x:(1)2 (a sub-axis)


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group that opens at text[start]."""
  pairs, depth = {"{": "}", "[": "]", "(": ")"}, []
  for k in range(start, len(text)):
    if text[k] in pairs:
      depth.append(pairs[text[k]])
    elif depth and text[k] == depth[-1]:
      depth.pop()
      if not depth:
        return k + 1
  raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def _mesh_group_size(text: str, attrs: str) -> int:
  """Devices per group of `mesh[a=2,b=4](, device_ids=(...)) {b}` (the named
  axes, or sub-axes `a:(pre)size`, form a group; `{}`: groups of one device).
  Group sizes do not depend on device_ids, which only orders the devices."""
  end = _balanced(text, len("mesh"))
  sizes = {}
  for item in filter(None, (x.strip() for x in text[len("mesh") + 1:end - 1].split(","))):
    name, eq, size = item.rpartition("=")
    if not eq or not size.strip().isdigit():
      raise ValueError(f"cannot read mesh axis {item!r} in replica groups: {attrs[:200]!r}")
    sizes[name.strip().strip("'\"")] = int(size)
  rest = text[end:].lstrip()
  if rest.startswith(","):  # , device_ids=(...)
    rest = rest[1:].lstrip()
    if not rest.startswith("device_ids="):
      raise ValueError(f"cannot read replica groups {text[:200]!r}")
    rest = rest[_balanced(rest, len("device_ids=")):].lstrip()
  if not rest.startswith("{"):
    raise ValueError(f"replica groups {text[:200]!r} name no axes {{...}}")
  group = 1
  for ref in filter(None, (x.strip() for x in rest[1:_balanced(rest, 0) - 1].split(","))):
    m = _AXIS_REF.match(ref)
    if not m or m.group(1) not in sizes:
      raise ValueError(f"replica groups name axis {ref!r}, not one of the mesh's {sorted(sizes)}")
    group *= int(m.group(3)) if m.group(3) else sizes[m.group(1)]
  return group


def _participants(attrs: str, kind: str = "all-reduce", replica_count: int = 1,
                  num_partitions: int = 1) -> int:
  """Devices taking part in each group of a collective, from its HLO
  attributes (the largest group where they differ). `kind`: the collective
  without -start; replica_count, num_partitions: the module's (HloModule
  header), needed where the groups are empty or hold replica ids.

  Forms XLA prints: explicit `replica_groups={{0,1},{2,3}}`; empty `{}` (one
  group of all devices); iota `[G,S]<=[dims]` and `[G,S]<=[dims]T(perm)` (G
  groups of S); mesh axes `mesh[a=2,b=4] {b}` / `mesh['a'=2,'b'=4],
  device_ids=(...) {'b'}` (the product of the named axes' sizes, sub-axes
  `a:(1)2` their own size); `maximal_mesh[device_id=n] {}` (one device);
  `source_target_pairs={{0,1},{1,2}}` for a collective-permute (the devices
  that send or receive; 1 when every pair is a device to itself). What ids
  mean follows XLA's group mode: without a channel_id they are replicas; with
  one, partitions (all-to-all, permute, broadcast), flattened device ids
  (use_global_device_ids=true), or replicas each spanning all partitions.

  A collective whose groups cannot be read raises ValueError: it is never
  counted as free."""
  if kind == "collective-permute":
    m = re.search(r"source_target_pairs=\{", attrs)
    if not m:
      raise ValueError(f"collective-permute without source_target_pairs: {attrs[:200]!r}")
    body = attrs[m.end() - 1:_balanced(attrs, m.end() - 1)]
    pairs = re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", body)
    if re.sub(r"[\s{},\d]", "", body) or len(pairs) != body.count("{") - 1:
      raise ValueError(f"cannot read source_target_pairs {body[:200]!r}")
    moving = [(a, b) for a, b in pairs if a != b]
    return len({x for pair in moving for x in pair}) if moving else 1
  m = re.search(r"replica_groups=", attrs)
  if not m:
    raise ValueError(f"{kind} without replica_groups: {attrs[:200]!r}")
  text = attrs[m.end():]
  if text.startswith("mesh["):  # device ids of the whole mesh: the mode does not matter
    return _mesh_group_size(text, attrs)
  if text.startswith("maximal_mesh["):
    return 1
  if text.startswith("["):  # iota: G groups of S devices
    iota = re.match(r"\[(\d+),(\d+)\]<=\[[\d,]+\](T\([\d,]+\))?", text)
    if not iota:
      raise ValueError(f"cannot read iota replica groups {text[:200]!r}")
    group = int(iota.group(2))
  elif text.startswith("{"):
    body = text[:_balanced(text, 0)]
    groups = re.findall(r"\{([\d,\s]*)\}", body[1:-1])
    if re.sub(r"[\s{},\d]", "", body) or len(groups) != body.count("{") - 1:
      raise ValueError(f"cannot read replica groups {body[:200]!r}")
    group = max((len([x for x in g.split(",") if x.strip()]) for g in groups), default=0)
  else:
    raise ValueError(f"cannot read replica groups {text[:200]!r}")
  channel = re.search(r"\bchannel_id=", attrs) is not None
  global_ids = re.search(r"\buse_global_device_ids=true", attrs) is not None
  if not channel:  # cross-replica: ids are replicas, each partition on its own
    return group or replica_count
  if kind not in _GLOBAL_IDS_OPS:  # cross-partition
    return group or num_partitions
  if global_ids:  # flattened ids over replicas x partitions
    return group or replica_count * num_partitions
  return (group or replica_count) * num_partitions  # cross-replica-and-partition


def _trip_count(module: Module, instr: Instr) -> float | None:
  """A while loop's trip count: XLA's known_trip_count when present; else the
  count the model declares for a loop bounded at run time (the name scope
  lctx.model.attention.TRIPS_SCOPE on the while op, a mean over the loop's
  executions, so possibly fractional); else the integer bound its condition
  compares against (JAX loops count from 0)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
  if m:
    return int(m.group(1))
  m = re.search(r'op_name="[^"]*' + TRIPS_SCOPE + r'=([0-9.e+\-]+)/while"', instr.attrs)
  if m:
    return float(m.group(1))
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
  on_chip, native = module.fusion(name)
  dequantized = module.dequantized(name)
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
      read = lambda o: (sum(shape_bytes(shapes.get(x, "")) for x in dequantized[o])
                        if o in dequantized else shape_bytes(shapes.get(native.get(o, o), "")))
      c.bytes_ideal = (sum(read(o) for o in instr.operands if not on_chip.get(o))
                       + (0 if on_chip.get(instr.name) else out_b))
    elif base in COLLECTIVES:
      # An all-gather moves its gathered output (an -start's shape pairs it
      # with the operand); the others their input.
      moved = (out_b - (in_b if op.endswith("-start") and instr.shape.startswith("(") else 0)
               if base == "all-gather" else in_b)
      c.collectives[base] += moved
      c.collective_ops.append((base, moved, _participants(
          instr.attrs, base, module.replica_count, module.num_partitions), 1))
      c.bytes_ideal = in_b + out_b
    elif op in ("reduce", "reduce-window"):
      c.flops = sum(shape_elements(shapes.get(o, "")) for o in instr.operands[:len(
          instr.operands) // 2 or 1])
      # Reducing an on-chip intermediate (attention scores on their way into
      # the next matmul: the softmax max and sum) touches no memory.
      source = instr.operands[0] if instr.operands else ""
      on_chip_source = on_chip.get(source, False)
      c.bytes_ideal = 0 if on_chip_source else in_b + out_b
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
    c.ops[instr.op_name or instr.name] = np.array([c.flops, c.bytes_ideal, c.bytes_upper,
                                                   c.flops if op == "dot" else 0.0])
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
  by_name = {i.name: i for i in instrs}
  for i in instrs:
    for o in i.operands:
      users[o].add(i.opcode)

  def itemsize(v: str) -> float:
    arrays = shape_arrays(by_name[v].shape)
    return _dtype_bytes(arrays[0][0]) if arrays else 0.0

  def source(v: str) -> tuple[str, bool]:
    # Back through views and widening converts: a weight stored in fp8 that
    # the model converts to bf16 and reshapes (and the CPU lowering widens to
    # f32) is read once, in fp8.
    widened = False
    while v in by_name and by_name[v].operands and (
        by_name[v].opcode in ("reshape", "bitcast", "transpose", "copy") or (
            by_name[v].opcode == "convert" and by_name[v].operands[0] in by_name
            and itemsize(v) >= itemsize(by_name[v].operands[0]))):
      widened |= by_name[v].opcode == "convert"
      v = by_name[v].operands[0]
    return v, widened

  out = {}
  for i in instrs:
    if i.opcode in ("convert", "reshape", "bitcast", "transpose", "copy") and users[i.name] == {"dot"}:
      src, widened = source(i.name)
      if widened:
        out[i.name] = src
  return out


# Pointwise and layout ops a dequantization is made of (unpack, widen, scale,
# shift by a zero point, broadcast a group's scale): a kernel fuses them into
# the matmul's operand read.
_DEQUANT_OPS = {"convert", "multiply", "add", "subtract", "broadcast", "reshape", "bitcast",
                "transpose", "copy", "and", "or", "shift-right-logical", "shift-left",
                "shift-right-arithmetic", "concatenate", "negate", "select", "compare"}
_DEQUANT_MAX_OPS = 64


def _dequantized_for_dots(instrs: list[Instr]) -> dict[str, list[str]]:
  """dot operand -> the values it is computed from, where a matmul reads a
  value made by pointwise and layout ops (_DEQUANT_OPS) from buffers that
  are together smaller than it: a quantized KV block (codes, scales, zero
  points) dequantized on its way into attention, as a fused GPU/TPU kernel
  does, reads the stored bytes, not the dequantized ones. Constants and
  iotas are free; operands no smaller this way are left out (an RMS norm's
  output is not cheaper to read as its input)."""
  by_name = {i.name: i for i in instrs}
  out = {}
  for d in instrs:
    if d.opcode != "dot":
      continue
    for o in d.operands:
      if o in out or o not in by_name or by_name[o].opcode not in _DEQUANT_OPS:
        continue
      leaves, seen, stack = [], set(), [o]
      while stack and len(seen) <= _DEQUANT_MAX_OPS:
        v = stack.pop()
        if v in seen or v not in by_name:
          continue
        seen.add(v)
        i = by_name[v]
        if i.opcode in _DEQUANT_OPS:
          stack.extend(i.operands)
        elif i.opcode not in ("constant", "iota"):
          leaves.append(v)
      if stack or not leaves:
        continue  # too large a region to be one kernel's prologue
      if sum(shape_bytes(by_name[v].shape) for v in leaves) < shape_bytes(by_name[o].shape):
        out[o] = leaves
  return out


def _flash_chains(instrs: list[Instr]) -> dict[str, bool]:
  """on_chip[v]: v lives on chip inside an attention kernel, as a
  flash-attention-style kernel on a GPU/TPU keeps it: a matmul's output that
  reaches the next matmul through fusible ops including a softmax (an
  exponential and a reduction), and those ops. Any other matmul output is
  written to memory: an MLP's gate and up projections are materialized, and
  the elementwise op joining them is fused into one of them (its epilogue).
  HLO text lists every instruction after its operands."""
  users: dict[str, list[Instr]] = defaultdict(list)
  for i in instrs:
    for o in i.operands:
      users[o].append(i)
  to_dot: dict[str, bool] = {}  # v feeds a matmul through fusible ops only
  for i in reversed(instrs):
    to_dot[i.name] = any(u.opcode == "dot" or (_fusible(u) and to_dot.get(u.name, False))
                         for u in users[i.name])
  on_chip: dict[str, bool] = {}
  for d in instrs:
    if d.opcode != "dot" or not to_dot[d.name]:
      continue
    region, stack = set(), [d.name]
    while stack:  # forward from the matmul through fusible ops that still feed a matmul
      for u in users[stack.pop()]:
        if _fusible(u) and to_dot[u.name] and u.name not in region:
          region.add(u.name)
          stack.append(u.name)
    kinds = {i.opcode for i in instrs if i.name in region}
    if "exponential" in kinds and kinds & {"reduce", "reduce-window"}:
      on_chip[d.name] = True
      on_chip.update(dict.fromkeys(region, True))
  return on_chip


# Ops whose output is (part of) an operand's buffer: no new memory. Updates are
# written in place; a loop or a conditional hands its operands' buffers on;
# the partitioner's copies of the arguments are layout no-ops that XLA elides,
# and transposes fold into the dots or layouts that use them (bytes_ideal
# counts both free too). Slices alias their operand when their users fuse them
# and are copied out when a matmul or another unfusible op reads them (see
# peak_bytes).
_ALIASING = {"bitcast", "reshape", "get-tuple-element", "tuple", "opt-barrier", "while",
             "conditional", "copy", "transpose", "dynamic-update-slice", "scatter", "slice",
             "dynamic-slice", "gather", "add-dependency", "domain"}
_ALIAS_FIRST = {"dynamic-update-slice", "scatter", "slice", "dynamic-slice", "gather",
                "get-tuple-element", "bitcast", "reshape", "add-dependency", "copy", "transpose"}
_SLICES = {"slice", "dynamic-slice", "gather"}
_VIEWS = {"bitcast", "reshape", "transpose", "copy"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_CALLERS = {"while", "conditional", "call", "fusion", "async-start"}  # not a reducer's scalars
_CALLS = ("body", "condition", "to_apply", "calls", "branch_computations", "true_computation",
          "false_computation")


def donated_parameters(text: str) -> set[int]:
  """Entry parameters aliased to an output (donated: updated in place), from
  the module header's `input_output_alias={ {0}: (3, {}, may-alias), ... }`."""
  header = re.search(r"input_output_alias=\{(.*?)\}\s*(?:,\s*\w+=|$)", text.split("\n", 1)[0])
  if not header:
    return set()
  return {int(p) for p in re.findall(r":\s*\((\d+),", header.group(1))}


def _tuple_parts(shape: str) -> list[str]:
  """The element shapes of a tuple shape; a non-tuple shape is its only part."""
  return _split_top(shape[1:-1]) if shape.startswith("(") else [shape]


def _loop_updated(module: Module, body: str) -> set[int]:
  """Tuple indices a while body does not hand back unchanged."""
  instrs = module.computations.get(body, [])
  if not instrs or instrs[-1].opcode != "tuple":
    return set()
  param = next((i.name for i in instrs if i.opcode == "parameter"), None)
  by_name = {i.name: i for i in instrs}
  same = lambda o, k: (o in by_name and by_name[o].opcode == "get-tuple-element" and
                       by_name[o].operands == [param] and
                       re.search(r"index=(\d+)", by_name[o].attrs).group(1) == str(k))
  return {k for k, o in enumerate(instrs[-1].operands) if not same(o, k)}


def _root_aliases(module: Module, name: str, memo: dict) -> list[tuple[set[int], float]]:
  """Per element of computation `name`'s result (one for a non-tuple): the
  parameter indices it may alias and the bytes of fresh buffers it holds.
  memo: peak_bytes' (this walk's nested peaks are the same)."""
  if ("#aliases", name) in memo:
    return memo[("#aliases", name)]
  instrs = module.computations[name]
  if not instrs:
    return []
  walk = _liveness(module, name, None, memo)
  params = {i.name: int(i.args.strip() or 0) for i in instrs if i.opcode == "parameter"}
  root = instrs[-1]
  outs = root.operands if root.opcode == "tuple" else [root.name]
  result = []
  for o in outs:
    bufs = walk["refs"].get(o, set())
    result.append(({params[b[len("param:"):]] for b in bufs if b.startswith("param:")},
                   sum(walk["size"][b] for b in bufs if not b.startswith("param:"))))
  memo[("#aliases", name)] = result
  return result


def _liveness(module: Module, name: str, donated: set[int] | None, memo: dict) -> dict:
  """Buffers of computation `name` in listed order: refs (value -> the buffers
  it is, or is part of; "param:<name>" for a parameter's), size (buffer ->
  bytes), first and last (buffer -> instruction index), nested (index ->
  the peak of computations that instruction runs). donated: for the entry,
  the parameters that may be updated in place (others are copied first, as
  XLA does); None elsewhere (a nested computation updates its caller's
  buffers)."""
  instrs = module.computations[name]
  on_chip, native = module.fusion(name)
  users: dict[str, list[Instr]] = defaultdict(list)
  last_use: dict[str, int] = {}
  # HLO text lists a layer's cache write (an in-place update read only by the
  # loop's root) and the ops that only feed it last, after the layer's MLP; a
  # scheduler runs them as soon as their operands exist, which frees the
  # written value there. Those ops get that earliest time (`when`).
  for i in instrs:
    for o in i.operands:
      users[o].append(i)
  feeds_update: set[str] = set()
  for i in reversed(instrs):
    if i.opcode in _IN_PLACE or (users[i.name] and all(
        u.name in feeds_update for u in users[i.name])):
      feeds_update.add(i.name)
  when: dict[str, int] = {}
  for t, i in enumerate(instrs):
    when[i.name] = max((when.get(o, 0) for o in i.operands), default=0) \
        if i.name in feeds_update else t
  whole_use: dict[str, int] = {}  # last use other than reading one tuple element
  for i in instrs:
    for o in i.operands:
      last_use[o] = max(last_use.get(o, 0), when[i.name])
      if i.opcode != "get-tuple-element":
        whole_use[o] = max(whole_use.get(o, 0), when[i.name])
  root = instrs[-1].name if instrs else ""
  params = {i.name: int(i.args.strip() or 0) for i in instrs if i.opcode == "parameter"}
  read_only = set() if donated is None else {f"param:{p}" for p, k in params.items()
                                             if k not in donated}

  def consumers(v: str) -> list[Instr]:
    """v's users, looking through views (reshapes, bitcasts, transposes, copies
    and widening converts) to the ops that read the data."""
    out = []
    for u in users[v]:
      out += consumers(u.name) if u.opcode in _VIEWS or u.name in native else [u]
    return out

  def materialized(i: Instr) -> bool:
    if on_chip.get(i.name):
      return False
    if i.opcode == "dot" or not _fusible(i) or i.opcode in ("reduce", "reduce-window"):
      return True  # a matmul's output, an unfusible op's, a reduction's (it ends a fusion)
    return i.name == root or any(not _fusible(u) for u in users[i.name])

  refs: dict[str, set[str]] = {}
  size: dict[str, float] = {}
  first: dict[str, int] = {}
  holders: dict[str, list[str]] = defaultdict(list)  # buffer -> values that are (in) it
  elements: dict[str, list[set[str]]] = {}  # a tuple's refs, element by element
  reusable: dict[str, float] = {}  # argument buffers an op may overwrite once dead
  fresh_out: dict[str, float] = {}  # a call's or conditional's new result bytes
  nested: dict[int, float] = {}

  def new(buf: str, t: int, nbytes: float) -> set[str]:
    size[buf], first[buf] = nbytes, t
    return {buf}

  for i in instrs:
    t, op = when[i.name], i.opcode
    operand_refs = [refs.get(o, set()) for o in i.operands]
    if op == "parameter":
      refs[i.name] = {f"param:{i.name}"}
      if name in module.loop_bodies:  # the loop's state, element by element, reusable
        parts = _tuple_parts(i.shape)
        elements[i.name] = [{f"param:{i.name}#{k}"} for k in range(len(parts))]
        reusable.update({f"param:{i.name}#{k}": shape_bytes(x) for k, x in enumerate(parts)})
      elif donated is not None and params[i.name] in donated:
        reusable[f"param:{i.name}"] = shape_bytes(i.shape)
    elif op in FREE_OPS and op not in _ALIASING:
      refs[i.name] = set()
    elif op in _SLICES and any(not _fusible(u) for u in consumers(i.name)):
      # Copied out for a matmul or another unfusible reader. A slice of an
      # argument (a scanned layer's weights) depends on nothing computed
      # here, and XLA schedules its copy at the start of the computation.
      hoisted = bool(operand_refs) and all(b.startswith("param:") for b in operand_refs[0])
      refs[i.name] = new(i.name, 0 if hoisted else t, shape_bytes(i.shape))
    elif op in _IN_PLACE and operand_refs and operand_refs[0] & read_only:
      refs[i.name] = new(i.name, t, shape_bytes(i.shape))  # a non-donated argument is copied
    elif op == "tuple":
      refs[i.name] = set().union(*operand_refs)
      elements[i.name] = operand_refs
    elif op == "get-tuple-element" and i.operands and i.operands[0] in elements:
      k = int(re.search(r"index=(\d+)", i.attrs).group(1))
      refs[i.name] = set(elements[i.operands[0]][k])
    elif op == "while":
      # The loop's state buffers are its initial values', updated in place,
      # element by element; carried arguments that the body changes and that
      # were not donated are copied in first.
      init = elements.get(i.operands[0]) if i.operands else None
      refs[i.name] = set().union(*operand_refs)
      if init is not None:
        updated = set().union(*(_loop_updated(module, b) for b in _called(i, "body")))
        parts = _tuple_parts(i.shape)
        copies = [set(init[k]) for k in range(len(init))]
        for k in updated:
          if k < len(parts) and k < len(init) and init[k] & read_only:
            copies[k] = new(f"{i.name}#{k}", t, shape_bytes(parts[k]))
        elements[i.name] = copies
        refs[i.name] = set().union(*copies)
    elif op in ("call", "conditional"):
      # Element by element: a result that is an argument's buffer (updated in
      # place) stays the caller's; a fresh one is a new buffer here (for a
      # conditional, the largest any branch returns). Branch k of a
      # conditional reads operand k + 1.
      if op == "call":
        callees = [(c, 0) for c in _called(i, "to_apply") + _called(i, "calls")]
      else:
        branches = _called(i, "branch_computations") or (
            _called(i, "true_computation") + _called(i, "false_computation"))
        callees = [(c, k + 1) for k, c in enumerate(branches)]
      per_element: dict[int, tuple[set[str], float]] = {}
      for c, first_operand in callees:
        results = _root_aliases(module, c, memo)
        src = operand_refs[first_operand:]
        for k, (aliased, fresh) in enumerate(results):
          part = set().union(*(src[a] for a in aliased if a < len(src)))
          old_part, old_fresh = per_element.get(k, (set(), 0.0))
          per_element[k] = (old_part | part, max(old_fresh, fresh))
        fresh_out[i.name] = max(fresh_out.get(i.name, 0.0), sum(f for _, f in results))
      parts = []
      for k in sorted(per_element):
        part, fresh = per_element[k]
        if fresh:
          part = part | new(f"{i.name}#{k}", t, fresh)
        parts.append(part)
      elements[i.name] = parts
      refs[i.name] = set().union(*parts)
    elif op in _ALIASING or i.name in native:
      src = operand_refs[:1] if op in _ALIAS_FIRST or i.name in native else operand_refs
      refs[i.name] = set().union(*src)
    elif materialized(i):
      nbytes = shape_bytes(i.shape)
      # An elementwise op may write over an operand buffer of its size that
      # dies here (XLA's buffer sharing for elementwise fusions).
      # Donated arguments and a loop's state elements may be overwritten too.
      reuse = next((b for r in operand_refs if len(r) == 1 for b in r
                    if (reusable.get(b) if b.startswith("param:") else size.get(b)) == nbytes
                    and all(last_use.get(v, -1) <= t for v in holders[b])), None) \
          if _fusible(i) and op not in ("reduce", "reduce-window") else None
      refs[i.name] = {reuse} if reuse else new(i.name, t, nbytes)
    else:  # fused into its users: its inputs stay live until they run
      refs[i.name] = set().union(*operand_refs)
    for b in refs[i.name]:
      holders[b].append(i.name)
    if op in _CALLERS:  # the callee's peak, less the results already counted here
      nested[t] = max([nested.get(t, 0.0)] + [
          peak_bytes(module, c, memo) - fresh_out.get(i.name, 0.0)
          for key in _CALLS for c in _called(i, key)])
  last = dict(first)
  for b, values in holders.items():
    if b in last:  # a tuple's element buffers live as long as their own readers
      last[b] = max([last[b]] + [(whole_use if v in elements else last_use).get(v, -1)
                                 for v in values])
  for b in refs.get(root, ()):
    if b in last:
      last[b] = len(instrs)
  if donated is not None and instrs:
    # A result that is only a view of a non-donated argument gets its own
    # buffer: XLA copies it out.
    outs = instrs[-1].operands if instrs[-1].opcode == "tuple" else [root]
    by_name = {i.name: i for i in instrs}
    copied = sum(shape_bytes(by_name[o].shape) for o in outs
                 if refs.get(o) and refs[o] <= read_only)
    if copied:
      size["root-copy"], first["root-copy"], last["root-copy"] = copied, len(instrs) - 1, len(instrs)
  return {"refs": refs, "size": size, "first": first, "last": last, "nested": nested}


def peak_bytes(module: Module, name: str, _memo: dict | None = None,
               donated: set[int] | None = None) -> float:
  """Peak bytes of the buffers computation `name` creates (its parameters are
  its caller's) while it runs in listed order, under the fusion model of
  bytes_ideal with matmul outputs materialized (see _flash_chains).

  A buffer lives from its definition to the last use of any value aliasing it,
  the root's to the end; while an instruction calls other computations, their
  own peaks add. A slice read by a matmul or another unfusible op is copied
  out (XLA:CPU and XLA:GPU copy a scanned layer's weight and cache slices
  before their matmuls); an update of an entry argument that is not donated
  (`donated`: parameter indices from input_output_alias) copies it first.
  """
  memo = {} if _memo is None else _memo
  key = (name, None if donated is None else tuple(sorted(donated)))
  if key in memo:
    return memo[key]
  walk = _liveness(module, name, donated, memo)
  n = len(module.computations[name])
  delta = np.zeros(n + 2)
  for b, nbytes in walk["size"].items():
    delta[walk["first"][b]] += nbytes
    delta[walk["last"][b] + 1] -= nbytes
  live = np.cumsum(delta)
  peak = max([0.0] + [live[t] + walk["nested"].get(t, 0.0) for t in range(n)])
  memo[key] = float(peak)
  return float(peak)


def module_costs(text: str) -> Costs:
  module = parse(text)
  costs = computation_costs(module, module.entry)
  costs.temp_bytes = peak_bytes(module, module.entry, donated=donated_parameters(text))
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
  still carries JAX's memory placements (host arguments and results in S(5);
  annotate_device_placement custom calls where a value changes memory kind).

  Host values are followed from the entry's host arguments through bitcasts,
  tuples, loops and calls. A crossing is charged once per: a value annotated
  for the memory it is not in; a (dynamic-)slice of a host value (a block
  fetched: its size); a device update written into a host buffer
  (dynamic-update-slice: the update's size; the buffer stays in host memory);
  any other device code reading a host value (the whole value, once); a
  device value returned into host memory. Loops multiply by their trip
  count. `sharded`: the module is not yet partitioned, so a value's shard is
  read from its HLO sharding, or, where it has none, taken as the same
  fraction of it as the host argument it comes from holds of its own."""
  module = parse(text)
  host_params, host_results = _entry_host_layouts(text)

  def size(i, fraction: float = 1.0) -> float:
    if not sharded:
      return shape_bytes(i.shape)
    if "sharding={devices=" in i.attrs:
      return shard_bytes(i.shape, i.attrs)
    return shape_bytes(i.shape) * fraction

  def walk(name: str, host_args: dict[int, float], entry: bool):
    """(bytes moved, the root's host elements {index: fraction} for a tuple
    root, else its fraction or None when it is not on host)."""
    instrs = module.computations[name]
    by_name = {i.name: i for i in instrs}
    on_host: dict[str, float] = {}  # host value -> the fraction of it one device holds
    host_tuple: dict[str, dict[int, float]] = {}  # tuple values: their host elements
    read, total = set(), 0.0
    for i in instrs:
      op = i.operands[0] if i.operands else None
      if i.opcode == "parameter":
        index = int(i.args.strip() or -1)
        if i.shape.startswith("("):  # a loop body's or a call's tuple argument
          host_tuple[i.name] = {} if entry else dict(host_args)
        elif entry and index in host_params:
          whole = shape_bytes(i.shape)
          on_host[i.name] = size(i) / whole if whole else 1.0
        elif not entry and index in host_args:
          on_host[i.name] = host_args[index]
      elif i.opcode == "get-tuple-element":
        k = int(re.search(r"index=(\d+)", i.attrs).group(1))
        if op in on_host:
          on_host[i.name] = on_host[op]
        elif k in host_tuple.get(op, {}):
          on_host[i.name] = host_tuple[op][k]
      elif i.opcode == "tuple":
        host_tuple[i.name] = {k: on_host[o] for k, o in enumerate(i.operands) if o in on_host}
      elif i.opcode == "custom-call" and _PLACEMENT in i.attrs:
        to_host = any(k in i.attrs for k in _HOST_KINDS)
        if to_host != (op in on_host):
          total += size(i)
        if to_host:
          on_host[i.name] = on_host.get(op, 1.0)
        read.add(op)
      elif (i.opcode in ("bitcast", "reshape", "copy", "transpose") or
            _SHARDING_MARK.search(i.attrs)) and op in on_host:
        on_host[i.name] = on_host[op]  # the same value, still in host memory
      elif i.opcode in ("dynamic-slice", "slice") and op in on_host:
        total += size(i, on_host[op])  # a block brought from host memory
      elif i.opcode == "dynamic-update-slice" and op in on_host:
        on_host[i.name] = on_host[op]  # written in place in host memory
        update = by_name.get(i.operands[1])
        if update is not None and update.name not in on_host:
          total += size(update, on_host[op])
      elif i.opcode == "while":
        trips = _trip_count(module, i) or 1
        carried = host_tuple.get(op, {})
        for body in _called(i, "body"):
          total += trips * walk(body, carried, False)[0]
        host_tuple[i.name] = dict(carried)
      elif i.opcode == "conditional":
        branches = _called(i, "branch_computations") or (
            _called(i, "true_computation") + _called(i, "false_computation"))
        total += max((walk(b, {}, False)[0] for b in branches), default=0.0)
      elif i.opcode == "call":
        args = {k: on_host[o] for k, o in enumerate(i.operands) if o in on_host}
        for callee in _called(i, "to_apply"):
          moved, out = walk(callee, args, False)
          total += moved
          if isinstance(out, dict):
            host_tuple[i.name] = out
          elif out is not None:
            on_host[i.name] = out
      elif i.opcode not in ("tuple", "get-tuple-element") and i.name not in on_host:
        for o in i.operands:  # device code reading a host value: it crosses once
          if o in on_host and o not in read and o != i.name and o in by_name:
            total += size(by_name[o], on_host[o])
            read.add(o)
    root = instrs[-1] if instrs else None
    if entry and host_results and root is not None:
      outs = root.operands if root.opcode == "tuple" else [root.name]
      for k, o in enumerate(outs):
        if k in host_results and o not in on_host and o in by_name:
          total += size(by_name[o])
    if root is None:
      return total, None
    if root.opcode == "tuple":
      return total, host_tuple.get(root.name, {})
    return total, on_host.get(root.name)

  return walk(module.entry, {}, True)[0]


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
  return compiled_hlo(lowered)[0]


def compiled_hlo(lowered) -> tuple[str, str | None]:
  """(partitioned_hlo's module, the optimized module after fusion or None when
  the backend wrote none), from one compile."""
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
    optimized = sorted(glob.glob(os.path.join(tmp, "*after_optimizations.txt")))
    if optimized:
      with open(optimized[0]) as f:
        optimized = f.read()
    for pattern in ("*after_spmd-partitioning*.txt", "*after_call-inliner*.txt",
                    "*before_optimizations.txt"):
      found = sorted(glob.glob(os.path.join(tmp, pattern)))  # numbered in pass order
      if found:
        with open(found[0]) as f:
          return f.read(), optimized or None
  raise RuntimeError("XLA wrote no HLO dump; is xla_dump_to supported by this backend?")


def analyze(lowered) -> Costs:
  """Per-device costs of a lowered jax program (e.g. jax.jit(f).lower(*abstract_args))."""
  from lctx.cost.kernels import kernel_profile  # it builds on this module
  text, optimized = compiled_hlo(lowered)
  costs = module_costs(text)
  if optimized is not None:
    costs.kernels, costs.kernels_compiled, costs.copy_bytes = kernel_profile(optimized)
  if _PLACEMENT in text:  # a backend that partitions memory placements keeps them
    costs.host_transfer_bytes = host_transfer_bytes(text, sharded=False)
  elif re.search(r'memory_kind = "(pinned|unpinned)_host"|annotate_device_placement',
                 lowered.as_text()):
    costs.host_transfer_bytes = host_transfer_bytes(_host_placement_hlo(lowered), sharded=True)
  return costs
