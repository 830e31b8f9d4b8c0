#!/usr/bin/env bash
# Stop paying: delete the TPU VM.   TPU_NAME=internlm2 ZONE=us-east5-a ./experiments/tpu/delete_tpu.sh
set -euo pipefail
gcloud compute tpus tpu-vm delete "${TPU_NAME:-internlm2}" --zone="${ZONE:-us-east5-a}" --quiet
