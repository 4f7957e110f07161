"""Kernel launches of a compiled program: what a per-kernel time floor multiplies.

A roofline charges an op only for its FLOPs and bytes; a real step also pays a
fixed cost per kernel (launch, prologue, tail effects: a few us per elementwise
kernel and 10-16 us per decode GEMM or attention call on H100-class GPUs), and
a decode step is made of hundreds of small kernels. The number of kernels is a
property of the compiled program, not of a hand-written op list: it is read
here from XLA's optimized module (after fusion), where every fusion, matmul,
custom call, collective and unfused op is one kernel, and a while loop's body
and condition run once per trip.

The module is XLA:CPU's (the one lctx compiles for costing); its fusion
decisions are close to, not equal to, a GPU's (a GPU fuses some reductions
that the CPU leaves as their own kernel, and calls cuBLAS where the CPU calls
its own GEMM), so the count is an estimate of the same order, not a trace.
"""

from __future__ import annotations

import collections
import re

from lctx.cost import hlo

# Opcodes that launch nothing: bookkeeping, views, and the second half of an
# asynchronous pair (counted at its -start).
_NO_KERNEL = hlo.FREE_OPS | {"get-dimension-size", "set-dimension-size", "optimization-barrier"}
# Custom calls that are annotations, not kernels.
_MARKERS = re.compile(r'custom_call_target="(Sharding|SPMDFullToShardShape|SPMDShardToFullShape|'
                      r'annotate_device_placement|xla\.sdy\.\w+|MoveToHost|MoveToDevice)"')
CLASSES = ("matmul", "collective", "other")


def _fusion_has_dot(module: hlo.Module, instr: hlo.Instr, memo: dict) -> bool:
  """A fusion whose computation (or a computation it calls) holds a dot or convolution."""
  stack = hlo._called(instr, "calls")  # pylint: disable=protected-access
  seen = set()
  while stack:
    name = stack.pop()
    if name in seen or name not in module.computations:
      continue
    seen.add(name)
    if name not in memo:
      memo[name] = any(i.opcode in ("dot", "convolution") for i in module.computations[name])
    if memo[name]:
      return True
    stack += [c for i in module.computations[name] for c in hlo._called(i, "calls")]  # pylint: disable=protected-access
  return False


def _count(module: hlo.Module, name: str, memo: dict, dots: dict) -> collections.Counter:
  if name in memo:
    return memo[name]
  total: collections.Counter = collections.Counter()
  for instr in module.computations[name]:
    op = instr.opcode
    if op == "while":
      trips = hlo._trip_count(module, instr)  # pylint: disable=protected-access
      trips = 1 if trips is None else trips
      for key in ("body", "condition"):
        for callee in hlo._called(instr, key):  # pylint: disable=protected-access
          for k, v in _count(module, callee, memo, dots).items():
            total[k] += trips * v
    elif op == "call":
      for callee in hlo._called(instr, "to_apply"):  # pylint: disable=protected-access
        total.update(_count(module, callee, memo, dots))
    elif op == "conditional":  # the branch that launches most (an upper estimate)
      branches = (hlo._called(instr, "branch_computations")  # pylint: disable=protected-access
                  or hlo._called(instr, "true_computation")  # pylint: disable=protected-access
                  + hlo._called(instr, "false_computation"))  # pylint: disable=protected-access
      counts = [_count(module, b, memo, dots) for b in branches]
      if counts:
        total.update(max(counts, key=lambda c: sum(c.values())))
    elif op in _NO_KERNEL or op.endswith("-done") or op == "reduce-window":
      # XLA:CPU's tree-reduction rewrite splits a long row reduction into a
      # reduce-window and a reduce, where a GPU runs one reduction kernel: the
      # window counts with its consumer (lctx's models have no reduce-window
      # of their own).
      continue
    elif op.removesuffix("-start") in hlo.COLLECTIVES:
      total["collective"] += 1
    elif op == "custom-call" and _MARKERS.search(instr.attrs):
      continue
    elif op in ("dot", "convolution") or (op == "fusion" and _fusion_has_dot(module, instr, dots)):
      total["matmul"] += 1
    else:  # loop/input fusions, reductions, copies, in-place updates, custom calls...
      total["other"] += 1
  memo[name] = total
  return total


def kernel_counts(text: str) -> dict[str, float]:
  """Kernels per execution of an optimized HLO module, by class: 'matmul'
  (dots, convolutions and fusions holding one), 'collective' (one per
  collective, asynchronous pairs once), 'other' (every other launching op);
  loop bodies and conditions count once per trip (an unknown trip count
  counts once). Raises ValueError for text without an ENTRY computation."""
  module = hlo.parse(text)
  counts = _count(module, module.entry, {}, {})
  return {k: float(counts.get(k, 0)) for k in CLASSES}
