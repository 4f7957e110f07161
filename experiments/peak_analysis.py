"""The four long-context metrics for a model on a device, closed form next to compiled HLO.

  python -m experiments.peak_analysis            # yi-34b on A100 80GB, 1/2/4/8 GPUs
  python -m experiments.peak_analysis --hardware=h100-sxm --contexts=4000,1000000 \\
      --json_out=out.json --plot_out=out.png
  python -m experiments.peak_analysis --mesh=model:8 --mesh=seq:2,model:4 --mesh=data:2,model:4
  python -m experiments.peak_analysis --num_devices=8 --contexts=131072 \
      --kv_compression=int8 --kv_compression=int4 --kv_compression=fp8   # dense first, then each
  python -m experiments.peak_analysis --kv_compression=help           # the policies and knobs
  python -m experiments.peak_analysis --kv_compression=int8 --quality_json=docs/quality.json

For every context length and mesh (tensor parallel over --num_devices, or each
--mesh) it compiles lctx's prefill and decode programs from abstract shapes
(nothing is allocated) and reads per-device costs from their partitioned HLO
(`hlo` rows), beside the framework's closed form (`analytic` rows, --convention
exact or paper), with their ratio. With --kv_compression (repeatable), every
row is computed again with each compressed cache, beside the dense one: its
physical bytes per token (closed form) and its compiled programs (the
quantized cache's writes and block-by-block dequantizing reads). Each cache
is shown with its quality: the relative accuracy (accuracy / the
uncompressed cache's) experiments.quality_sweep measured for that policy
(--quality_json; lctx.quality.results.relative_quality picks the rows), or
"unmeasured"; never assumed lossless.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time

from absl import app, flags

from experiments import cli, costing, distributed

_MODEL = flags.DEFINE_string("model", "yi-34b", "Preset name or config.json path.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 0, "Cost the model converted to this many KV heads "
                                 "(lctx.mha_to_gqa's mean-pooled GQA; a divisor of its own); "
                                 "0 = the model's own.", lower_bound=0)
_HARDWARE = flags.DEFINE_string("hardware", "a100-80g-sxm", "Hardware preset (configs/hardware) "
                                "or spec json, or cpu-local (measured).")
_NUM_DEVICES = flags.DEFINE_list("num_devices", ["1", "2", "4", "8"],
                                 "Tensor-parallel device counts (mesh model:g).")
_MESH = flags.DEFINE_multi_string("mesh", [], "Mesh specs such as seq:2,model:4 (repeat the "
                                  "flag for several); replaces --num_devices.")
_CONTEXTS = flags.DEFINE_list("contexts", ["4000", "50000", "100000", "200000", "1000000"],
                              "Context lengths in tokens (decimal, as in the paper).")
_BATCH = flags.DEFINE_integer("batch", 1, "Users in the decode step (decode ms/token).",
                              lower_bound=1)
_GENERATED = flags.DEFINE_integer("generated_tokens", 1000, "Tokens each session generates "
                                  "(sessions per hour).", lower_bound=1)
# vLLM's, SGLang's and TensorRT-LLM's default prefill token budget on 80 GB
# GPUs: a chunk that long keeps prefill compute-bound (its GEMMs do 8192 FLOPs
# per weight byte read, against an A100's 153 or an H100's 295 FLOP/byte).
DEFAULT_PREFILL_CHUNK = 8192
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", DEFAULT_PREFILL_CHUNK, "Prefill chunk (tokens) a server runs long prompts "
    "in: the hlo prefill time, FLOPs and temporaries (hence concurrency) are the chunked "
    "program's; 0 = one pass. A mesh's seq size must divide it.", lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Weights and KV cache dtype.")
_CONVENTION = flags.DEFINE_enum("convention", "exact", ["exact", "paper"],
                                "Closed-form convention (see lctx.cost.analytic).")
_KV_COMPRESSION = flags.DEFINE_multi_string(
    "kv_compression", [], "KV-cache compression spec (lctx.cache.spec), e.g. int8, int4:group=64, "
    "fp8:scale=head, kivi:bits=2, snapkv:ratio=0.9, h2o:ratio=0.9+int8; repeat the flag to put "
    "several side by side (the dense cache "
    "always comes first); 'help' lists every policy and knob.")
_QUALITY_JSON = flags.DEFINE_string(
    "quality_json", "docs/quality.json", "The quality harness's results (python -m "
    "experiments.quality_sweep): each cache is shown with its measured relative accuracy, or "
    "'unmeasured'. The default, when missing: every lossy cache unmeasured; a given path must "
    "exist.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Programs compiled at once (0: one per CPU core).",
                                lower_bound=0)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every row here as JSON.")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Draw the four metrics vs context (PNG).")
_OP_TABLE_OUT = flags.DEFINE_string("op_table_out", None, "Write each compiled program's top "
                                    "ops by predicted time (with their source op_name) as JSON.")
_TOP_OPS = flags.DEFINE_integer("top_ops", 20, "Ops per program in --op_table_out.",
                                lower_bound=1)


def _ints(name: str, values) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name} must be comma-separated integers, got {values}") from None
  if not out or min(out) < 1:
    raise app.UsageError(f"--{name} must be positive integers, got {values}")
  return out


def _gb(x: float) -> str:
  return f"{x / 1e9:.2f}"


def _pairs(rows) -> dict:
  """(context, devices, mesh, kv_compression) -> {source: row}, in that order
  (compressions in the order their rows came)."""
  pairs = {}
  for r in rows:
    pairs.setdefault((r.context, r.num_devices, r.mesh, r.kv_compression), {})[r.source] = r
  return dict(sorted(pairs.items(), key=lambda item: item[0][:3]))


def _kv(spec: str) -> str:
  return spec or "dense"


def _kv_width(rows) -> int:
  """The "kv cache" column's width: 14, or the longest spec's."""
  return max([14] + [len(_kv(r.kv_compression)) for r in rows])


def format_table(rows) -> str:
  """One line per (context, mesh): analytic | hlo for each metric."""
  w = _kv_width(rows)
  head = (f"{'context':>9} {'mesh':>14} {'kv cache':>{w}} {'KV/user GB':>13} {'weights/dev GB':>14} "
          f"{'concurrency':>12} {'prefill s':>17} {'decode ms/tok':>15} {'ctx switch s':>14}"
          f"   {'calibrated: prefill s':>21} {'decode ms/tok':>15}")
  lines = [head, " " * (25 + w) + "(analytic | hlo; KV per user over all devices, weights per device;"
           " roofline, then calibrated)"]
  for (T, g, mesh, kv), by in _pairs(rows).items():
    a, h = by["analytic"], by["hlo"]
    lines.append(
        f"{T:>9} {mesh:>14} {_kv(kv):>{w}} "
        f"{_gb(a.kv_bytes_per_user_total) + '|' + _gb(h.kv_bytes_per_user_total):>13} "
        f"{_gb(a.weight_bytes_per_device) + '|' + _gb(h.weight_bytes_per_device):>14} "
        f"{f'{a.concurrency}|{h.concurrency}':>12} "
        f"{f'{a.prefill_s:.2f}|{h.prefill_s:.2f}':>17} "
        f"{f'{a.decode_step_s * 1e3:.2f}|{h.decode_step_s * 1e3:.2f}':>15} "
        f"{f'{a.context_switch_s:.3f}|{h.context_switch_s:.3f}':>14}   "
        f"{f'{a.prefill_s_calibrated:.2f}|{h.prefill_s_calibrated:.2f}':>21} "
        f"{f'{a.decode_step_s_calibrated * 1e3:.2f}|{h.decode_step_s_calibrated * 1e3:.2f}':>15}")
  calibration = next(iter(rows)).calibration_source if rows else ""
  return "\n".join(lines + [f"calibration: {calibration}"])


def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def format_shortfalls(rows) -> str:
  """Where not even one user fits: the HBM missing per device, per source."""
  lines = []
  for (T, _, mesh, kv), by in _pairs(rows).items():
    short = {src: r.shortfall_bytes_per_device for src, r in by.items() if r.concurrency == 0}
    if short:
      lines.append(f"  context {T} on {mesh}{f' with {kv}' if kv else ''}: " + ", ".join(
          f"{src} {_gb(b)} GB short per device" for src, b in short.items()))
  return "\n".join(["No user fits (concurrency 0):"] + lines) if lines else ""


def format_throughput(rows, metrics) -> str:
  """Throughput at a full HBM, the HLO's temporaries, and hlo/analytic ratios."""
  G = rows[0].generated_tokens
  w = _kv_width(rows)
  head = (f"{'context':>9} {'mesh':>14} {'kv cache':>{w}} {'decode tok/s':>15} "
          f"{'sessions/hour':>15} "
          f"{'temp GB dec|pre':>16}   hlo/analytic: {'conc':>6} {'prefill':>7} {'decode':>7} "
          f"{'switch':>7}")
  lines = [f"Throughput with HBM full ({G} generated tokens per session; analytic | hlo), "
           f"the compiled programs' peak temporaries per device, and hlo / analytic:", head]
  for (T, _, mesh, kv), by in _pairs(rows).items():
    a, h = by["analytic"], by["hlo"]
    q = metrics.ratios(a, h)
    lines.append(
        f"{T:>9} {mesh:>14} {_kv(kv):>{w}} "
        f"{f'{a.decode_tokens_per_s:.0f}|{h.decode_tokens_per_s:.0f}':>15} "
        f"{f'{a.sessions_per_hour:.0f}|{h.sessions_per_hour:.0f}':>15} "
        f"{_gb(h.decode_temp_bytes_per_device) + '|' + _gb(h.prefill_temp_bytes_per_device):>16}"
        f"   {'':>13} {_ratio(q['concurrency']):>6} {_ratio(q['prefill_s']):>7} "
        f"{_ratio(q['decode_step_s']):>7} {_ratio(q['context_switch_s']):>7}")
  return "\n".join(lines)


