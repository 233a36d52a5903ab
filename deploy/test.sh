#!/usr/bin/env bash
# README command 2: set up and run the whole test suite.
#
# The suite runs against real PostgreSQL and Redis (DATABASE_URL / REDIS_URL, defaulting to the
# servers on 127.0.0.1, started here if they are down); the end-to-end smoke test also runs the
# embedded default (SQLite, filesystem broker, local files) the way deploy/up.sh does.
# Extra arguments go to pytest, e.g. deploy/test.sh -k apikeys
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
mkdir -p test-artifacts
if [ $# -eq 0 ]; then
  # Undefined names, unused imports and syntax errors fail the run before anything else.
  .venv/bin/ruff check --quiet --select F,E9 platform jobs serving frontend benchmarks tests
  # The trainer's own tests run in its environment (torch, no Django), then the platform's.
  .venv-train/bin/python -m pytest tests/training --confcutdir=tests/training -p no:cacheprovider -q \
    --durations=10
fi
# The slowest tests are listed at the end, to keep the suite within its time (30 minutes on 2 cores).
exec .venv/bin/python -m pytest --durations=20 "$@"
