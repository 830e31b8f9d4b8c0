#!/usr/bin/env bash
# Create a Cloud TPU VM (single host v5p-8 by default; a pod slice such as v5p-32 has several workers).
#   TPU_NAME=internlm2 ZONE=us-east5-a ACCEL=v5p-8 ./experiments/tpu/create_tpu.sh
set -euo pipefail
TPU_NAME=${TPU_NAME:-internlm2}
ZONE=${ZONE:-us-east5-a}
ACCEL=${ACCEL:-v5p-8}
VERSION=${VERSION:-v2-alpha-tpuv5}          # TPU VM base image (v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
PROJECT=${PROJECT:-$(gcloud config get-value project)}
EXTRA=${EXTRA:-}                            # e.g. "--spot" or "--reserved"
gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
  --accelerator-type="$ACCEL" --version="$VERSION" $EXTRA
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state,networkEndpoints)'
