#!/usr/bin/env bash
# README command 1: set up and start Tuneplex on its embedded default (SQLite, a serverless
# Celery broker and local files under var/), then print where to go and the demo credentials.
# Every process runs under deploy/supervise.py (restarted when it dies); Ctrl-C (or SIGTERM)
# stops them all.
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

# Every long-running process runs under deploy/supervise.py, which starts again (with back-off)
# whichever one dies while the others keep serving; see docs/operations.md.
PROGRAMS=(
  "web=.venv/bin/uvicorn tuneplex.asgi:application --host $HOST --port $PORT --no-access-log"
  # Beat on its own: the reaper and the sweeps, exactly one per install.
  "beat=.venv/bin/celery -A jobs.celery beat --loglevel INFO --schedule $DATA_DIR/celerybeat-schedule"
  "worker-default=.venv/bin/celery -A jobs.celery worker --queues default --concurrency 1 --hostname default@%h --loglevel INFO"
  # Dataset statistics (minutes for a large file) kept out of the scheduler's way.
  "worker-statistics=.venv/bin/celery -A jobs.celery worker --queues statistics --concurrency 1 --hostname statistics@%h --loglevel INFO"
  # Eval runs: minutes of waiting on the serving pool each, kept off the scheduler's queue.
  "worker-evals=.venv/bin/celery -A jobs.celery worker --queues evals --concurrency 1 --hostname evals@%h --loglevel INFO"
  "worker-gpu=.venv/bin/celery -A jobs.celery worker --queues gpu --concurrency 1 --prefetch-multiplier 1 --hostname gpu@%h --loglevel INFO"
  # Exports (GGUF, ONNX, safetensors): CPU conversions in the trainer's environment, minutes each.
  "worker-exports=.venv/bin/celery -A jobs.celery worker --queues exports --concurrency 1 --prefetch-multiplier 1 --hostname exports@%h --loglevel INFO"
)
if [ "$ENGINE_MODE" = spawn ]; then
  # One replica of the default base model on loopback: its pool agent on $ENGINE_PORT, vLLM on
  # the next port (tenants reach it through /v1 only; both require the engine API key).
  PROGRAMS+=("engine=$PY manage.py run_engine --port $ENGINE_PORT")
fi
SUPERVISOR_PID=
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$SUPERVISOR_PID" ] && kill -0 "$SUPERVISOR_PID" 2>/dev/null; then
    log "stopping"
    kill -TERM "$SUPERVISOR_PID" 2>/dev/null || true
    wait "$SUPERVISOR_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

$PY deploy/supervise.py --logs "$LOGS" --state "$DATA_DIR/supervise.json" "${PROGRAMS[@]}" \
  >>"$LOGS/supervise.log" 2>&1 &
SUPERVISOR_PID=$!
alive() { kill -0 "$SUPERVISOR_PID" 2>/dev/null || { log "the supervisor exited; see $LOGS/supervise.log"; exit 1; }; }

URL="http://$HOST:$PORT"
for _ in $(seq 150); do
  curl -fsS "$URL/healthz" >/dev/null 2>&1 && break
  alive; sleep 0.2
done
curl -fsS "$URL/healthz" >/dev/null || { log "web server did not start; see $LOGS/web.log"; exit 1; }
$PY manage.py check_worker --timeout 90 >/dev/null || { log "worker did not start; see $LOGS"; exit 1; }
if [ "$ENGINE_MODE" = spawn ]; then
  log "starting the inference engine (vLLM; about a minute the first time)"
  for i in $(seq 1500); do
    grep -q "ready at" "$LOGS/engine.log" 2>/dev/null && break
    alive
    [ $((i % 50)) = 0 ] && log "still starting the engine ($((i / 5)) s)"
    sleep 0.2
  done
  grep -q "ready at" "$LOGS/engine.log" || { log "the engine did not start in time; see $LOGS/engine.log and $LOGS/engine-$((ENGINE_PORT + 1)).log"; exit 1; }
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
# The supervisor starts again whatever dies; it ends only when stopped.
wait "$SUPERVISOR_PID"
