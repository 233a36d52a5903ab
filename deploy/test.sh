#!/usr/bin/env bash
# README command 2: set up and run the whole test suite.
#
# The suite runs against real PostgreSQL and Redis (DATABASE_URL / REDIS_URL, defaulting to the
# servers on 127.0.0.1, started here if they are down); the end-to-end smoke test also runs the
# embedded default (SQLite, filesystem broker, local files) the way deploy/up.sh does.
#
# Two suites: the trainer's (tests/training, in .venv-train: torch, no Django) and the platform's
# (everything else under tests/, in .venv). Arguments go to pytest and choose the suites
# explicitly, never silently:
#   deploy/test.sh                               the lint, then both suites, whole
#   deploy/test.sh tests/files tests/serving/x.py   paths: each suite runs the paths under it; a
#                                                   suite no path names is left out (and said so)
#   deploy/test.sh -k apikeys                     options alone: both suites, with the options
#                                                   (a suite in which they select nothing passes,
#                                                   but not both)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh --with-tests
bash deploy/services.sh

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/tuneplex}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/9}
export TUNEPLEX_DATA_DIR=${TUNEPLEX_DATA_DIR:-$(pwd)/var/test}
# The test process itself attaches to no engine: the serving tests start a vLLM replica and a
# gateway (uvicorn) of their own, and the end-to-end test runs deploy/up.sh, which starts one.
export TUNEPLEX_ENGINE_MODE=off
# One GPU slot, fixed: most scheduler tests dispatch with no GPU worker running. The membership
# tests (tests/finetuning/test_gpu_workers.py) unset it for themselves and the workers they start.
export TUNEPLEX_GPU_SLOTS=${TUNEPLEX_GPU_SLOTS:-1}
mkdir -p test-artifacts

training=() platform=() options=()
for arg in "$@"; do
  case "$arg" in
    tests | tests/) training+=(tests/training); platform+=(tests) ;;
    tests/training | tests/training/*) training+=("$arg") ;;
    tests/*) platform+=("$arg") ;;
    *) options+=("$arg") ;;
  esac
done
if [ $# -eq 0 ]; then
  # Undefined names, unused imports and syntax errors fail the run before anything else.
  .venv/bin/ruff check --quiet --select F,E9 platform jobs serving frontend benchmarks tests
fi
if [ ${#training[@]} -eq 0 ] && [ ${#platform[@]} -eq 0 ]; then
  training=(tests/training) platform=(tests)  # no path given: both suites
fi

# pytest's exit status 5: nothing collected (options that select nothing in this suite).
empty=0
run_suite() {  # name, then the pytest command
  local name=$1 status=0
  shift
  "$@" || status=$?
  if [ "$status" -eq 5 ] && [ ${#options[@]} -gt 0 ]; then
    echo "[test] $name: the options select no test in it"
    empty=$((empty + 1))
  elif [ "$status" -ne 0 ]; then
    exit "$status"
  fi
}
# The trainer's tests run in its environment (torch, no Django), then the platform's.
if [ ${#training[@]} -gt 0 ]; then
  run_suite tests/training .venv-train/bin/python -m pytest --confcutdir=tests/training \
    -p no:cacheprovider -q --durations=10 ${options[@]+"${options[@]}"} "${training[@]}"
else
  echo "[test] tests/training: not run (no path under it among the arguments)"
fi
if [ ${#platform[@]} -gt 0 ]; then
  # The slowest tests are listed at the end, to keep the suite within its time (30 minutes on 2 cores).
  run_suite "the platform's tests" .venv/bin/python -m pytest --durations=20 \
    ${options[@]+"${options[@]}"} "${platform[@]}"
else
  echo "[test] the platform's tests: not run (no path outside tests/training among the arguments)"
fi
if [ "$empty" -gt 0 ] && [ "$empty" -eq $(( (${#training[@]} > 0) + (${#platform[@]} > 0) )) ]; then
  echo "[test] the options select no test in any suite"
  exit 5
fi
