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
- a compressed cache's write (lctx.model.attention.WRITE_SCOPE: quantize the
  new keys and values, store codes and scales) is one 'other' kernel per
  call, as vLLM's reshape_and_cache fuses it.
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
             "bitcast-convert", "iota"}


def _is_plumbing(module: hlo.Module, instr: hlo.Instr) -> bool:
  if instr.opcode in ("convert", "copy", "transpose", "bitcast-convert"):
    return True
  if instr.opcode != "fusion":
    return False
  names = hlo._called(instr, "calls")  # pylint: disable=protected-access
  return bool(names) and all(name in module.computations and all(
      i.opcode in _PLUMBING for i in module.computations[name]) for name in names)


_ATTENTION_MATH = frozenset({"while", "dot", "convolution", "reduce"})
_MATMUL = frozenset({"dot", "convolution"})


def _calls_any(module: hlo.Module, instr: hlo.Instr, opcodes: frozenset, memo: dict) -> bool:
  """A fusion (or call) whose computations, or those they call, hold one of
  `opcodes`. memo: (computation, opcodes) -> whether it holds one itself."""
  stack, seen = list(hlo._called(instr, "calls")), set()  # pylint: disable=protected-access
  while stack:
    name = stack.pop()
    if name in seen or name not in module.computations:
      continue
    seen.add(name)
    if (name, opcodes) not in memo:
      memo[(name, opcodes)] = any(i.opcode in opcodes for i in module.computations[name])
    if memo[(name, opcodes)]:
      return True
    stack += [c for i in module.computations[name] for c in hlo._called(i, "calls")]  # pylint: disable=protected-access
  return False


def _does_attention_math(module: hlo.Module, instr: hlo.Instr, memo: dict) -> bool:
  """A loop, contraction or reduction (softmax), or a fusion holding one: what
  makes an attention call (a mask or index table hoisted out of a loop does not;
  XLA may rewrite a small dot as a multiply and a reduce)."""
  return instr.opcode in _ATTENTION_MATH or _calls_any(module, instr, _ATTENTION_MATH, memo)


def _is_scalar(instr: hlo.Instr) -> bool:
  arrays = hlo.shape_arrays(instr.shape)
  return bool(arrays) and all(not dims for _, dims in arrays)


def _in_attention(instr: hlo.Instr, scope: str | None = None) -> bool:
  from lctx.model.attention import SCOPE  # pylint: disable=import-outside-toplevel
  scope = scope or SCOPE
  return f"/{scope}/" in instr.op_name or instr.op_name.endswith(f"/{scope}")


def _in_cache_write(instr: hlo.Instr) -> bool:
  from lctx.model.attention import WRITE_SCOPE  # pylint: disable=import-outside-toplevel
  return _in_attention(instr, WRITE_SCOPE)


