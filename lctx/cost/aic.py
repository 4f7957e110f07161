"""AIConfigurator's own predictions of the published serving rows.

For a `published.ServingRow`, `predict` returns the TTFT and TPOT that NVIDIA's
AIConfigurator (package aiconfigurator-core 0.12.0, optional extra `validate`)
predicts for it, beside lctx's: what `aiconfigurator cli estimate` (upper
package aiconfigurator 0.12.0, aiconfigurator/cli/api.py `cli_estimate` ->
`_run_agg_estimate`) computes for an aggregated row, rebuilt here from the core
package it delegates to (the upper package's `aiconfigurator.sdk` modules are
aliases of `aiconfigurator_core.sdk`):

  database  sdk/perf_database.py get_database_view(system, backend, version,
            database_mode="SILICON"): AIConfigurator's default mode, collected
            kernel tables only (`cli_estimate`'s default; None means SILICON).
  model     sdk/config_builders.py build_model_config(tp, pp=1, attention dp=1,
            gemm_quant_mode = the row's, other modes None: inferred from the
            checkpoint), apply_nextn(0); sdk/models/helpers.py
            resolve_context_fmha_by_data, resolve_dsv4_moe_arch,
            resolve_nvfp4_for_system; sdk/models get_model(hf_model, ...).
  serving   sdk/backends/factory.py get_backend(backend).run_agg(model, db,
            RuntimeConfig(isl, osl, batch_size=concurrency), ctx_tokens=isl,
            decode_tokens_per_iteration=1.0): `cli_estimate`'s defaults
            (ctx_tokens defaults to isl; no speculative decoding). The
            scheduling formulas are in sdk/backends/base_backend.py run_agg and
            the backends' overrides (trtllm_backend.py, vllm_backend.py,
            sglang_backend.py); the step latencies come from the Rust engine
            (_aiconfigurator_core.abi3.so, via sdk/rust_engine_step.py).

Where AIConfigurator cannot take the row as published, the substitution is
stated in the prediction's `note`:

  version   AIConfigurator 0.12.0 answers only its queryable versions per
            (system, backend) (systems/query_versions.yaml: current and next,
            e.g. trtllm 1.3.0rc20 / 1.3.0rc23 on h100_sxm), none of which the
            CSV's rows were measured on. A row's version that is not queryable
            is replaced by the closest queryable one: the oldest not older than
            it, else the newest. A row without a version gets AIConfigurator's
            default (`get_latest_database_version`: current).
  model     AIConfigurator downloads a checkpoint's config.json from Hugging
            Face unless it ships it (model_configs/); lctx never downloads.
            Checkpoints it does not ship are mapped to the shipped one of the
            same architecture (ALIASES), with the quantization AIConfigurator
            infers from the original's hf_quant_config.json.
  KV cache  a batch over AIConfigurator's KV-cache capacity estimate is
            predicted all the same (as `cli_estimate` does, with a warning).

pandas: aiconfigurator-core declares it but the agg path never uses it; the
project installs the package with --no-deps (.ci/run). Without pandas, the two
sdk modules that import it at top level (sdk/backends/base_backend.py,
sdk/inference_summary.py) are imported against a placeholder that raises on
use, removed from sys.modules right after.

Nothing is cached on disk. In process, the database view of each (system,
backend, version) is kept (building one parses YAML for ~0.1 s); the Rust
engine of each model is kept by AIConfigurator itself (~2-4 s to build).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import sys
import types

PACKAGE = "aiconfigurator_core"
INSTALL = "pip install --no-deps aiconfigurator-core==0.12.0 (or pip install -e '.[validate]')"
MODE = "SILICON"  # AIConfigurator's default database mode
BACKENDS = ("trtllm", "vllm", "sglang")

# Checkpoints of the CSV whose config AIConfigurator 0.12.0 does not ship ->
# (the shipped checkpoint of the same architecture, the original's
# quantization: None for bf16, or AIConfigurator's inference from its
# hf_quant_config.json, sdk/models/helpers.py _infer_quant_modes_from_raw_config).
_MODELOPT_FP8 = {"gemm": "fp8_static", "kvcache": "fp8", "fmha": "fp8"}  # quant_algo FP8, kv FP8
ALIASES = {
    "meta-llama/Llama-3.1-8B-Instruct": ("meta-llama/Meta-Llama-3.1-8B", None),
    "meta-llama/Llama-3.1-70B": ("meta-llama/Meta-Llama-3.1-70B", None),
    "nvidia/Llama-3.1-8B-Instruct-FP8": ("meta-llama/Meta-Llama-3.1-8B", _MODELOPT_FP8),
}


@dataclasses.dataclass(frozen=True)
class AicPrediction:
  """AIConfigurator's prediction of one row."""

  ttft_s: float  # mean time to first token, s
  tpot_s: float  # mean time per output token after the first, s
  mode: str  # AIConfigurator's database mode ('SILICON')
  database_version: str  # the backend version whose perf tables were used
  note: str  # '; '-joined substitutions (module docstring); '' when none


