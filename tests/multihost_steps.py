"""One process of tests/test_multihost.py's step test (not collected by pytest).

  python tests/multihost_steps.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON

Joins a gloo job, then drives engine.prefill and engine.decode_step with a
plan over the global mesh data:2,seq:2,model:2 from host (numpy) inputs, as
a user would, checking that the host-side errors (vocabulary, full cache)
are raised on every process. Writes the greedy tokens and the errors seen.
"""

import json
import sys

import jax
import numpy as np


def main(port: str, num_processes: str, process_id: str, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
  import lctx
  from lctx import engine, sharding

  config = lctx.ModelConfig.from_preset("tiny")
  plan = sharding.Plan(config, sharding.make_mesh("data:2,seq:2,model:2"))
  params = engine.shard_params(lctx.init_params(config, 0), plan)
  B, T, capacity, steps = 2, 8, 12, 4
  prompt = np.random.default_rng(0).integers(0, config.vocab_size, (B, T), dtype=np.int32)
  cache = engine.new_cache(config, params, B, capacity, plan=plan)
  logits, cache = engine.prefill(config, params, prompt, cache, plan=plan)
  tokens, errors = [], {}
  for _ in range(steps):
    token = plan.to_host(logits).argmax(-1).astype(np.int32)
    tokens.append(token.tolist())
    logits, cache = engine.decode_step(config, params, token, cache, plan=plan)
  try:
    engine.decode_step(config, params, np.full((B,), config.vocab_size, np.int32), cache,
                       plan=plan)
  except ValueError as e:
    errors["vocab"] = str(e)
  while True:  # fill the cache to its capacity, then one step more
    try:
      logits, cache = engine.decode_step(config, params, np.zeros((B,), np.int32), cache,
                                         plan=plan)
    except ValueError as e:
      errors["full"] = str(e)
      break
  with open(out, "w") as f:
    json.dump({"tokens": tokens, "errors": errors}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