def _count(module: hlo.Module, name: str, memo: dict, holds: dict,
           fused: bool = True) -> collections.Counter:
  """Kernels of computation `name`; fused=False counts what XLA itself
  launches (attention's and XLA's own loops trip by trip). memo: per
  (computation, fused); holds: _calls_any's memo."""
  if (name, fused) in memo:
    return memo[(name, fused)]
  total: collections.Counter = collections.Counter()
  attention = write = False
  for instr in module.computations[name]:
    op = instr.opcode
    if op in _NO_KERNEL or op.endswith("-done") or op == "reduce-window":
      # XLA:CPU's tree-reduction rewrite splits a long row reduction into a
      # reduce-window and a reduce, where a GPU runs one reduction kernel: the
      # window counts with its consumer (lctx's models have no reduce-window
      # of their own).
      continue
    if fused and op.removesuffix("-start") not in hlo.COLLECTIVES and _in_attention(instr):
      # One fused kernel per computation doing attention's arithmetic
      # (counted below; index tables hoisted out of a loop are not a call);
      # its collectives still count.
      attention |= _does_attention_math(module, instr, holds)
      if op == "while":
        for callee in hlo._called(instr, "body"):  # pylint: disable=protected-access
          total["collective"] += ((hlo._trip_count(module, instr) or 1)  # pylint: disable=protected-access
                                  * _count(module, callee, memo, holds, fused)["collective"])
      continue
    if (fused and _in_cache_write(instr) and op.removesuffix("-start") not in hlo.COLLECTIVES
        and not _is_scalar(instr)):  # the name test first: it is cheap, shapes are parsed
      write = True  # one fused quantize-and-store kernel per computation
      continue
    if fused and op == "while" and instr.op_name and not instr.op_name.endswith("while"):
      total["other"] += 1  # a loop XLA made of one op (module docstring)
    elif op == "while":
      trips = hlo._trip_count(module, instr)  # pylint: disable=protected-access
      trips = 1 if trips is None else trips
      for key in ("body", "condition"):
        for callee in hlo._called(instr, key):  # pylint: disable=protected-access
          for k, v in _count(module, callee, memo, holds, fused).items():
            total[k] += trips * v
    elif op == "call":
      for callee in hlo._called(instr, "to_apply"):  # pylint: disable=protected-access
        total.update(_count(module, callee, memo, holds, fused))
    elif op == "conditional":  # the branch that launches most (an upper estimate)
      branches = (hlo._called(instr, "branch_computations")  # pylint: disable=protected-access
                  or hlo._called(instr, "true_computation")  # pylint: disable=protected-access
                  + hlo._called(instr, "false_computation"))  # pylint: disable=protected-access
      counts = [_count(module, b, memo, holds, fused) for b in branches]
      if counts:
        total.update(max(counts, key=lambda c: sum(c.values())))
    elif op.removesuffix("-start") in hlo.COLLECTIVES:
      total["collective"] += 1
    elif op == "custom-call" and _MARKERS.search(instr.attrs):
      continue
    elif op in _MATMUL or (op == "fusion" and _calls_any(module, instr, _MATMUL, holds)):
      total["matmul"] += 1
    elif _is_scalar(instr):
      continue  # loop bookkeeping
    elif _is_plumbing(module, instr):
      total["convert"] += 1
      # What a copy or convert moves: its output written, about as much read.
      total["convert_bytes"] += 2 * hlo.shape_bytes(instr.shape)
    else:  # loop/input fusions, reductions, in-place updates, custom calls...
      total["other"] += 1
  if attention:
    total["attention"] += 1
  if write:
    total["other"] += 1
  memo[(name, fused)] = total
  return total


def kernel_profile(text: str) -> tuple[dict[str, float], dict[str, float], float]:
  """(kernel_counts(text); the same counts as XLA itself launches them, the
  attention calls' and XLA-made loops' kernels trip by trip (what runs when
  the machine runs this very program); bytes the convert-class kernels move
  per execution: twice their outputs, loop trips multiplied). Raises
  ValueError for text without an ENTRY computation."""
  module = hlo.parse(text)
  memo, holds = {}, {}
  fused = _count(module, module.entry, memo, holds, True)
  unfused = _count(module, module.entry, memo, holds, False)
  return ({k: float(fused.get(k, 0)) for k in CLASSES},
          {k: float(unfused.get(k, 0)) for k in CLASSES},
          float(unfused.get("convert_bytes", 0)))


def kernel_counts(text: str) -> dict[str, float]:
  """Kernels per execution of an optimized HLO module, by class: 'matmul'
  (dots, convolutions and fusions holding one), 'attention' (one per
  attention call, module docstring), 'collective' (one per collective,
  asynchronous pairs once), 'other' (every other launching op), 'convert'
  (kernels that only copy or convert, module docstring); loop bodies and
  conditions count once per trip (an unknown trip count counts once).
  Raises ValueError for text without an ENTRY computation."""
  return kernel_profile(text)[0]
