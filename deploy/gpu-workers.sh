#!/usr/bin/env bash
# Starts Celery workers for the "gpu" queue on this node. By default one per GPU, each pinned to
# its GPU with CUDA_VISIBLE_DEVICES and taking one task at a time (concurrency 1, prefetch 1).
# With GPUS_PER_WORKER=N, one worker per group of N GPUs, taking up to N tasks at once: each job
# leases the GPUs it asks for (its `gpus` hyperparameter, up to TUNEPLEX_JOB_MAX_GPUS = N) and
# trains data-parallel on them under torchrun. Point it at the shared PostgreSQL, Redis and
# artifact storage with the usual settings (see README), e.g.
#
#   DATABASE_URL=postgres://… REDIS_URL=redis://… TUNEPLEX_TRAINING_DEVICE=cuda \
#   TUNEPLEX_TRAINING_MEMORY=80GiB deploy/gpu-workers.sh
#
# GPUS overrides the list (default: every GPU nvidia-smi lists). Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
read -r -a gpus <<< "${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')}"
per_worker=${GPUS_PER_WORKER:-1}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for ((start = 0; start < ${#gpus[@]}; start += per_worker)); do
  group=("${gpus[@]:start:per_worker}")
  devices=$(IFS=,; echo "${group[*]}")
  CUDA_VISIBLE_DEVICES=$devices TUNEPLEX_JOB_MAX_GPUS=${#group[@]} \
    .venv/bin/celery -A jobs.celery worker --queues gpu --concurrency "${#group[@]}" \
    --prefetch-multiplier 1 --hostname "gpu${devices//,/-}@%h" --loglevel INFO &
  pids+=($!)
done
wait -n "${pids[@]}"
