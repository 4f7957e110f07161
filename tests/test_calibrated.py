"""The calibrated cost mode (lctx.cost.calibrated) and the kernel counts it
multiplies (lctx.cost.kernels): identity calibration = the roofline exactly,
floors add kernels x floor, kernel counts of small programs by hand."""

import jax
import jax.numpy as jnp
import pytest

import lctx
from lctx.cost import hlo, metrics
from lctx.cost.calibrated import ROOFLINE, Calibration, calibrated_seconds
from lctx.cost.hardware import load_hardware
from lctx.cost.kernels import kernel_counts

X = jax.ShapeDtypeStruct((8, 64), jnp.float32)
W = jax.ShapeDtypeStruct((64, 64), jnp.float32)


def optimized(f, *args):
  return hlo.compiled_hlo(jax.jit(f).lower(*args))[1]


def test_kernel_counts_of_small_programs_by_hand():
  # One GEMM, then relu and +1 fused into one loop kernel.
  counts = lambda **k: {"matmul": 0.0, "attention": 0.0, "collective": 0.0, "other": 0.0,
                        "convert": 0.0, **{n: float(v) for n, v in k.items()}}
  assert kernel_counts(optimized(lambda x, w: jax.nn.relu(x @ w) + 1, X, W)) == counts(
      matmul=1, other=1)
  # softmax between two GEMMs: max, exp(x - max), sum-and-reciprocal, scale,
  # then the GEMM and the tanh x 2 epilogue: 2 GEMMs + 5 others (XLA:CPU's
  # reduce-window halves of its row reductions count with their reduce).
  assert kernel_counts(optimized(
      lambda x, w: jnp.tanh(jax.nn.softmax(x @ w, axis=-1) @ w.T) * 2, X, W)) == counts(
          matmul=2, other=5)

  def scan(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

  # Per trip: the GEMM and tanh (the counter's add and the condition's
  # compare are scalar bookkeeping); before the loop, the copy of x into its
  # state (a convert-class kernel: it moves data only).
  assert kernel_counts(optimized(scan, X, W)) == counts(matmul=5, other=5, convert=1)

  # A batched scatter, which XLA:CPU expands into a loop over the batch: the
  # index concatenation and one scatter kernel, plus the copy of the
  # non-donated buffer it updates.
  def scatter(c, i, u):
    return c.at[jnp.arange(4), i].set(u)

  assert kernel_counts(optimized(scatter, jax.ShapeDtypeStruct((4, 32, 16), jnp.float32),
                                 jax.ShapeDtypeStruct((4,), jnp.int32),
                                 jax.ShapeDtypeStruct((4, 16), jnp.float32))) == counts(
                                     other=2, convert=1)

  # Blockwise causal attention (a scan over 10 block pairs on the CPU) is one
  # fused attention kernel, then the GEMM; its output reshape and transposes
  # are data movement.
  from lctx.model import attention
  q = jax.ShapeDtypeStruct((1, 64, 4, 16), jnp.float32)
  k = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)
  got = kernel_counts(optimized(
      lambda q, k, v: attention.causal_attention(q, k, v, 16) @ jnp.ones((16, 16)), q, k, k))
  assert (got["attention"], got["matmul"], got["collective"]) == (1.0, 1.0, 0.0)


def _decode_costs():
  config = lctx.ModelConfig.from_preset("tiny")
  return metrics.program_costs(config, "model:2", 256, 2, "decode")


def test_identity_calibration_is_the_roofline_exactly():
  costs = _decode_costs()
  # The optimized module launches the collectives the partitioned one has.
  assert costs.kernels["collective"] == sum(c for _, _, p, c in costs.collective_ops if p > 1) > 0
  for hw, dtype in (("h100-sxm", "float32"), ("tpu-v5e", "bfloat16"), ("b200", "bfloat16")):
    spec = load_hardware(hw)
    assert calibrated_seconds(costs, spec, dtype, ROOFLINE) == metrics.roofline_seconds(
        costs, spec, dtype)


