#!/usr/bin/env bash
# Copy this repository to every worker of the TPU VM and install it with jax[tpu].
#   TPU_NAME=internlm2 ZONE=us-east5-a ./experiments/tpu/setup_tpu.sh
set -euo pipefail
TPU_NAME=${TPU_NAME:-internlm2}
ZONE=${ZONE:-us-east5-a}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
tar --exclude=.git --exclude=.venv --exclude=runs -czf /tmp/internlm2_jax.tgz -C "$REPO" .
gcloud compute tpus tpu-vm scp /tmp/internlm2_jax.tgz "$TPU_NAME":~/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command='
  set -e
  mkdir -p ~/internlm2-jax && tar -xzf ~/internlm2_jax.tgz -C ~/internlm2-jax
  cd ~/internlm2-jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -U pip
  pip install "jax[tpu]" -e .
  python -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())"
'
