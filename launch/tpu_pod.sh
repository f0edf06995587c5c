#!/usr/bin/env bash
# Train on a Cloud TPU VM (a single host or a pod slice): create the TPU VM if it does not exist,
# copy this working tree to every worker, install it, and start the same command on all workers.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE [TRAIN ARGS...]
#   launch/tpu_pod.sh vldm-v5e us-west4-a v5litepod-16 \
#       --config configs/shapes.py:stage=image --workdir gs://BUCKET/runs/shapes_image
#
# The workdir must be visible to every worker (a gs:// bucket). Rerunning the script on the same
# TPU VM after a preemption resumes from the workdir's newest checkpoint.
# Environment: PROJECT (gcloud project; default: the configured one), RUNTIME (TPU software
# version; default v2-alpha-tpuv5-lite), SPOT=1 (spot VM), LOG (log file on each worker).
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
name=$1 zone=$2 type=$3
shift 3
runtime=${RUNTIME:-v2-alpha-tpuv5-lite}
log=${LOG:-vldm_train.log}
repo=$(cd "$(dirname "$0")/.." && pwd)
tpu_vm() {  # gcloud compute tpus tpu-vm COMMAND ARGS... in this zone (and project)
  local command=$1
  shift
  gcloud compute tpus tpu-vm "$command" "$@" --zone "$zone" ${PROJECT:+--project "$PROJECT"}
}

if ! tpu_vm describe "$name" >/dev/null 2>&1; then
  echo "Creating TPU VM $name ($type, $runtime) in $zone"
  tpu_vm create "$name" --accelerator-type "$type" --version "$runtime" \
      ${SPOT:+--spot}
fi

# The working tree as it is (uncommitted edits included), without run outputs.
archive=$(mktemp -t vldm.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
tar --exclude=.git --exclude=runs --exclude=.venv --exclude='__pycache__' \
    -czf "$archive" -C "$repo" .
tpu_vm scp "$archive" "$name":vldm.tar.gz --worker=all

printf -v train_args '%q ' "$@"
tpu_vm ssh "$name" --worker=all --command "
  set -e
  # Stop a previous attempt on this VM, if any.
  if [ -f ~/vldm_train.pid ]; then kill \$(cat ~/vldm_train.pid) 2>/dev/null || true; fi
  rm -rf ~/vldm && mkdir -p ~/vldm && tar -xzf ~/vldm.tar.gz -C ~/vldm && cd ~/vldm
  [ -d ~/venv ] || python3 -m venv ~/venv
  . ~/venv/bin/activate
  pip install -q -U pip && pip install -q -e . 'jax[tpu]'
  # Every worker runs the same program; jax.distributed finds the others on the TPU network.
  VLDM_DISTRIBUTED=1 nohup python -m vldm.train $train_args > ~/$log 2>&1 < /dev/null &
  echo \$! > ~/vldm_train.pid
  echo \"worker \$(hostname): started, log ~/$log\"
"
echo "Follow worker 0: gcloud compute tpus tpu-vm ssh $name --zone $zone --worker=0" \
     "--command 'tail -f ~/$log'"