def test_floors_and_efficiencies_add_their_closed_form():
  costs = _decode_costs()
  spec = load_hardware("h100-sxm")
  roof = metrics.roofline_seconds(costs, spec, "float32")
  floored = calibrated_seconds(costs, spec, "float32",
                               Calibration(matmul_floor_s=1e-5, attention_floor_s=3e-5,
                                           other_floor_s=2e-6))
  assert floored - roof == pytest.approx(1e-5 * costs.kernels["matmul"]
                                         + 3e-5 * costs.kernels["attention"]
                                         + 2e-6 * costs.kernels["other"], rel=1e-9)
  # One attention call per layer (the scanned body's, once per trip).
  assert costs.kernels["attention"] == lctx.ModelConfig.from_preset("tiny").num_layers
  # Halving every efficiency at most doubles the time (latencies stay put).
  half = calibrated_seconds(costs, spec, "float32", Calibration(
      matmul_efficiency=0.5, attention_efficiency=0.5, memory_efficiency=0.5,
      collective_efficiency=0.5))
  latency = sum(c * spec.collective_latency for _, _, p, c in costs.collective_ops if p > 1)
  assert roof < half <= 2 * roof - latency + 1e-15
  with pytest.raises(ValueError, match=r"Calibration.matmul_efficiency=1.5; allowed: a number "
                                       r"in \(0, 1\]"):
    Calibration(matmul_efficiency=1.5)
  with pytest.raises(ValueError, match="other_floor_s=-1"):
    Calibration(other_floor_s=-1)
  with pytest.raises(ValueError, match="kernel floors need the program's kernel counts"):
    calibrated_seconds(hlo.Costs(), spec, "float32", Calibration(other_floor_s=1e-6))


def test_steady_state_serving_formula():
  from lctx.cost.serving import decode_context, steady_state
  # 4 users, 100 output tokens each: 0.04 new prompts per step, each 0.2 s of prefill.
  got = steady_state(prefill_s=0.2, decode_step_s=0.01, concurrency=4, isl=1000, osl=100)
  assert got.prefill_share_s == pytest.approx(4 / 100 * 0.2)
  assert got.tpot_s == pytest.approx(0.01 + 0.008) and got.ttft_s == pytest.approx(0.21)
  # Arriving together, the 4 prompts wait 1, 2, 3, 4 prefills: 2.5 on average.
  assert got.ttft_burst_s == pytest.approx(2.5 * 0.2 + 0.01)
  assert decode_context(1024, 8192) == 1024 + 4096
  with pytest.raises(ValueError, match=r"osl=0; allowed: a number > 0"):
    steady_state(0.2, 0.01, 4, 1000, 0)


