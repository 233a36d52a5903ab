#!/bin/sh
# The images' entrypoint: one word says which Tuneplex process this container runs.
#
#   web                 uvicorn (WEB_CONCURRENCY workers) on $TUNEPLEX_PORT (8000)
#   beat                Celery beat: exactly one per install
#   worker ARGS...      a Celery worker (ARGS: --queues ..., --concurrency ...); its metrics
#                       exporter listens on TUNEPLEX_WORKER_METRICS_PORT (9540 in the images)
#   engine ARGS...      a serving replica: pool agent on --port, vLLM on the next port, both
#                       on TUNEPLEX_ENGINE_HOST (loopback unless set: the deployments name an
#                       internal address); vLLM's environment is allow-listed
#   migrate             apply migrations, then register TUNEPLEX_BASE_MODEL_DIRS (if set)
#   healthcheck         exit 0 when this container's process answers
#   anything else       run as given (e.g. manage.py create_organization ...)
set -eu
PY=/opt/venv/bin/python
BIN=/opt/venv/bin
: "${TUNEPLEX_WORKER_METRICS_PORT:=9540}"
: "${TUNEPLEX_WORKER_METRICS_HOST:=0.0.0.0}"
export TUNEPLEX_WORKER_METRICS_PORT TUNEPLEX_WORKER_METRICS_HOST

fresh_metrics_dir() {
  # prometheus_client's multi-process folder must start empty for each run of a process group.
  if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
  fi
}

command=${1:-web}
[ $# -gt 0 ] && shift
case "$command" in
  web)
    fresh_metrics_dir
    exec "$BIN/uvicorn" tuneplex.asgi:application --host 0.0.0.0 --port "${TUNEPLEX_PORT:-8000}" \
      --workers "${WEB_CONCURRENCY:-2}" --no-access-log --proxy-headers \
      --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" "$@" ;;
  beat)
    exec "$BIN/celery" -A jobs.celery beat --loglevel INFO \
      --schedule "${TUNEPLEX_DATA_DIR:-/tmp}/celerybeat-schedule" "$@" ;;
  worker)
    exec "$BIN/celery" -A jobs.celery worker --loglevel INFO --without-gossip --without-mingle \
      --hostname "${HOSTNAME:-worker}@%h" "$@" ;;
  engine)
    # The engine must not inherit the platform's metrics folder (vLLM has its own).
    unset PROMETHEUS_MULTIPROC_DIR
    exec "$PY" manage.py run_engine --advertise "${TUNEPLEX_ADVERTISE_HOST:-$(hostname -f)}" "$@" ;;
  migrate)
    "$PY" manage.py migrate --noinput
    for dir in $(echo "${TUNEPLEX_BASE_MODEL_DIRS:-}" | tr ',' ' '); do
      "$PY" manage.py register_base_model "$dir"
    done ;;
  healthcheck)
    if [ -n "${TUNEPLEX_HEALTH_URL:-}" ]; then
      exec curl -fsS --max-time 4 -o /dev/null "$TUNEPLEX_HEALTH_URL"
    fi
    exec curl -fsS --max-time 4 -o /dev/null "http://127.0.0.1:${TUNEPLEX_PORT:-8000}/healthz" ;;
  *)
    exec "$command" "$@" ;;
esac
