#!/usr/bin/env bash
# The cost model's GPU validation (issue 11), prepared to run in under 8
# minutes of one GPU's time, writing its JSON and plots under OUT:
#
#   bash experiments/gpu_validate.sh [OUT]     (OUT defaults to $OUT, else ./gpu_validation)
#
# 1. experiments.calibrate measures the GPU (bf16 GEMM efficiency, streaming
#    bandwidth, kernel floors, collectives when several GPUs are visible) and
#    prints it beside the hardware file's sourced calibration;
# 2. experiments.validate_cost --machine runs prefill and decode for real
#    (bf16) on tiny, small and llama-3.2-1b and compares them with both modes
#    for the preset of the device kind (lctx.cost.calibrate.preset_for_device_kind).
set -euo pipefail
OUT=${1:-${OUT:-gpu_validation}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python -c "import lctx" 2>/dev/null || pip install -q -e .
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/devices.txt"
export LCTX_CACHE_DIR="$OUT/cache"
timeout 150 python -m experiments.calibrate --refresh --json_out="$OUT/calibration.json" \
  | tee "$OUT/calibration.txt"
timeout 300 python -m experiments.validate_cost --machine --quick \
  --models=tiny,small,llama-3.2-1b --batches=1,8 \
  --json_out="$OUT/machine.json" --plot_out="$OUT/machine.png" | tee "$OUT/machine.txt"
