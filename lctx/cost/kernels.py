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
Two CPU artefacts are counted as a GPU server launches them:

- attention: everything under the model's attention scope
  (lctx.model.attention.SCOPE: the blockwise loop of prefill, the softmax
  pieces of decode) is one 'attention' kernel per call, the fused
  FlashAttention / decode-attention kernel that vLLM, SGLang and TensorRT-LLM
  run. A computation holds at most one attention call in the programs lctx
  costs (their layers are scanned); collectives inside still count.
- XLA:CPU computes bf16 in f32, so it converts weights and activations
  around every matmul (and a cache around its in-place update): kernels that
  only convert, copy or slice ('convert': no arithmetic) are counted apart, and
  the calibrated mode gives them no floor (on a GPU they do not exist, on a
  CPU their bytes already cost them); scalar kernels (loop counters) count
  nothing.
- a while loop that XLA made out of a single op (its op_name does not end in
  'while': XLA:CPU's scatter expander turns a batched cache write into a loop
  over the batch) is one 'other' kernel, as the scatter is on a GPU.
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
CLASSES = ("matmul", "attention", "collective", "other", "convert")
# What a kernel made only of these does is move and re-type data.
_PLUMBING = {"parameter", "convert", "bitcast", "copy", "broadcast", "slice", "dynamic-slice",
             "transpose", "reshape", "constant", "tuple", "get-tuple-element",
             "bitcast-convert"}


def _is_plumbing(module: hlo.Module, instr: hlo.Instr) -> bool:
  if instr.opcode in ("convert", "copy", "transpose", "bitcast-convert"):
    return True
  if instr.opcode != "fusion":
    return False
  names = hlo._called(instr, "calls")  # pylint: disable=protected-access
  return bool(names) and all(name in module.computations and all(
      i.opcode in _PLUMBING for i in module.computations[name]) for name in names)


def _is_scalar(instr: hlo.Instr) -> bool:
  arrays = hlo.shape_arrays(instr.shape)
  return bool(arrays) and all(not dims for _, dims in arrays)


def _in_attention(instr: hlo.Instr) -> bool:
  from lctx.model.attention import SCOPE  # pylint: disable=import-outside-toplevel
  return f"/{SCOPE}/" in instr.op_name or instr.op_name.endswith(f"/{SCOPE}")


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
  attention = False
  for instr in module.computations[name]:
    op = instr.opcode
    if op in _NO_KERNEL or op.endswith("-done") or op == "reduce-window":
      # XLA:CPU's tree-reduction rewrite splits a long row reduction into a
      # reduce-window and a reduce, where a GPU runs one reduction kernel: the
      # window counts with its consumer (lctx's models have no reduce-window
      # of their own).
      continue
    if op.removesuffix("-start") not in hlo.COLLECTIVES and _in_attention(instr):
      attention = True  # one fused kernel, counted once below; its collectives still count
      if op == "while":
        for callee in hlo._called(instr, "body"):  # pylint: disable=protected-access
          total["collective"] += ((hlo._trip_count(module, instr) or 1)  # pylint: disable=protected-access
                                  * _count(module, callee, memo, dots)["collective"])
      continue
    if op == "while" and instr.op_name and not instr.op_name.endswith("while"):
      total["other"] += 1  # a loop XLA made of one op (module docstring)
    elif op == "while":
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
    elif op.removesuffix("-start") in hlo.COLLECTIVES:
      total["collective"] += 1
    elif op == "custom-call" and _MARKERS.search(instr.attrs):
      continue
    elif op in ("dot", "convolution") or (op == "fusion" and _fusion_has_dot(module, instr, dots)):
      total["matmul"] += 1
    elif _is_scalar(instr):
      continue  # loop bookkeeping
    elif _is_plumbing(module, instr):
      total["convert"] += 1
    else:  # loop/input fusions, reductions, in-place updates, custom calls...
      total["other"] += 1
  if attention:
    total["attention"] += 1
  memo[name] = total
  return total


def kernel_counts(text: str) -> dict[str, float]:
  """Kernels per execution of an optimized HLO module, by class: 'matmul'
  (dots, convolutions and fusions holding one), 'attention' (one per
  attention call, module docstring), 'collective' (one per collective,
  asynchronous pairs once), 'other' (every other launching op);
  loop bodies and conditions count once per trip (an unknown trip count
  counts once). Raises ValueError for text without an ENTRY computation."""
  module = hlo.parse(text)
  counts = _count(module, module.entry, {}, {})
  return {k: float(counts.get(k, 0)) for k in CLASSES}
