"""Steady-state serving latency under continuous batching, from step costs.

The published serving benchmarks (lctx.cost.published) report mean TTFT and
TPOT of C concurrent users, each sending ISL prompt tokens and reading OSL
output tokens, on a server that batches decode across users and interleaves
new prompts' prefill with it (in-flight batching / chunked prefill: vLLM,
SGLang, TensorRT-LLM). In steady state:

- every server step decodes one token for each of the C users, at a context
  that grows from ISL to ISL + OSL over a request's life: on average
  ISL + OSL / 2 (`decode_context`), so `decode_step_s` is the cost of a
  batch-C decode step at that cache length;
- a request lives OSL steps, so C / OSL new requests arrive per step, and
  each step also carries their prefill: C / OSL x `prefill_s` (the cost of
  prefilling one ISL-token prompt), spread over the steps in chunks;

    TPOT = decode_step_s + (C / OSL) x prefill_s
    TTFT = prefill_s + decode_step_s

(a new prompt's prefill runs within one step beside the batch's decode).

`ttft_burst_s` is the other end: a closed-loop benchmark (aiperf / genai-perf
with concurrency C, fixed ISL and OSL, ignore_eos, as aiconfigurator's
generated bench_run.sh runs them) starts its C users together, and with equal
lengths they finish, and start again, together: the server prefills the C
prompts one after another (prefill is compute-bound: batching prompts does not
shorten it), so the i-th waits i prefills and the mean TTFT is
(C + 1) / 2 x prefill_s + decode_step_s. Real runs drift between the two.
Not modelled: queueing when the KV cache cannot hold C users (a server then
admits fewer and TTFT includes the wait), prefill chunks smaller than the
prompt (they stretch TTFT over several steps), and speculative decoding.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Latency:
  ttft_s: float  # time to first token, s
  tpot_s: float  # time per output token after the first, s (= one server step)
  prefill_share_s: float  # the part of each step spent prefilling new prompts, s
  ttft_burst_s: float  # mean TTFT when the C users arrive together (module docstring), s


def decode_context(isl: int, osl: int) -> int:
  """The mean cache length of a decode step over a request's life (tokens)."""
  return isl + osl // 2


def steady_state(prefill_s: float, decode_step_s: float, concurrency: int, isl: int,
                 osl: int) -> Latency:
  """TTFT and TPOT of `concurrency` users (module docstring). prefill_s: one
  ISL-token prompt; decode_step_s: a batch-`concurrency` decode step at
  decode_context(isl, osl). Raises ValueError naming a non-positive input."""
  for name, value in (("prefill_s", prefill_s), ("decode_step_s", decode_step_s),
                      ("concurrency", concurrency), ("isl", isl), ("osl", osl)):
    if not value > 0:
      raise ValueError(f"{name}={value!r}; allowed: a number > 0")
  share = concurrency / osl * prefill_s
  return Latency(ttft_s=prefill_s + decode_step_s, tpot_s=decode_step_s + share,
                 prefill_share_s=share,
                 ttft_burst_s=(concurrency + 1) / 2 * prefill_s + decode_step_s)
