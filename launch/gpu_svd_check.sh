#!/usr/bin/env bash
# One SVD-size image-to-video training step on one GPU (vldm.benchmark.svd_stage's default rows),
# from the repo root, with the machine's own python (no venv, no pip: jax, flax, optax, absl,
# numpy are there). Rows run while the 420 s budget allows; the JSON is rewritten after each
# row, so `timeout` (a hard stop before an 8-minute limit) keeps the rows that finished.
#
#   OUT=/some/dir bash launch/gpu_svd_check.sh [extra svd_stage flags, e.g. --configs 1:full:xla]
set -uo pipefail

out_dir=${OUT:-.}
json="$out_dir/svd_stage.json"
python=${PYTHON:-$(command -v python || command -v python3)}
cd "$(dirname "$0")/.."
mkdir -p "$out_dir"
# As `python -m vldm.benchmark.svd_stage` sets by default: one program may use 92 % of the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout -k 10 450 "$python" -m vldm.benchmark.svd_stage --out "$json" --time_budget_s 420 "$@"
status=$?
echo "svd_stage exit status: $status"
if [[ -f "$json" ]]; then cat "$json"; else echo "no $json written"; fi
exit $status