def available() -> bool:
  """Whether aiconfigurator-core is installed (found without importing it)."""
  return importlib.util.find_spec(PACKAGE) is not None


@functools.cache
def _sdk() -> types.SimpleNamespace:
  """AIConfigurator's sdk entry points, imported once (module docstring: pandas)."""
  if not available():
    raise ImportError(f"package {PACKAGE} is not installed: {INSTALL}")
  placeholder = None
  if importlib.util.find_spec("pandas") is None and "pandas" not in sys.modules:
    placeholder = types.ModuleType("pandas", "placeholder: lctx.cost.aic, pandas not installed")

    class DataFrame:  # annotations of sdk/inference_summary.py need the name

      def __new__(cls, *args, **kwargs):
        raise ImportError("this aiconfigurator path needs pandas: pip install pandas")

    placeholder.DataFrame = DataFrame
    sys.modules["pandas"] = placeholder
  try:
    from aiconfigurator_core.sdk import common, perf_database
    from aiconfigurator_core.sdk.backends.factory import get_backend
    from aiconfigurator_core.sdk.config import RuntimeConfig
    from aiconfigurator_core.sdk.config_builders import apply_nextn, build_model_config
    from aiconfigurator_core.sdk.models import (get_model, resolve_context_fmha_by_data,
                                                resolve_dsv4_moe_arch, resolve_nvfp4_for_system)
  finally:
    if placeholder is not None and sys.modules.get("pandas") is placeholder:
      del sys.modules["pandas"]
  import logging
  for name in list(logging.root.manager.loggerDict):  # per-lookup info lines, thousands per run
    if name.startswith("aiconfigurator"):
      logging.getLogger(name).setLevel(logging.ERROR)
  return types.SimpleNamespace(
      common=common, perf_database=perf_database, get_backend=get_backend,
      RuntimeConfig=RuntimeConfig, apply_nextn=apply_nextn, build_model_config=build_model_config,
      get_model=get_model, resolve_context_fmha_by_data=resolve_context_fmha_by_data,
      resolve_dsv4_moe_arch=resolve_dsv4_moe_arch, resolve_nvfp4_for_system=resolve_nvfp4_for_system)


@functools.cache
def _versions(system: str, backend: str) -> tuple[tuple[str, ...], str | None]:
  """(queryable database versions, AIConfigurator's default) of a system and backend."""
  db = _sdk().perf_database
  slots = db.get_version_slots(system, backend) or {}
  listed = db.get_supported_databases().get(system, {}).get(backend, [])
  queryable = tuple(v for v in listed if not slots or v in slots.values())
  return queryable, db.get_latest_database_version(system=system, backend=backend)


def database_version(system: str, backend: str, version: str) -> tuple[str, str]:
  """(the version AIConfigurator predicts `version` with, a note: '' if itself)."""
  queryable, default = _versions(system, backend)
  if not queryable or default is None:
    raise ValueError(f"system/backend: AIConfigurator has no {backend} database for {system}")
  if version in queryable:
    return version, ""
  if not version:
    return default, f"no backend version in the row; AIConfigurator's default {default}"
  from packaging.version import InvalidVersion, Version
  try:
    key = Version(version)
    ordered = sorted(queryable, key=Version)
  except InvalidVersion:
    return default, f"{backend} {version} unparsable; AIConfigurator's default {default}"
  chosen = next((v for v in ordered if Version(v) >= key), ordered[-1])
  return chosen, (f"{backend} {version} has no database on {system}; closest queryable "
                  f"{chosen} of {list(ordered)}")


