#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README, "Accelerator runs"):
#   bash experiments/bench/gpu_session.sh   (from the repository root)
#   1. device_check: every strategy gives the same round on the GPU, the GPU
#      agrees with the CPU, and the W1/W2/W3 benchmark -> $OUT/bench_gpu.*
#   2. Shakespeare FedAvg learning curve for as many rounds as fit.
# Packages the GPU image lacks travel as wheels in .whl/ (pure-Python ones).
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
timeout "${CHECK_SECONDS:-240}" python3 -m experiments.bench.device_check \
  --out_dir="$OUT" > "$OUT/device_check.log" 2>&1
echo "device_check exit: $?"; tail -n 40 "$OUT/device_check.log"
timeout "${CURVE_TIMEOUT:-240}" python3 -m experiments.run \
  --config=configs/shakespeare_fedavg.py --workdir="$OUT/shakespeare_fedavg_gpu" \
  --config.max_seconds="${CURVE_SECONDS:-180}" --config.eval_every=25 \
  --noprogress > "$OUT/shakespeare_fedavg_gpu.log" 2>&1
echo "shakespeare exit: $?"; tail -n 3 "$OUT/shakespeare_fedavg_gpu.log"