def format_switch(rows) -> str:
  """Beside each context switch, its alternative: drop the cache and prefill
  the context again (recompute); and for a streamed (offload) cache, the
  decode step with and without transfer/compute overlap."""
  w = _kv_width(rows)
  head = (f"{'context':>9} {'mesh':>14} {'kv cache':>{w}} {'switch s':>15} "
          f"{'recompute s':>17} {'cheaper':>9}   {'decode ms overlapped|serial (hlo)':>34}")
  lines = ["Context switch (one user's cache out, another's in) vs recompute (prefill again); "
           "analytic | hlo:", head]
  for (T, _, mesh, kv), by in _pairs(rows).items():
    a, h = by["analytic"], by["hlo"]
    cheaper = "switch" if h.context_switch_s <= h.prefill_s else "recompute"
    stream = (f"{h.decode_step_s * 1e3:.2f}|{h.decode_step_s_serial * 1e3:.2f}"
              if h.host_bytes_per_user_per_device else "-")
    lines.append(
        f"{T:>9} {mesh:>14} {_kv(kv):>{w}} "
        f"{f'{a.context_switch_s:.3f}|{h.context_switch_s:.3f}':>15} "
        f"{f'{a.prefill_s:.2f}|{h.prefill_s:.2f}':>17} {cheaper:>9}   {stream:>34}")
  return "\n".join(lines)


