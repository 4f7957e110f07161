"""Every (data x seq x model) factorization of a device count, compiled and costed.

  python -m experiments.shard_sweep                  # yi-34b, 50K context, 8 devices
  python -m experiments.shard_sweep --context=1000000 --batch=8 --json_out=sweep.json

For each mesh: per-device weight and cache bytes, prefill and decode FLOPs,
bytes and peak temporaries from the partitioned HLO, collective bytes by kind, and predicted prefill
and decode times on --hardware; the best mesh for each is marked. Meshes that
do not divide the model, batch or context are listed with the reason.
"""

from __future__ import annotations

import json
import time

from absl import flags

from experiments import cli, costing, distributed

_MODEL = flags.DEFINE_string("model", "yi-34b", "Preset name or config.json path.")
_HARDWARE = flags.DEFINE_string("hardware", "a100-80g-sxm", "Hardware preset or spec json.")
_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices to factor into data x seq x model.",
                                lower_bound=1)
_CONTEXT = flags.DEFINE_integer("context", 50000, "Prompt length and cache capacity.",
                                lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 8, "Users (rows) per step.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "dtype.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the rows here as JSON.")


def main(argv):
  del argv  # cli.run refuses positional arguments
  n, T, B = _DEVICES.value, _CONTEXT.value, _BATCH.value
  cli.check_output_paths(json_out=_JSON_OUT.value)
  costing.check_contexts([T], "--context")
  # Compile-only: CPU devices stand in for the accelerators being analysed.
  cli.want_cpu_devices(max(8, n))
  distributed.maybe_initialize()
  import lctx
  from lctx import sharding
  from lctx.cache import abstract_cache
  from lctx.cost import calibrated, metrics

  costing.require_devices(n, f"--num_devices={n}")
  config, hw = costing.model_and_hardware(_MODEL.value, _HARDWARE.value, _DTYPE.value)
  cal = calibrated.for_hardware(hw)
  print(f"calibration: {cal.source}")
  cli.warn_beyond_positions(config, [T])
  params, cache = lctx.abstract_params(config), abstract_cache(config, B, T)
  rows, start = [], time.perf_counter()
  for d in (d for d in range(1, n + 1) if n % d == 0):
    for s in (s for s in range(1, n // d + 1) if (n // d) % s == 0):
      m = n // d // s
      spec = f"data:{d},seq:{s},model:{m}"
      try:
        plan = sharding.Plan(config, sharding.make_mesh(spec))
        plan.check(batch=B, capacity=T, prompt_len=T)
      except ValueError as e:
        rows.append({"mesh": spec, "skipped": str(e)})
        continue
      note = costing.kv_replication_note(config, spec)
      if note:
        print(note)
      cache_shardings = plan.cache_shardings(cache)
      row = {"mesh": spec, "data": d, "seq": s, "model": m, "kv_replicas": plan.kv_replicas,
             "weight_bytes_per_device": metrics.per_device_bytes(params,
                                                                 plan.param_shardings(params)),
             "cache_bytes_per_device": metrics.per_device_bytes(
                 (cache.k, cache.v), (cache_shardings.k, cache_shardings.v))}
      for kind in ("prefill", "decode"):
        costs = metrics.program_costs(config, spec, T, B, kind)
        row.update({f"{kind}_flops_per_device": costs.flops,
                    f"{kind}_bytes_per_device": costs.bytes_ideal,
                    f"{kind}_temp_bytes_per_device": costs.temp_bytes,
                    f"{kind}_collective_bytes_per_device": dict(costs.collectives),
                    f"{kind}_s": metrics.roofline_seconds(costs, hw, _DTYPE.value),
                    f"{kind}_s_calibrated": calibrated.calibrated_seconds(costs, hw, _DTYPE.value,
                                                                          cal),
                    f"{kind}_kernels": dict(costs.kernels)})
      rows.append(row)
      print(f"{spec:24s} weights {row['weight_bytes_per_device'] / 1e9:7.2f} GB  cache "
            f"{row['cache_bytes_per_device'] / 1e9:7.2f} GB  temps prefill "
            f"{row['prefill_temp_bytes_per_device'] / 1e9:7.2f} GB  decode "
            f"{row['decode_temp_bytes_per_device'] / 1e9:6.3f} GB  prefill {row['prefill_s']:8.3f} s  "
            f"decode {1e3 * row['decode_s']:8.3f} ms  calibrated {row['prefill_s_calibrated']:8.3f} s "
            f"{1e3 * row['decode_s_calibrated']:8.3f} ms  ({time.perf_counter() - start:.0f} s)",
            flush=True)
  ran = [r for r in rows if "skipped" not in r]
  for kind in ("prefill", "decode"):
    if ran:
      best = min(ran, key=lambda r: r[f"{kind}_s"])
      best[f"best_{kind}"] = True
      print(f"best {kind}: {best['mesh']} ({best[f'{kind}_s']:.4g} s)")
      best_cal = min(ran, key=lambda r: r[f"{kind}_s_calibrated"])
      best_cal[f"best_{kind}_calibrated"] = True
      print(f"best {kind}, calibrated: {best_cal['mesh']} "
            f"({best_cal[f'{kind}_s_calibrated']:.4g} s)")
  for r in rows:
    if "skipped" in r:
      print(f"{r['mesh']:24s} skipped: {r['skipped']}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"model": config.name, "hardware": hw.name, "calibration": cal.to_dict(),
                 "context": T, "batch": B,
                 "num_devices": n, "rows": rows}, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
