"""Generates tokens from a preset (random weights) or a checkpoint.

  python -m experiments.generate                      # tiny preset, random weights
  python -m experiments.generate --model=small --batch=4 --temperature=0.8 --top_k=40
  python -m experiments.generate --checkpoint=/path/to/hf_dir --prompt_tokens=1,2,3
  python -m experiments.generate --model=tiny --checkpoint=/path/to/orbax_dir

--seed seeds the random weights (when there is no checkpoint), the random
prompts and the sampling key. A --checkpoint directory holding config.json or
*.safetensors is read as a Hugging Face checkpoint (its config.json is the
model); any other directory is an orbax checkpoint written by
lctx.save_params, restored against the --model config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from absl import app, flags
import jax
import numpy as np

import lctx
from experiments import distributed

_MODEL = flags.DEFINE_string(
    "model", "tiny", "Preset name, config.json path or checkpoint directory.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "HF checkpoint directory (config.json + *.safetensors) or an orbax "
    "directory written by lctx.save_params. Default: random weights from --seed.")
_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 16, "Random prompt tokens per row (from --seed).", lower_bound=1)
_PROMPT_TOKENS = flags.DEFINE_list(
    "prompt_tokens", None, "Comma-separated prompt token ids, used for every row; excludes "
    "--prompt_len.")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompt rows.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 16, "Tokens generated per row.", lower_bound=1)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seeds random weights, random prompts and sampling.", lower_bound=0)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass in (0, 1]; 1 = off.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Compute dtype (activations and KV cache). "
    "Default: the config's (float32).")
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers", True, "Stacked layers under lax.scan; false = unrolled per-layer params.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the tokens and run details here.")
_MESH = flags.DEFINE_string(
    "mesh", None, "Run sharded on a device mesh, e.g. model:8, data:2,model:4, seq:8 or "
    "data:2,seq:2,model:2 (axes data, seq, model). Default: one device.")

OWN_FLAGS = ("model", "checkpoint", "prompt_len", "prompt_tokens", "batch", "max_new_tokens",
             "seed", "temperature", "top_k", "top_p", "dtype", "scan_layers", "json_out", "mesh")


def _ints(values) -> bool:
  try:
    [int(v) for v in values]
  except ValueError:
    return False
  return True


flags.register_validator("top_p", lambda p: 0 < p <= 1, "--top_p must be in (0, 1]")
flags.register_validator("prompt_tokens", lambda v: v is None or (len(v) > 0 and _ints(v)),
                         "--prompt_tokens must be comma-separated integers, e.g. 1,2,3")


def make_prompt(vocab_size: int, batch: int, prompt_len: int, seed: int) -> np.ndarray:
  """Random prompts [B, T] int32 in [0, vocab_size)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab_size, (batch, prompt_len)).astype(np.int32)


def is_hf_checkpoint(path: Path) -> bool:
  return (path / "config.json").is_file() or any(path.glob("*.safetensors"))


def _mismatched_fields(a, b) -> list[str]:
  """Architecture fields that differ (name and dtypes ignored)."""
  skip = ("name", "param_dtype", "dtype")
  return [f.name for f in dataclasses.fields(a)
          if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)]


def load_model(seed: int):
  """(config, stacked params) from --model / --checkpoint / --dtype."""
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  path = Path(_CHECKPOINT.value).expanduser() if _CHECKPOINT.value else None
  if path is None:
    config = _resolve_config(_MODEL.value, overrides)
    return config, lctx.init_params(config, seed)
  if not path.is_dir():
    raise app.UsageError(f"--checkpoint={_CHECKPOINT.value}: not a directory")
  if is_hf_checkpoint(path):
    try:
      config = lctx.ModelConfig.from_hf_config(path, **overrides)  # cheap: check before loading
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"--checkpoint={path} (HF): {e}") from e
    if flags.FLAGS["model"].present:
      diff = _mismatched_fields(_resolve_config(_MODEL.value, overrides), config)
      if diff:
        raise app.UsageError(
            f"--model={_MODEL.value} contradicts the config.json of --checkpoint={path} in "
            f"{diff}; drop --model (the checkpoint's config is used)")
    try:
      return lctx.load_hf_checkpoint(path, dtype=_DTYPE.value)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"--checkpoint={path} (HF): {e}") from e
  config = _resolve_config(_MODEL.value, overrides)  # orbax stores no config
  try:
    return config, lctx.restore_params(path, config)
  except ValueError as e:
    raise app.UsageError(f"--checkpoint={path} (orbax) does not fit --model={_MODEL.value}: "
                         f"{e}") from e


