"""Trains the tiny lctx model the quality measurements run on, from scratch, on CPU.

No pretrained weights can be downloaded here, so the model whose answers
KV-cache compression may break is a small Llama-style decoder (the same
lctx.model.transformer code every policy runs) trained on the synthetic tasks
of lctx.quality.synthetic: MQAR (Zoology) and selective copy (Mamba), mixed
in every batch. Optimiser: optax AdamW, linear warmup then cosine decay (per
curriculum stage), global-norm gradient clipping. The curriculum
(TrainConfig.stages): repeated random tokens at length 64 first, whose dense
supervision forms the induction head in ~250 steps (from MQAR's few answers
per row it had not formed after 2,000); then both tasks at length 128; then
at 576, a 512-token context plus the continuation. About 15 minutes on a
shared 2-core CPU (experiments/train_tiny.py).

Accuracy (answer_accuracy) is teacher-forced argmax at the answer positions of
evaluation Examples on held-out seeds (EVAL_SEED and up; training batches draw
from numpy streams seeded by (seed, stage, step) tuples, never by a lone int).

`load_tiny()` returns the committed checkpoint (TINY_DIR): config.json (an HF
Llama config, read by ModelConfig.from_hf_config), params/ (orbax, written by
lctx.save_params) and summary.json (command, seed, steps, loss, accuracies).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lctx import engine
from lctx.config import ModelConfig
from lctx.model import transformer
from lctx.model.params import Params, init_params, stack_layers, unstack_layers
from lctx.quality import synthetic
from lctx.quality.tasks import Example

TINY_DIR = Path(__file__).resolve().parent / "checkpoints" / "tiny"
EVAL_SEED = 1_000_000  # held-out examples use seeds EVAL_SEED, EVAL_SEED + 1, ...


def tiny_config(**overrides) -> ModelConfig:
  """The tiny model: 2 layers, D 128, 4 query heads sharing 2 KV heads (GQA),
  head dim 32, SwiGLU F 256, vocabulary synthetic.VOCAB_SIZE, RoPE theta 10000,
  up to 2048 positions, fp32."""
  fields = dict(vocab_size=synthetic.VOCAB_SIZE, hidden_size=128, intermediate_size=256,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=2048, name="lctx-quality-tiny")
  fields.update(overrides)
  return ModelConfig(**fields)


@dataclasses.dataclass(frozen=True)
class Stage:
  """A curriculum stage: `steps` batches of rows of length seq_len, MQAR with
  num_pairs pairs (an int, or uniform in [lo, hi]), selective copy of
  num_tokens tokens and induction rows in proportions mix = (mqar, copy,
  induction) (synthetic.mixed_batch)."""
  steps: int
  seq_len: int
  num_pairs: int | tuple[int, int]
  num_tokens: int
  mix: tuple[float, float, float] = (0.5, 0.5, 0.0)
  batch: int | None = None  # rows per batch; None: TrainConfig.batch
  lr_scale: float = 1.0  # this stage's peak learning rate: TrainConfig.lr * lr_scale
  warmup: int | None = None  # this stage's warmup steps; None: TrainConfig.warmup


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings and the curriculum. Every stage has its own
  schedule (warm restarts, as SGDR, Loshchilov & Hutter 2017): linear warmup
  from 0 to lr * stage.lr_scale, then cosine decay to final_lr_frac of that
  peak at the stage's last step; a new sequence length starts afresh from a
  small learning rate, and the last stage is not starved by a decay spread
  over the whole run. AdamW; gradients clipped to global norm `clip`."""
  seed: int = 0
  batch: int = 32
  lr: float = 3e-3
  warmup: int = 50
  final_lr_frac: float = 0.05
  weight_decay: float = 0.01
  clip: float = 1.0
  init_std: float = 0.02
  stages: tuple[Stage, ...] = (
      # Induction heads form (dense supervision, short rows, ~250 steps).
      Stage(400, 64, (4, 8), 4, mix=(0.0, 0.0, 1.0)),
      # The tasks, short: MQAR up to 16 pairs, selective copy of 8 tokens.
      Stage(300, 128, (8, 16), 8, mix=(0.4, 0.4, 0.2), lr_scale=0.5, warmup=20),
      # The evaluation length: context up to 560 + continuation, 16-32 pairs, 16 tokens.
      Stage(300, 576, (16, 32), 16, mix=(0.3, 0.6, 0.1), batch=16, lr_scale=1 / 3, warmup=10),
  )
  log_every: int = 25

  @property
  def total_steps(self) -> int:
    return sum(s.steps for s in self.stages)


