"""Published serving measurements to validate the cost model against.

Source: `systems/silicon_sample.csv` of the package aiconfigurator-core 0.12.0
(NVIDIA, Apache-2.0; optional extra `validate`), read from the installed package
at run time and never copied into this repository. Each row is one benchmark of
a served model on one system: a backend (TensorRT-LLM 'trtllm', vLLM, SGLang)
and its version, the parallelism (tp/pp/attention-dp sizes, plus MoE and
disaggregated prefill/decode sizes), input and output lengths (isl, osl,
tokens), the batch per worker (`batch_size`, the benchmark's concurrency; the
client concurrency is also in `silicon_data_source` as silicon_concurrency=N),
the GEMM quantization (`gemm_quant_mode`: '' is the checkpoint's own dtype, bf16
for the base checkpoints), and the measured mean TTFT and TPOT in milliseconds
(`silicon_ttft_ms`, `silicon_tpot_ms`).

`read_rows` keeps the rows lctx can cost (a dense preset on a GPU with an lctx
hardware preset, aggregated serving, tensor parallel only, bf16 or fp8 weights)
as `ServingRow`s with times in seconds, and lists every other row with the
reason it is skipped: every CSV row lands in exactly one of the two lists.

The CSV gives no KV-cache dtype. `kv_dtype` follows aiconfigurator's own rule
(aiconfigurator_core/sdk/models/helpers.py, _infer_quant_modes_from_raw_config):
fp8 for checkpoints published pre-quantized (nvidia/*-FP8, *-NVFP4), else the
checkpoint's bf16, whatever `gemm_quant_mode` quantizes at load time.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

PACKAGE = "aiconfigurator_core"
PINNED = "aiconfigurator-core==0.12.0"  # the version the tests' spot checks read
CSV_RELPATH = ("systems", "silicon_sample.csv")

COLUMNS = ("id", "silicon_data_source", "backend", "backend_version", "model_path", "system",
           "precision", "mode", "isl", "osl", "gemm_quant_mode", "moe_quant_mode", "batch_size",
           "tp_size", "pp_size", "attention_dp_size", "silicon_ttft_ms", "silicon_tpot_ms")

# Hugging Face model -> lctx preset (configs/models). The Instruct and
# pre-quantized checkpoints have the base model's architecture.
MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "nvidia/Llama-3.1-8B-Instruct-FP8": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "Qwen/Qwen3-32B": "qwen3-32b",
    "nvidia/Qwen3-32B-NVFP4": "qwen3-32b",
}
# Quantization of the pre-quantized checkpoints (their hf_quant_config.json),
# used when the row leaves gemm_quant_mode empty; their KV cache is fp8.
CHECKPOINT_QUANT = {
    "nvidia/Llama-3.1-8B-Instruct-FP8": "fp8",
    "nvidia/Qwen3-32B-NVFP4": "nvfp4",
}
# Mixture-of-experts models in the 0.12.0 CSV: named as such in the skip reason
# rather than as merely unknown.
MOE_MODELS = frozenset({
    "deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-V3", "nvidia/DeepSeek-R1-NVFP4",
    "nvidia/DeepSeek-V3.1-NVFP4", "MiniMaxAI/MiniMax-M2.5", "openai/gpt-oss-120b",
    "Qwen/Qwen3-235B-A22B-FP8", "Qwen/Qwen3.5-397B-A17B", "moonshotai/Kimi-K2.5",
    "zhipuai/GLM-5",
})
# aiconfigurator system -> lctx hardware preset (configs/hardware). gb200,
# gb300 and b300_sxm have none: the b200 preset is the HGX B200 (1000 W), not
# the Grace-Blackwell part.
SYSTEMS = {"h100_sxm": "h100-sxm", "h200_sxm": "h200", "b200_sxm": "b200"}
# gemm_quant_mode -> lctx dtype (a key of HardwareSpec.peak_flops; the storage
# itemsize is lctx.cost.analytic's 'float8_e4m3fn', see STORAGE_DTYPES).
# fp8_block (128x128-block scales) stores and multiplies the same E4M3 bytes;
# its scales are < 0.01% of the weight bytes. nvfp4 and int4_wo are skipped:
# the hardware presets have no fp4/int4 peak.
WEIGHT_DTYPES = {"": "bfloat16", "fp8": "float8", "fp8_block": "float8"}
STORAGE_DTYPES = {"bfloat16": "bfloat16", "float8": "float8_e4m3fn"}


@dataclasses.dataclass(frozen=True)
class ServingRow:
  """One measured aggregated-serving benchmark lctx can cost.

  Every modellable row has pp_size 1 and attention data parallelism 1, so the
  mesh is `model:tp` on `tp` devices of `hardware`."""

  index: int  # 0-based data row of the CSV (file line index + 2, counting the header)
  row_id: str  # the CSV's `id`
  hf_model: str  # `model_path`, e.g. 'meta-llama/Llama-3.1-70B'
  model: str  # lctx model preset, e.g. 'llama-3.1-70b'
  system: str  # aiconfigurator's system, e.g. 'h200_sxm'
  hardware: str  # lctx hardware preset, e.g. 'h200'
  backend: str  # 'trtllm' | 'vllm' | 'sglang'
  backend_version: str  # e.g. '1.0.0rc3'; '' where the CSV has none
  tp: int  # tensor-parallel devices of the one worker
  concurrency: int  # users served at once (`batch_size`)
  isl: int  # input tokens per request
  osl: int  # output tokens per request
  quant_mode: str  # `gemm_quant_mode` as published ('' / 'fp8' / 'fp8_block')
  weight_dtype: str  # 'bfloat16' | 'float8'
  kv_dtype: str  # 'bfloat16' | 'float8'; assumed (module docstring), not in the CSV
  ttft_s: float  # measured mean time to first token, s
  tpot_s: float  # measured mean time per output token after the first, s

  @property
  def mesh(self) -> str:
    return f"model:{self.tp}"


def csv_path() -> Path:
  """The installed package's silicon_sample.csv, found without importing the
  package (its __init__ loads an 80 MB compiled extension)."""
  spec = importlib.util.find_spec(PACKAGE)
  hint = f"pip install {PINNED} (or pip install -e '.[validate]')"
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {PACKAGE} is not installed: {hint}")
  for root in spec.submodule_search_locations:
    path = Path(root).joinpath(*CSV_RELPATH)
    if path.is_file():
      return path
  raise FileNotFoundError(f"no {'/'.join(CSV_RELPATH)} in the installed {PACKAGE} "
                          f"({list(spec.submodule_search_locations)}): {hint}")


def _int(value: str, empty: int | None = None) -> int | None:
  """A CSV integer; `empty` for ''. Non-integers raise ValueError."""
  return empty if value.strip() == "" else int(value)


def _concurrency_in_source(source: str) -> int | None:
  m = re.search(r"silicon_concurrency=(\d+)", source)
  return int(m.group(1)) if m else None


def _map_row(index: int, r: dict[str, str]) -> ServingRow | str:
  """The ServingRow of CSV row `r`, or why lctx cannot cost it. Checks run
  model, system, serving mode, parallelism, dtype, measurements, in that order:
  the first failure is the row's one reason."""
  hf = r["model_path"]
  if hf in MOE_MODELS:
    return f"MoE model {hf} (lctx costs dense decoders)"
  if hf not in MODELS:
    return f"model {hf} has no lctx preset"
  if r["system"] not in SYSTEMS:
    return f"system {r['system']} has no lctx hardware preset"
  if r["mode"] != "agg":
    return (f"{r['mode'] or 'no'} serving mode (lctx costs aggregated serving: one worker "
            f"does prefill and decode)")
  try:
    tp, pp, batch, isl, osl = (_int(r[k]) for k in ("tp_size", "pp_size", "batch_size", "isl",
                                                      "osl"))
    dp = _int(r["attention_dp_size"], 1) or 1  # '' and 0 mean no attention DP
  except ValueError:
    return "non-integer parallelism, batch or length"
  if None in (tp, pp, batch, isl, osl) or min(tp, pp, batch, isl, osl) <= 0:
    return "missing parallelism, batch or length"
  if pp != 1:
    return "pipeline parallel (lctx meshes have no pipeline axis)"
  if dp != 1:
    return "attention data parallel (lctx replicates whole models only)"
  quant = r["gemm_quant_mode"] or CHECKPOINT_QUANT.get(hf, "")
  if quant not in WEIGHT_DTYPES:
    return f"weight quantization {quant} (lctx has bf16 and fp8 peaks only)"
  users = _concurrency_in_source(r["silicon_data_source"])
  if users is not None and users != batch:
    return "client concurrency differs from batch_size (several workers)"
  if "wip=True" in r["silicon_data_source"]:
    return "measurement marked wip=True"
  try:
    ttft_ms, tpot_ms = float(r["silicon_ttft_ms"]), float(r["silicon_tpot_ms"])
  except ValueError:
    return "missing TTFT or TPOT"
  if not (math.isfinite(ttft_ms) and math.isfinite(tpot_ms) and ttft_ms > 0 and tpot_ms > 0):
    return "non-positive TTFT or TPOT"
  return ServingRow(
      index=index, row_id=r["id"], hf_model=hf, model=MODELS[hf], system=r["system"],
      hardware=SYSTEMS[r["system"]], backend=r["backend"], backend_version=r["backend_version"],
      tp=tp, concurrency=batch, isl=isl, osl=osl, quant_mode=r["gemm_quant_mode"],
      weight_dtype=WEIGHT_DTYPES[quant],
      kv_dtype="float8" if hf in CHECKPOINT_QUANT else "bfloat16",
      ttft_s=ttft_ms / 1e3, tpot_s=tpot_ms / 1e3)


