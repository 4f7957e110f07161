"""Trains the tiny quality model (lctx.quality.train) on CPU and writes its checkpoint.

  python -m experiments.train_tiny [--seed=0] [--steps=400,300,300] [--batch=32] [--lr=3e-3]
      [--out=lctx/quality/checkpoints/tiny] [--overwrite]

The curriculum (lctx.quality.train.TrainConfig.stages) has three stages; --steps
sets the number of steps of each: induction rows at length 64 (the induction
head forms), then MQAR + selective copy + induction at 128, then at 576 (a
512-token context plus the continuation). Writes to --out: config.json (HF
Llama config), params/ (orbax, lctx.save_params), summary.json (this command,
seed, steps, wall time, loss history, held-out accuracies at context 512:
MQAR per query with 32 pairs, selective copy per token with 16 tokens) and
README.md. lctx.quality.train.load_tiny(--out) reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from absl import app, flags, logging

_DEFAULT_OUT = "lctx/quality/checkpoints/tiny"
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of every batch.")
_STEPS = flags.DEFINE_string("steps", "400,300,300", "Steps of each curriculum stage (lengths "
                             "64, 128, 576), comma-separated.")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows per batch of the stages without their own "
                             "(the last stage has 16).")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate (warmup, then cosine decay).")
_WARMUP = flags.DEFINE_integer("warmup", 50, "Linear warmup steps.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Log the mean loss every N steps.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 64, "Held-out examples per task for the "
                                      "final accuracy.")
_OUT = flags.DEFINE_string("out", _DEFAULT_OUT, "Output directory.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier checkpoint in --out.")


def _dir_bytes(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _readme(summary: dict) -> str:
  acc = summary["heldout_accuracy"]
  return f"""# Tiny quality model (lctx.quality.train)

A {summary['model']['num_hidden_layers']}-layer Llama-style lctx model trained from scratch on CPU on
the synthetic tasks of lctx.quality.synthetic (MQAR, selective copy, induction rows).

Reproduce (from the repository root, CPU):

    {summary['command']}

seed {summary['seed']}, steps per stage {summary['steps']} ({summary['total_steps']} in all),
wall time {summary['wall_time_s']:.0f} s on {summary['machine']}, final loss {summary['final_loss']:.4f}.

Held-out accuracy at context 512 (teacher-forced argmax, {summary['eval_examples']} examples per
task, seeds {summary['eval_seeds']}):
MQAR (32 pairs, per query) {acc['mqar']:.4f}; selective copy (16 tokens, per token)
{acc['selective_copy']:.4f}.

Files: config.json (HF Llama config), params/ (orbax, lctx.save_params),
summary.json. Load with `lctx.quality.train.load_tiny()`.
"""


def main(argv):
  del argv
  import jax

  from lctx.checkpoint import hf_config_dict
  from lctx.quality import train as tr

  out = Path(_OUT.value)
  if out.exists() and any(out.iterdir()) and not _OVERWRITE.value:
    raise app.UsageError(f"{out} is not empty; pass --overwrite to replace it")
  steps = [int(s) for s in _STEPS.value.split(",")]
  base = tr.TrainConfig()
  if len(steps) != len(base.stages):
    raise app.UsageError(f"--steps needs {len(base.stages)} comma-separated counts, got "
                         f"{_STEPS.value!r}")
  stages = tuple(dataclasses.replace(s, steps=n) for s, n in zip(base.stages, steps))
  tc = dataclasses.replace(base, seed=_SEED.value, batch=_BATCH.value, lr=_LR.value,
                           warmup=_WARMUP.value, log_every=_LOG_EVERY.value, stages=stages)
  config = tr.tiny_config()
  logging.info("training %s (%d params) for %d steps: %s", config.name, config.num_params,
               tc.total_steps, tc)
  start = time.perf_counter()
  params, history = tr.train(config, tc)
  wall = time.perf_counter() - start
  logging.info("trained in %.0f s; evaluating on held-out seeds", wall)
  acc = tr.heldout_accuracy(config, params, _EVAL_EXAMPLES.value)
  logging.info("held-out accuracy at context 512: %s", acc)
  command = "python -m experiments.train_tiny " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  summary = {
      "command": command.strip(),
      "seed": tc.seed,
      "steps": steps,
      "total_steps": tc.total_steps,
      "train_config": dataclasses.asdict(tc),
      "model": hf_config_dict(config),
      "num_params": config.num_params,
      "wall_time_s": round(wall, 1),
      "machine": f"{jax.default_backend()}, {os.cpu_count()} cores",
      "final_loss": history["loss"][-1],
      "history": history,
      "eval_examples": _EVAL_EXAMPLES.value,
      "eval_seeds": f"{tr.EVAL_SEED}..{tr.EVAL_SEED + _EVAL_EXAMPLES.value - 1}",
      "eval_context_len": 512,
      "heldout_accuracy": acc,
      "jax_version": jax.__version__,
  }
  tr.save_tiny(out, config, params, summary, overwrite=_OVERWRITE.value)
  (out / "README.md").write_text(_readme(summary))
  logging.info("wrote %s (%.2f MB)", out, _dir_bytes(out) / 1e6)
  print(json.dumps({k: summary[k] for k in ("command", "seed", "steps", "wall_time_s",
                                            "final_loss", "heldout_accuracy")}, indent=2))


if __name__ == "__main__":
  app.run(main)