def schedule(tc: TrainConfig) -> optax.Schedule:
  """The learning rate of every step: one warmup + cosine per stage, joined."""
  parts, boundaries, step = [], [], 0
  for stage in tc.stages:
    peak = tc.lr * stage.lr_scale
    warmup = tc.warmup if stage.warmup is None else stage.warmup
    parts.append(optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(stage.steps, warmup + 1), end_value=peak * tc.final_lr_frac))
    step += stage.steps
    boundaries.append(step)
  return optax.join_schedules(parts, boundaries[:-1])


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(tc.clip),
                     optax.adamw(schedule(tc), b1=0.9, b2=0.98, weight_decay=tc.weight_decay))


def masked_loss(config: ModelConfig, params: Params, tokens: jax.Array, targets: jax.Array,
                mask: jax.Array) -> jax.Array:
  """Mean next-token cross entropy over the masked positions, a float32 scalar.
  tokens, targets int32 [B, L]; mask float32 [B, L]. Logits from
  lctx.model.transformer.forward (one attention block over the whole row)."""
  chex.assert_rank([tokens, targets, mask], 2)
  chex.assert_equal_shape([tokens, targets, mask])
  chex.assert_type([tokens, targets, mask], [jnp.int32, jnp.int32, jnp.float32])
  block = -(-tokens.shape[1] // 8) * 8
  logits = transformer.forward(config, params, tokens, block)  # [B, L, V] fp32
  chex.assert_shape(logits, (*tokens.shape, config.vocab_size))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  loss = (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  chex.assert_rank(loss, 0)
  chex.assert_type(loss, jnp.float32)
  return loss


def make_train_step(config: ModelConfig, opt: optax.GradientTransformation):
  """jitted (params, opt_state, tokens, targets, mask) -> (params, opt_state, loss)."""

  @jax.jit
  def step(params, opt_state, tokens, targets, mask):
    loss, grads = jax.value_and_grad(lambda p: masked_loss(config, p, tokens, targets, mask))(
        params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(config: ModelConfig, tc: TrainConfig, log: Callable[[str], None] = logging.info,
          params: Params | None = None) -> tuple[Params, dict]:
  """Trains from `params` (default init_params(config, tc.seed, tc.init_std))
  through tc.stages. Returns the params (stacked layout, as saved) and a
  history {"step", "loss", "seconds"} of the logged steps (loss: the mean
  over the last log_every steps). Batch s of stage i is
  synthetic.mixed_batch((tc.seed, i, s), ...): a seed gives the same data."""
  if params is None:
    params = init_params(config, tc.seed, tc.init_std)
  params = unstack_layers(params)  # unrolled layers: faster on CPU
  opt = optimizer(tc)
  opt_state = opt.init(params)
  step_fn = make_train_step(config, opt)
  history = {"step": [], "loss": [], "seconds": []}
  start, done, running = time.perf_counter(), 0, []
  for i, stage in enumerate(tc.stages):
    for s in range(stage.steps):
      B = stage.batch or tc.batch
      batch = synthetic.mixed_batch((tc.seed, i, s), B, stage.seq_len, stage.num_pairs,
                                    stage.num_tokens, stage.mix)
      chex.assert_shape(batch, (B, stage.seq_len))
      params, opt_state, loss = step_fn(params, opt_state, *batch)
      done += 1
      running.append(loss)
      if done % tc.log_every == 0 or done == tc.total_steps:
        mean = float(np.mean(jax.device_get(running)))
        running = []
        elapsed = time.perf_counter() - start
        history["step"].append(done)
        history["loss"].append(mean)
        history["seconds"].append(elapsed)
        log(f"step {done}/{tc.total_steps} (stage {i}, L={stage.seq_len}): loss {mean:.4f}, "
            f"{elapsed:.0f} s")
        if not np.isfinite(mean):
          raise FloatingPointError(f"training diverged at step {done}: loss {mean}")
  return stack_layers(params), history


# ---- evaluation -----------------------------------------------------------------------

def heldout_examples(task: str, count: int, context_len: int = 512, size: int | None = None,
                     first_seed: int = EVAL_SEED) -> list[Example]:
  """`count` evaluation Examples of task "mqar" (size: pairs, default 32) or
  "selective_copy" (size: data tokens, default 16), seeds first_seed, ... ."""
  if task == "mqar":
    make = lambda s: synthetic.mqar_example(s, context_len, size or 32)
  elif task == "selective_copy":
    make = lambda s: synthetic.selective_copy_example(s, context_len, size or 16)
  else:
    raise ValueError(f"unknown task {task!r}; allowed: 'mqar', 'selective_copy'")
  return [make(first_seed + i) for i in range(count)]


def answer_logits_argmax(config: ModelConfig, params: Params, examples: list[Example],
                         batch_size: int = 16) -> list[list[tuple[int, ...]]]:
  """Greedy predictions of every answer, teacher-forced: for each example, per
  answer, the argmax tokens at its positions (lctx.engine.forward over
  context + continuation). Examples of one length per batch."""
  fwd = jax.jit(lambda p, t: jnp.argmax(engine.forward(config, p, t), axis=-1))
  out = []
  for lo in range(0, len(examples), batch_size):
    chunk = examples[lo:lo + batch_size]
    tokens = np.array([e.context + e.continuation for e in chunk], np.int32)
    pred = np.asarray(fwd(params, tokens))  # [B, T + Q]
    for b, e in enumerate(chunk):
      T = len(e.context)
      # Token j of the continuation is predicted at position T + j - 1.
      out.append([tuple(int(pred[b, T + j - 1]) for j in a) for a in e.answers])
  return out


def answer_accuracy(config: ModelConfig, params: Params, examples: list[Example],
                    batch_size: int = 16) -> float:
  """Fraction of answers (over all examples) whose every token is the argmax."""
  preds = answer_logits_argmax(config, params, examples, batch_size)
  right = [p == tuple(e.continuation[j] for j in a)
           for e, ps in zip(examples, preds) for p, a in zip(ps, e.answers)]
  return float(np.mean(right))


def heldout_accuracy(config: ModelConfig, params: Params, count: int = 64,
                     context_len: int = 512) -> dict[str, float]:
  """{"mqar": per-query accuracy at P = 32, "selective_copy": per-token at n = 16}
  on `count` held-out examples of each, context_len tokens of context."""
  return {task: answer_accuracy(config, params, heldout_examples(task, count, context_len))
          for task in ("mqar", "selective_copy")}


# ---- the committed checkpoint -----------------------------------------------------------

def save_tiny(path, config: ModelConfig, params: Params, summary: dict,
              overwrite: bool = False) -> Path:
  """Writes path/config.json (HF form), path/params (orbax) and path/summary.json."""
  from lctx.checkpoint import hf_config_dict, save_params
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
  save_params(path / "params", params, overwrite=overwrite)
  (path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return path


def load_tiny(path=TINY_DIR) -> tuple[ModelConfig, Params]:
  """(config, params) of a checkpoint written by save_tiny (default: the committed one)."""
  from lctx.checkpoint import restore_params
  path = Path(path)
  config = ModelConfig.from_hf_config(path / "config.json", name="lctx-quality-tiny")
  return config, restore_params(path / "params", config)