def test_validate_cost_machine_quick_smoke(tmp_path):
  """experiments.validate_cost --machine --quick on tiny: every grid point
  measured and predicted in both modes, the ratios consistent with the
  seconds, the calibration's constants in range."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  out = tmp_path / "m.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.validate_cost", "--machine", "--quick", "--models=tiny",
       "--batches=1", f"--json_out={out}", f"--plot_out={tmp_path / 'm.png'}"], cwd=Path(__file__).resolve().parent.parent,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [(r["phase"], r["context"], r["batch"]) for r in result["rows"]] == [
      ("prefill", 1024, 1), ("decode", 1024, 1), ("prefill", 4096, 1), ("decode", 4096, 1)]
  for r in result["rows"]:
    assert r["measured_s"] > 0 and r["predicted_roofline_s"] > 0
    # Efficiencies <= 1 and floors >= 0: calibrated is never below the roofline.
    assert r["predicted_calibrated_s"] >= r["predicted_roofline_s"]
    assert r["ratio_calibrated"] == pytest.approx(r["predicted_calibrated_s"] / r["measured_s"])
  assert (tmp_path / "m.png").stat().st_size > 0
  assert set(result["summary"]) == {"prefill_roofline", "prefill_calibrated",
                                    "decode_roofline", "decode_calibrated"}


def test_measured_calibration_is_in_range():
  from lctx.cost.calibrate import measure
  from lctx.cost.hardware import load_hardware
  cal = measure(load_hardware("cpu-local"), repeats=3, stream_bytes=16 << 20, extra=50)
  assert 0 < cal.matmul_efficiency <= 1 and 0 < cal.memory_efficiency <= 1
  assert 0 < cal.matmul_floor_s < 1e-3 and 0 < cal.other_floor_s < 1e-3
  assert "measured by lctx.cost.calibrate" in cal.source
  with pytest.raises(ValueError, match="measure: repeats=0; allowed: a positive integer"):
    measure(load_hardware("h100-sxm"), repeats=0)


def test_hardware_files_carry_a_sourced_calibration():
  from lctx.cost.calibrated import for_hardware
  from lctx.cost.hardware import CALIBRATION_FIELDS, HardwareSpec
  for name in ("h100-sxm", "h200", "b200", "a100-80g-sxm"):
    spec = load_hardware(name)
    cal = spec.calibration
    assert cal is not None and for_hardware(spec) is cal
    # Every value the block sets has its citation.
    for field in spec.to_dict()["calibration"]:
      assert field in CALIBRATION_FIELDS and spec.sources_dict[f"calibration.{field}"]
    assert HardwareSpec.from_dict(spec.to_dict()) == spec
  # No block: calibrated = roofline, and the source says so.
  assert "no sourced calibration" in for_hardware(load_hardware("tpu-v5e")).source
  d = load_hardware("h200").to_dict()
  d["calibration"]["matmul_efficency"] = 0.5
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['matmul_efficency'\]"):
    HardwareSpec.from_dict(d)
  d = load_hardware("h200").to_dict()
  d["calibration"]["memory_efficiency"] = 1.2
  with pytest.raises(ValueError, match=r"memory_efficiency=1.2; allowed: a number in \(0, 1\]"):
    HardwareSpec.from_dict(d)


def test_fp8_weights_are_read_in_fp8():
  """A decode step with fp8 linear weights reads those weights at 1 byte each:
  its bytes drop by exactly the linear layers' parameter count (the
  closed form's difference), whatever the CPU lowering's converts."""
  from lctx.cost import analytic
  config = lctx.ModelConfig.from_preset("tiny", param_dtype="bfloat16", dtype="bfloat16")
  for mesh in ("model:1", "model:2"):
    bf16 = metrics.program_costs(config, mesh, 64, 2, "decode")
    fp8 = metrics.program_costs(config, mesh, 64, 2, "decode", weight_dtype="float8")
    linear = sum(v.size for k, v in lctx.init_params(config, 0)["layers"].items()
                 if k.startswith("w_"))
    g = int(mesh.split(":")[1])
    assert bf16.bytes_ideal - fp8.bytes_ideal == pytest.approx(linear / g, rel=0.02)
    assert fp8.flops == bf16.flops
  assert analytic.itemsize("float8") == 1
  with pytest.raises(ValueError, match=r"weight_dtype='int4'; allowed: None or one of"):
    metrics.program_costs(config, "model:1", 64, 2, "decode", weight_dtype="int4")


def test_decode_costs_interpolate_exactly_in_the_cache_length():
  config = lctx.ModelConfig.from_preset("tiny")
  lo, mid, hi = (metrics.program_costs(config, "model:2", T, 2, "decode") for T in (64, 128, 256))
  got = metrics.interpolate_costs(lo, hi, 64, 256, 128)
  assert got is not None and got.kernels == mid.kernels
  spec = load_hardware("h100-sxm")
  for cal in (ROOFLINE, spec.calibration):
    assert calibrated_seconds(got, spec, "float32", cal) == pytest.approx(
        calibrated_seconds(mid, spec, "float32", cal), rel=1e-9)
  assert got.bytes_ideal == pytest.approx(mid.bytes_ideal, rel=1e-12)


def test_compiled_kernels_charge_what_xla_launches():
  """A measured calibration (lctx's own program on this machine) charges the
  kernels as XLA launches them, the blockwise attention's trip by trip, and
  the bytes of its copy/convert kernels; a serving engine's sourced one, one
  fused kernel per attention call and no copies."""
  config = lctx.ModelConfig.from_preset("tiny")
  costs = metrics.program_costs(config, "model:1", 512, 1, "prefill")
  fused, launched = costs.kernels, costs.kernels_compiled
  assert fused["attention"] == config.num_layers and launched["attention"] == 0
  assert launched["matmul"] > fused["matmul"] and costs.copy_bytes > 0
  spec = load_hardware("h100-sxm")
  roof = metrics.roofline_seconds(costs, spec, "float32")
  cal = Calibration(matmul_floor_s=1e-6, other_floor_s=2e-6, program_floor_s=5e-5,
                    compiled_kernels=True)
  assert calibrated_seconds(costs, spec, "float32", cal) == pytest.approx(
      roof + costs.copy_bytes / spec.hbm_bandwidth + 1e-6 * launched["matmul"]
      + 2e-6 * launched["other"] + 5e-5, rel=1e-9)
  with pytest.raises(ValueError, match="compiled_kernels=1; allowed: True, False"):
    Calibration(compiled_kernels=1)
