# syntax=docker/dockerfile:1.7
# The GPU worker image: a Celery worker on the gpu queue (one per GPU) with the trainer
# environment (torch CUDA build, transformers, peft, bitsandbytes, Liger kernels). Also the
# image of the statistics workers (the trainer environment's tokenizer; no GPU needed).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

FROM ${CUDA_DEVEL_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv && python3.12 -m venv /opt/venv-train
WORKDIR /app
COPY pyproject.toml README.md ./
RUN mkdir -p platform/tuneplex jobs serving frontend \
    && touch platform/tuneplex/__init__.py jobs/__init__.py serving/__init__.py frontend/__init__.py \
    && /opt/venv/bin/pip install -e ".[s3]"
# The trainer: torch's CUDA build (the default PyPI wheel), then the train and gpu groups.
# llama-cpp-python (the GGUF exports' llama.cpp) compiles from its sdist, for a portable CPU as
# deploy/setup.sh builds it.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN /opt/venv-train/bin/pip install "pip>=25.1" \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
       /opt/venv-train/bin/pip install --group train --group gpu
COPY manage.py ./
COPY platform ./platform
COPY jobs ./jobs
# llama.cpp's converters, from the sdist of the same llama-cpp-python (jobs/export/llamacpp.py).
RUN /opt/venv-train/bin/python -m jobs.export.llamacpp install-scripts
COPY serving ./serving
COPY frontend ./frontend
COPY deploy/docker/entrypoint.sh /usr/local/bin/tuneplex-entrypoint

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# libgomp1: the OpenMP runtime of llama-cpp-python's llama.cpp (the GGUF exports and their checks).
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 tuneplex \
    && useradd --uid 10001 --gid 10001 --home-dir /home/tuneplex --create-home --shell /usr/sbin/nologin tuneplex
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/venv-train /opt/venv-train
COPY --from=build /app /app
COPY --from=build /usr/local/bin/tuneplex-entrypoint /usr/local/bin/tuneplex-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/platform \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=tuneplex.settings \
    TUNEPLEX_DATA_DIR=/var/lib/tuneplex \
    TUNEPLEX_TRAINER_PYTHON=/opt/venv-train/bin/python \
    TUNEPLEX_TRAINING_DEVICE=cuda \
    HF_HUB_OFFLINE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/tuneplex-metrics
RUN mkdir -p /var/lib/tuneplex && chown tuneplex:tuneplex /var/lib/tuneplex
WORKDIR /app
USER 10001:10001
EXPOSE 9540
ENTRYPOINT ["tuneplex-entrypoint"]
CMD ["worker", "--queues", "gpu", "--concurrency", "1", "--prefetch-multiplier", "1"]
