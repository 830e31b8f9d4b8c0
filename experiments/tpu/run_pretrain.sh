#!/usr/bin/env bash
# Start the same pretraining command on all workers at once (one process per host; every process
# sees its host's chips, jax.distributed finds the others from the TPU metadata).
#   TPU_NAME=internlm2 ZONE=us-east5-a GIN=experiments/configs/pretrain/internlm2_7b.gin \
#     WORKDIR=gs://my-bucket/runs/7b ./experiments/tpu/run_pretrain.sh [extra --gin_param ...]
set -euo pipefail
TPU_NAME=${TPU_NAME:-internlm2}
ZONE=${ZONE:-us-east5-a}
GIN=${GIN:-experiments/configs/pretrain/internlm2_7b.gin}
WORKDIR=${WORKDIR:-runs/$(basename "$GIN" .gin)}   # use a gs:// path on pods: every host writes checkpoints
ARGS="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/internlm2-jax && . .venv/bin/activate
  export LIBTPU_INIT_ARGS=\"\${LIBTPU_INIT_ARGS:-} --xla_tpu_enable_async_collective_fusion=true\"
  nohup python -m experiments.pretrain --gin $GIN --workdir $WORKDIR $ARGS > ~/pretrain.log 2>&1 &
  echo started on \$(hostname)
"
echo "logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/pretrain.log'"