def _resolve_config(name: str, overrides) -> lctx.ModelConfig:
  try:
    return lctx.ModelConfig.resolve(name, **overrides)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--model={name}: {e}") from e


def run_generate(config, params, prompt: np.ndarray, sampling, mesh_spec: str | None):
  """lctx.generate, sharded when a mesh is given.

  On a mesh, the batch is padded with dummy rows to a multiple of `data`, and
  the prompt and the cache capacity are right-padded to multiples of `seq`
  (per-row lengths keep the padding invisible); only the real rows come back.
  """
  new = _MAX_NEW_TOKENS.value
  key = jax.random.key(_SEED.value)
  if not mesh_spec:
    return lctx.generate(config, params, prompt, max_new_tokens=new, sampling=sampling, key=key)
  try:
    plan = lctx.sharding.Plan(config, lctx.sharding.make_mesh(mesh_spec))
  except ValueError as e:
    raise app.UsageError(f"--mesh={mesh_spec}: {e}") from e
  B, T = prompt.shape
  data, seq = plan.size("data"), plan.size("seq")
  rows, width = -(-B // data) * data, -(-T // seq) * seq
  padded = np.zeros((rows, width), np.int32)
  padded[:B, :T] = prompt
  padded[B:, :T] = prompt[:1]  # dummy rows: any valid prompt
  capacity = -(-(width + new) // seq) * seq
  try:
    out = lctx.generate(config, params, padded, lengths=np.full((rows,), T), max_new_tokens=new,
                        sampling=sampling, key=key, capacity=capacity, plan=plan)
  except ValueError as e:
    raise app.UsageError(f"--mesh={mesh_spec}: {e}") from e
  return plan.to_host(out)[:B]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.maybe_initialize()
  if _PROMPT_TOKENS.value is not None and flags.FLAGS["prompt_len"].present:
    raise app.UsageError("--prompt_len and --prompt_tokens are mutually exclusive; set one")

  config, params = load_model(_SEED.value)
  if _PROMPT_TOKENS.value is not None:
    prompt = np.asarray([int(t) for t in _PROMPT_TOKENS.value], np.int32)
    bad = prompt[(prompt < 0) | (prompt >= config.vocab_size)]
    if bad.size:
      raise app.UsageError(f"--prompt_tokens: ids {bad.tolist()} outside the vocabulary "
                           f"[0, {config.vocab_size})")
    prompt = np.tile(prompt, (_BATCH.value, 1))
  else:
    prompt = make_prompt(config.vocab_size, _BATCH.value, _PROMPT_LEN.value, _SEED.value)
  if not _SCAN_LAYERS.value:
    params = lctx.unstack_layers(params)
  sampling = lctx.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)

  print(f"model {config.name}: {config.num_params:,} params, L={config.num_layers} "
        f"D={config.hidden_size} F={config.intermediate_size} N={config.num_heads} "
        f"K={config.num_kv_heads} H={config.head_dim} V={config.vocab_size}, "
        f"param_dtype={config.param_dtype} dtype={config.dtype}")
  print("flags: " + " ".join(f"--{n}={flags.FLAGS[n].value}" for n in OWN_FLAGS))

  start = time.perf_counter()
  tokens = run_generate(config, params, prompt, sampling, _MESH.value)
  tokens = np.asarray(jax.block_until_ready(tokens)).tolist()
  seconds = time.perf_counter() - start

  for row, (p, t) in enumerate(zip(prompt.tolist(), tokens)):
    print(f"row {row}: prompt {p}\n       tokens {t}")
  print(f"generate: {seconds:.2f} s (compile included), B={len(tokens)} T={prompt.shape[1]} "
        f"new={_MAX_NEW_TOKENS.value}")
  if _JSON_OUT.value and distributed.is_main_process():
    out = {"tokens": tokens, "prompt": prompt.tolist(), "model": config.name,
           "num_params": config.num_params, "seconds": seconds,
           "flags": {n: flags.FLAGS[n].value for n in OWN_FLAGS}}
    Path(_JSON_OUT.value).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
  app.run(main)