def read_rows(path: str | os.PathLike | None = None
              ) -> tuple[list[ServingRow], list[tuple[int, str]]]:
  """The rows lctx can cost, and (index, reason) for each other row (index as in
  ServingRow.index). `path` defaults to csv_path(). A CSV without one of COLUMNS
  is a ValueError: a new layout must not read as rows skipped one by one."""
  path = csv_path() if path is None else Path(path)
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path} lacks column(s) {missing}; has {reader.fieldnames}")
    rows, skipped, n = [], [], 0
    for n, r in enumerate(reader, start=1):
      mapped = _map_row(n - 1, r)
      if isinstance(mapped, ServingRow):
        rows.append(mapped)
      else:
        skipped.append((n - 1, mapped))
  assert len(rows) + len(skipped) == n, (len(rows), len(skipped), n)
  return rows, skipped


def summary(rows: list[ServingRow], skipped: list[tuple[int, str]]) -> str:
  """Counts of the kept rows by (hardware, backend, tp) and of the skipped by reason."""
  lines = [f"{len(rows)} rows lctx can cost, {len(skipped)} skipped"]
  kept = collections.Counter((r.hardware, r.backend, r.tp) for r in rows)
  for (hw, backend, tp), n in sorted(kept.items()):
    lines.append(f"  {hw:10s} {backend:7s} tp={tp:<2d} {n:5d}")
  lines.append("skipped:")
  for reason, n in collections.Counter(reason for _, reason in skipped).most_common():
    lines.append(f"  {n:5d}  {reason}")
  return "\n".join(lines)
