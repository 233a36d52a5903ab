#!/usr/bin/env bash
# Starts one Celery worker per GPU on this node for the "gpu" queue, each pinned to its GPU with
# CUDA_VISIBLE_DEVICES, taking one task at a time (concurrency 1, prefetch 1). Point it at the
# shared PostgreSQL, Redis and artifact storage with the usual settings (see README), e.g.
#
#   DATABASE_URL=postgres://… REDIS_URL=redis://… TUNEPLEX_TRAINING_DEVICE=cuda \
#   TUNEPLEX_TRAINING_MEMORY=80GiB deploy/gpu-workers.sh
#
# GPUS overrides the list (default: every GPU nvidia-smi lists). Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for gpu in $GPUS; do
  CUDA_VISIBLE_DEVICES=$gpu .venv/bin/celery -A jobs.celery worker --queues gpu --concurrency 1 \
    --prefetch-multiplier 1 --hostname "gpu$gpu@%h" --loglevel INFO &
  pids+=($!)
done
wait -n "${pids[@]}"
