#!/usr/bin/env bash
# Train on GPU hosts with SLURM: one process per GPU (JAX's SLURM convention), the same command
# in every process. jax.distributed.initialize() reads the coordinator, the process count and id
# and the process's GPU (SLURM_LOCALID) from SLURM's environment; vldm calls it when
# SLURM_NTASKS > 1.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh \
#       --config configs/shapes.py:stage=video --workdir /shared/runs/video
#
# The workdir must be on a file system every node sees. Resubmitting the job resumes from its
# newest checkpoint; SIGTERM (preemption, scancel, time limit) saves one first: `--signal` below
# asks SLURM for SIGTERM 120 s before the time limit.
# One machine with several GPUs needs none of this: `python -m vldm.train ...` uses them all.
#SBATCH --job-name=vldm-train
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --output=vldm-train-%j.out
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
repo=${VLDM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$repo"
# An environment prepared once with: python -m venv .venv && . .venv/bin/activate &&
#   pip install -e . 'jax[cuda12]'
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# `exec` so that SLURM's SIGTERM reaches python (and its preemption handling) directly.
exec srun --kill-on-bad-exit=1 python -m vldm.train "$@"