@functools.cache
def _database(system: str, backend: str, version: str):
  db = _sdk().perf_database.get_database_view(system, backend, version, database_mode=MODE)
  if db is None:
    raise ValueError(f"system/backend: no {backend} {version} database for {system}")
  return db


def _check(row) -> None:
  """ValueError naming the first field of `row` AIConfigurator cannot take."""
  if row.backend not in BACKENDS:
    raise ValueError(f"backend: {row.backend!r} is none of {BACKENDS}")
  for field in ("tp", "concurrency", "isl", "osl"):
    value = getattr(row, field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{field}: {value!r} is not a positive integer")
  if row.quant_mode and row.quant_mode not in _sdk().common.GEMMQuantMode.__members__:
    raise ValueError(f"quant_mode: {row.quant_mode!r} is not an AIConfigurator GEMM quant mode")
  if row.hf_model not in _sdk().common.DefaultHFModels and row.hf_model not in ALIASES:
    raise ValueError(f"hf_model: AIConfigurator 0.12.0 ships no config for {row.hf_model!r} "
                     f"(and lctx does not download it)")


def predict(row) -> AicPrediction:
  """AIConfigurator's aggregated-serving TTFT and TPOT of a published.ServingRow
  (any object with its fields hf_model, system, backend, backend_version, tp,
  concurrency, isl, osl, quant_mode). ImportError with the pip command when
  aiconfigurator-core is not installed; ValueError naming the field for a row
  it cannot predict (a system without database, a model that does not fit)."""
  if not available():
    raise ImportError(f"package {PACKAGE} is not installed: {INSTALL}")
  sdk = _sdk()
  _check(row)
  notes = []
  version, note = database_version(row.system, row.backend, row.backend_version)
  notes.append(note)
  db = _database(row.system, row.backend, version)
  model_path, quant = row.hf_model, None
  if model_path not in sdk.common.DefaultHFModels:
    model_path, quant = ALIASES[row.hf_model]
    notes.append(f"{row.hf_model} not shipped; its architecture from {model_path}" +
                 (f" with quantization {quant}" if quant else ""))
  quant = quant or {}
  config = sdk.build_model_config(
      row.tp, 1, 1, None, None, gemm_quant_mode=row.quant_mode or quant.get("gemm"),
      kvcache_quant_mode=quant.get("kvcache"), fmha_quant_mode=quant.get("fmha"))
  sdk.apply_nextn(config, 0)
  try:
    sdk.resolve_context_fmha_by_data(config, model_path, db, row.backend, is_context_role=True)
  except ValueError:
    if not quant.get("fmha"):
      raise
    # An inferred fp8 FMHA without fp8 context data falls back to bf16 in
    # AIConfigurator; here it was passed explicitly, which raises instead.
    config.fmha_quant_mode = sdk.common.FMHAQuantMode.bfloat16
    notes.append("fp8 context FMHA has no data; bf16")
  sdk.resolve_dsv4_moe_arch(config, model_path, system_name=row.system, backend_name=row.backend)
  sdk.resolve_nvfp4_for_system(config, row.system, model_path, backend_name=row.backend)
  model = sdk.get_model(model_path, config, row.backend)
  runtime = sdk.RuntimeConfig(isl=row.isl, osl=row.osl, batch_size=row.concurrency)
  summary = sdk.get_backend(row.backend).run_agg(model, db, runtime, ctx_tokens=row.isl,
                                                 decode_tokens_per_iteration=1.0)
  if summary.check_oom():  # where `aiconfigurator cli estimate` raises OOM
    raise ValueError(f"tp/concurrency: weights and the KV cache of {row.concurrency} requests "
                     f"of {row.isl + row.osl} tokens exceed {row.system} memory at tp={row.tp} "
                     f"(AIConfigurator's memory model)")
  if summary.check_kv_cache_oom():
    notes.append(f"batch {row.concurrency} exceeds AIConfigurator's KV-cache capacity estimate")
  result = summary.get_result_dict()
  ttft_s, tpot_s = float(result["ttft"]) / 1e3, float(result["tpot"]) / 1e3
  if not (math.isfinite(ttft_s) and math.isfinite(tpot_s) and ttft_s > 0 and tpot_s > 0):
    raise ValueError(f"osl: AIConfigurator predicted TTFT {ttft_s} s, TPOT {tpot_s} s")
  return AicPrediction(ttft_s, tpot_s, MODE, version, "; ".join(n for n in notes if n))
