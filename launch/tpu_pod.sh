#!/usr/bin/env bash
# Runs cm3jax.train on every worker of a Cloud TPU pod slice (one process per host).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config=experiments/cm3leon_350m.py --workdir=gs://BUCKET/cm3leon_350m
#
# The same command on every host: JAX detects the slice (jax.distributed.initialize()
# with no arguments), each host feeds its own slice of the batch, and the workdir must be
# a location all hosts share (a GCS bucket). Re-running the command resumes the run.
# Set SETUP=1 once to install cm3jax on every worker from the repository checkout it copies.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-cm3jax}

if [[ "${SETUP:-0}" == "1" ]]; then
  gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" $PROJECT_FLAG \
    "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME:~/$REPO_DIR"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
    cd ~/$REPO_DIR && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q -e ."
fi

args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  cd ~/$REPO_DIR && python -m cm3jax.train $args"
