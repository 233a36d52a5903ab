#!/usr/bin/env bash
# README command 1: set up and start Tuneplex on its embedded default (SQLite, a serverless
# Celery broker and local files under var/), then print where to go and the demo credentials.
# Ctrl-C (or SIGTERM) stops every process it started.
#
# Environment: TUNEPLEX_HOST (127.0.0.1), TUNEPLEX_PORT (8000), plus every setting in the
# README's configuration table (DATABASE_URL, REDIS_URL, TUNEPLEX_DATA_DIR, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${TUNEPLEX_HOST:-127.0.0.1}
PORT=${TUNEPLEX_PORT:-8000}
log() { printf '\033[1m[tuneplex]\033[0m %s\n' "$*"; }

bash deploy/setup.sh
PY=.venv/bin/python
read -r DATA_DIR ENGINE_MODE ENGINE_PORT BASE_MODEL < <($PY -c 'import django,os; os.environ.setdefault("DJANGO_SETTINGS_MODULE","tuneplex.settings"); django.setup(); from django.conf import settings as s; print(s.DATA_DIR, s.ENGINE_MODE, s.ENGINE_PORT, s.DEFAULT_BASE_MODEL)')
LOGS="$DATA_DIR/logs"
mkdir -p "$LOGS"

log "migrating the database"
$PY manage.py migrate --noinput >"$LOGS/migrate.log"
log "preparing the embedded base model"
$PY manage.py prepare_default_model
CREDENTIALS=$($PY manage.py bootstrap_demo)

pids=()
descendants() { local child; for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done; }
cleanup() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    # Every process we started, with their children (worker pools, beat), must be gone on exit.
    local all=("${pids[@]}")
    for p in "${pids[@]}"; do all+=($(descendants "$p")); done
    log "stopping (${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 75); do
      alive=0; for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break; sleep 0.2
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The default worker also runs beat: the reaper of jobs whose worker stopped heartbeating.
.venv/bin/celery -A jobs.celery worker --queues default,statistics --concurrency 1 --hostname "default@%h" \
  --beat --loglevel INFO >"$LOGS/worker-default.log" 2>&1 &
pids+=($!)
.venv/bin/celery -A jobs.celery worker --queues gpu --concurrency 1 --prefetch-multiplier 1 \
  --hostname "gpu@%h" --loglevel INFO >"$LOGS/worker-gpu.log" 2>&1 &
pids+=($!)
if [ "$ENGINE_MODE" = spawn ]; then
  # One vLLM replica of the default base model, on loopback (tenants reach it through /v1 only).
  $PY manage.py run_engine --port "$ENGINE_PORT" >"$LOGS/run-engine.log" 2>&1 &
  pids+=($!)
  ENGINE_PID=$!
fi
.venv/bin/uvicorn tuneplex.asgi:application --host "$HOST" --port "$PORT" --no-access-log \
  >"$LOGS/web.log" 2>&1 &
pids+=($!)

URL="http://$HOST:$PORT"
for _ in $(seq 150); do
  curl -fsS "$URL/healthz" >/dev/null 2>&1 && break
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { log "a process exited; see $LOGS"; exit 1; }; done
  sleep 0.2
done
curl -fsS "$URL/healthz" >/dev/null || { log "web server did not start; see $LOGS/web.log"; exit 1; }
$PY manage.py check_worker --timeout 90 >/dev/null || { log "worker did not start; see $LOGS"; exit 1; }
if [ "$ENGINE_MODE" = spawn ]; then
  log "starting the inference engine (vLLM; about a minute the first time)"
  for i in $(seq 1500); do
    grep -q "ready at" "$LOGS/run-engine.log" 2>/dev/null && break
    kill -0 "$ENGINE_PID" 2>/dev/null || { log "the engine did not start; see $LOGS/run-engine.log and $LOGS/engine-$ENGINE_PORT.log"; exit 1; }
    [ $((i % 50)) = 0 ] && log "still starting the engine ($((i / 5)) s)"
    sleep 0.2
  done
  grep -q "ready at" "$LOGS/run-engine.log" || { log "the engine did not start in time; see $LOGS"; exit 1; }
  INFERENCE="Inference: $URL/v1/chat/completions (model: $BASE_MODEL or your adapters)"
else
  INFERENCE="Inference: off (TUNEPLEX_ENGINE_MODE=$ENGINE_MODE)"
fi

cat <<MSG

  Tuneplex is ready at $URL/
  API: $URL/v1 (reference: $URL/v1/docs)   logs: $LOGS
  $INFERENCE

$(printf '%s\n' "$CREDENTIALS" | sed 's/^/  /')

  Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
log "a process exited unexpectedly; see $LOGS"
exit 1