def format_quality(rows, quality_of, source: str) -> str:
  """Each cache's quality (`quality_of(kv, context)`, a results.Quality): one
  line, or one per context where they differ (a token budget is a different
  ratio of each context)."""
  w = _kv_width(rows)
  contexts = sorted({r.context for r in rows})
  lines = [f"Quality (relative accuracy: accuracy / the uncompressed cache's, measured by "
           f"experiments.quality_sweep; from {source}; 'unmeasured' is not lossless):"]
  for kv in dict.fromkeys(r.kv_compression for r in rows):
    labels = {T: quality_of(kv, T).label for T in contexts}
    if len(set(labels.values())) == 1:
      lines.append(f"  {_kv(kv):>{w}} quality: {labels[contexts[0]]}")
    else:
      lines += [f"  {_kv(kv):>{w}} quality at {T}: {label}" for T, label in labels.items()]
  return "\n".join(lines)


def _decode_span(contexts) -> tuple[int, int]:
  """The contexts decode steps are compiled at; those between are interpolated
  (metrics.programs)."""
  return min(contexts), max(contexts)


def op_table(config, meshes, contexts, batch, hw, dtype, n, chunk, kv_specs=("",)) -> list[dict]:
  """The top ops of every program the sweep compiled (cached: nothing recompiles)."""
  from lctx.cost import metrics
  return [{"context": T, "mesh": spec, "kv_compression": kv, "kind": kind, "batch": B,
           "ops": costs.top_ops(hw.flops(dtype), hw.hbm_bandwidth, n)}
          for T in contexts for mesh in meshes for kv in kv_specs
          for kind, (spec, B, costs) in metrics.programs(
              config, mesh, T, batch, dtype, chunk, _decode_span(contexts), kv).items()
          if kind != "swap"]  # host copies only: nothing for an HBM roofline to rank


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  panels = [("concurrency", "users that fit", 1), ("prefill_s", "prefill latency (s)", 1),
            ("decode_step_s", "decode latency (ms/token)", 1e3),
            ("context_switch_s", "context switch (s)", 1)]
  kvs = list(dict.fromkeys(r.kv_compression for r in rows))
  meshes = sorted({(r.num_devices, r.mesh, kvs.index(r.kv_compression)) for r in rows})
  for ax, (field, label, scale) in zip(axes.flat, panels):
    for i, (g, mesh, k) in enumerate(meshes):
      kv = kvs[k]
      for source, style in (("analytic", "--"), ("hlo", "-")):
        if source == "analytic" and any(m[0] == g and m[2] == k for m in meshes[:i]):
          continue  # the closed form depends on the device count only
        pts = sorted((r.context, getattr(r, field) * scale) for r in rows
                     if r.mesh == mesh and r.source == source and r.kv_compression == kv)
        tag = "" if len(kvs) == 1 else f" {_kv(kv)}"
        ax.plot([p[0] for p in pts], [max(p[1], 1e-9) if field != "concurrency" else p[1]
                                      for p in pts], style, color=f"C{i % 10}", marker="o", ms=3,
                label=f"{mesh}{tag}, {source}" if source == "hlo" else f"{g} dev{tag}, analytic")
    ax.set_xscale("log")
    ax.set_yscale("symlog" if field == "concurrency" else "log")
    if field == "concurrency":
      ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens)")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  r0 = rows[0]
  fig.suptitle(f"{r0.model} on {r0.hardware}, batch {r0.batch}: closed form (dashed) vs "
               f"compiled HLO (solid)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _mesh_flags() -> list[tuple[str, str]]:
  """(mesh label, the flag that names it) for each mesh of the sweep."""
  from lctx.cost import metrics
  if _MESH.value:
    out = []
    for m in _MESH.value:
      try:
        out.append((metrics.mesh_label(m), f"--mesh={m}"))
      except ValueError as e:
        raise app.UsageError(f"--mesh={m}: {e}") from e
    return out
  return [(metrics.mesh_label(g), f"--num_devices={g}")
          for g in _ints("num_devices", _NUM_DEVICES.value)]


def _kv_specs(config, contexts) -> list[str]:
  """The canonical compression specs of the sweep, dense first; a UsageError
  naming the flag for one that does not parse or fit the model, before
  anything compiles."""
  from lctx.cache import spec as spec_lib
  from lctx.cache.dense import cache_format
  from lctx.cost import metrics
  out = [""]
  for value in _KV_COMPRESSION.value:
    try:
      spec = str(spec_lib.parse(value))
      for T in contexts:
        slots = metrics.cache_slots(config, spec, T)  # with eviction: the kept tokens
        fmt = cache_format(config, spec, capacity=slots)
        if fmt is not None and slots % fmt.slot_multiple:
          raise ValueError(f"context {T} with {spec!r}: allowed: a multiple of "
                           f"{fmt.slot_multiple}")
    except ValueError as e:
      raise app.UsageError(f"--kv_compression={value}: {e}") from e
    if spec not in out:
      out.append(spec)
  return out


def _check_meshes(config, meshes, contexts, batch, chunk, kv_specs=("",)) -> None:
  """Every mesh fits the model, the batch, the prefill chunk, each context and
  each compressed cache, before anything compiles: a UsageError naming the
  flag otherwise."""
  from lctx import sharding
  from lctx.cost import metrics
  from lctx.model import transformer
  for mesh, flag in meshes:
    try:
      d = sharding.parse_mesh_spec(mesh)["data"]
      if batch % d:
        raise ValueError(f"batch {batch} must be a multiple of the mesh's data size {d} "
                         f"(--batch)")
      decode = sharding.Plan(config, sharding.make_mesh(mesh))
      replica = sharding.Plan(config, sharding.make_mesh(metrics.replica_mesh(mesh)))
      for T in contexts:
        decode.check(batch=batch, capacity=T)
        replica.check(batch=1, capacity=T, prompt_len=T)
      for kv in kv_specs:
        if kv:
          decode.check(compressed=kv)
      try:
        transformer.check_chunk(chunk, replica, max(contexts))
      except ValueError as e:
        raise ValueError(f"--prefill_chunk: {e}") from e
    except ValueError as e:
      raise app.UsageError(f"{flag}: {e}") from e


def main(argv):
  del argv  # cli.run refuses positional arguments
  if "help" in _KV_COMPRESSION.value:
    from lctx.cache import spec as spec_lib
    print(spec_lib.describe())
    return
  cli.check_output_paths(json_out=_JSON_OUT.value, plot_out=_PLOT_OUT.value,
                         op_table_out=_OP_TABLE_OUT.value)
  contexts = _ints("contexts", _CONTEXTS.value)
  costing.check_contexts(contexts, "--contexts")
  sizes = [cli.mesh_size(m) for m in _MESH.value] if _MESH.value else [
      int(g) for g in _NUM_DEVICES.value if g.strip().isdigit()]
  # Compile-only: CPU devices stand in for the accelerators being analysed.
  cli.want_cpu_devices(max([8] + [n for n in sizes if n]))
  distributed.maybe_initialize()

  from lctx.cost import metrics

  meshes = _mesh_flags()
  costing.require_devices(max(metrics.num_devices(m) for m, _ in meshes),
                          max(meshes, key=lambda mf: metrics.num_devices(mf[0]))[1])
  own = costing.model(_MODEL.value, _DTYPE.value)
  config = costing.kv_heads(own, _KV_HEADS.value)
  kv_specs = _kv_specs(config, contexts)
  quality_json, quality_source = costing.quality_rows(_QUALITY_JSON, "cache")
  from lctx.quality import results

  def quality_of(kv: str, T: int) -> results.Quality:
    if config.num_kv_heads != own.num_kv_heads:  # a model change the harness does not measure
      return results.Quality(None, f"{results.UNMEASURED} (--kv_heads={config.num_kv_heads}: "
                                   f"the converted model)")
    return results.relative_quality(quality_json, kv, T)

  _check_meshes(config, meshes, contexts, _BATCH.value, _PREFILL_CHUNK.value, kv_specs)
  hw = costing.hardware(_HARDWARE.value, _DTYPE.value)  # cpu-local measures: after the checks
  flag_of = dict(meshes)
  meshes = list(flag_of)
  print(f"model {config.name} ({config.num_params / 1e9:.3f}B params, {_DTYPE.value}), "
        f"hardware {hw.name}, meshes {meshes}, contexts {contexts}, batch {_BATCH.value}, "
        f"convention {_CONVENTION.value}, prefill chunk "
        f"{_PREFILL_CHUNK.value or 'none (one pass)'}, kv caches "
        f"{[_kv(k) for k in kv_specs]}", flush=True)
  cli.warn_beyond_positions(config, contexts)
  for mesh in meshes:
    note = costing.kv_replication_note(config, mesh)
    if note:
      print(note)
  rows, start = [], time.perf_counter()
  # XLA compiles outside the GIL: compile the sweep's programs on every core,
  # in context order, while the rows are assembled as they arrive.
  import jax
  workers = 1 if jax.process_count() > 1 else (_WORKERS.value or os.cpu_count())  # same order
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    compiled = {(T, mesh, kv): pool.submit(metrics.programs, config, mesh, T, _BATCH.value,
                                           _DTYPE.value, _PREFILL_CHUNK.value,
                                           _decode_span(contexts), kv)
                for T in contexts for mesh in meshes for kv in kv_specs}
    for i, T in enumerate(contexts):
      for mesh in meshes:
        for kv in kv_specs:
          try:
            compiled[(T, mesh, kv)].result()
            rows.append(metrics.from_closed_form(config, hw, mesh, T, _BATCH.value, _DTYPE.value,
                                                 _CONVENTION.value, _GENERATED.value, kv))
            rows.append(metrics.from_hlo(config, hw, mesh, T, _BATCH.value, _DTYPE.value,
                                         _GENERATED.value, _PREFILL_CHUNK.value,
                                         _decode_span(contexts), kv))
          except ValueError as e:
            for f in compiled.values():
              f.cancel()
            raise app.UsageError(f"--contexts={T} on {flag_of[mesh]}"
                                 f"{f' with --kv_compression={kv}' if kv else ''}: {e}") from e
      print(f"[{i + 1}/{len(contexts)}] context {T}: {time.perf_counter() - start:.1f} s",
            flush=True)
  print(format_table(rows))
  shortfalls = format_shortfalls(rows)
  if shortfalls:
    print(shortfalls)
  print()
  print(format_throughput(rows, metrics))
  print()
  print(format_switch(rows))
  if len(kv_specs) > 1 or config.num_kv_heads != own.num_kv_heads:
    print()
    print(format_quality(rows, quality_of, quality_source))
  print(f"total {time.perf_counter() - start:.1f} s")
  report = [dataclasses.asdict(r) for r in rows]
  pairs = _pairs(rows)
  for row, r in zip(report, rows):  # quality; each hlo row: its ratios to the closed form
    q = quality_of(r.kv_compression, r.context)
    row["relative_accuracy"], row["quality_label"] = q.value, q.label
    if r.source == "hlo":
      row["hlo_over_analytic"] = metrics.ratios(pairs[(r.context, r.num_devices, r.mesh,
                                                       r.kv_compression)]["analytic"], r)
  if _CONVENTION.value == "paper":
    from lctx.cost import paper
    if config.name != "yi-34b":
      print("(the paper's figures T1-T15 are for yi-34b; none to compare for this model)")
    else:
      targets = paper.targets(config, hw)
      print("\nThe paper's figures (FRAMEWORK.md T1-T15) beside lctx's closed form, paper "
            f"convention, on {hw.name}:\n" + paper.format_targets(targets))
      report = {"rows": report, "paper_targets": [
          {**dataclasses.asdict(t), "diff_percent": t.diff_percent} for t in targets]}
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")
  if _OP_TABLE_OUT.value:
    table = op_table(config, meshes, contexts, _BATCH.value, hw, _DTYPE.value, _TOP_OPS.value,
                     _PREFILL_CHUNK.value, kv_specs)
    with open(_OP_TABLE_OUT.value, "w") as f:
      json.dump(table, f, indent=1)
    print(f"wrote {_OP_TABLE_OUT.value}")
  if _PLOT_OUT.value:
    plot(rows, _PLOT_OUT.value)
    print(f"wrote {_PLOT_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
