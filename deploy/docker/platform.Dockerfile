# syntax=docker/dockerfile:1.7
# The platform image: web/gateway (uvicorn), beat, the default worker and the migration job.
# Built by deploy/docker/build.sh, which pins the base image by digest (images.lock).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /app
# Dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p platform/tuneplex jobs serving frontend \
    && touch platform/tuneplex/__init__.py jobs/__init__.py serving/__init__.py frontend/__init__.py \
    && /opt/venv/bin/pip install -e ".[s3]"
COPY manage.py ./
COPY platform ./platform
COPY jobs ./jobs
COPY serving ./serving
COPY frontend ./frontend
COPY deploy/docker/entrypoint.sh /usr/local/bin/tuneplex-entrypoint

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 tuneplex \
    && useradd --uid 10001 --gid 10001 --home-dir /home/tuneplex --create-home --shell /usr/sbin/nologin tuneplex \
    && apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
COPY --from=build /usr/local/bin/tuneplex-entrypoint /usr/local/bin/tuneplex-entrypoint
# No secret is baked in: SECRET_KEY, the engine key, database and storage credentials all come
# from the environment at run time (deploy/compose/.env, Kubernetes Secrets).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/platform \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=tuneplex.settings \
    TUNEPLEX_DATA_DIR=/var/lib/tuneplex \
    PROMETHEUS_MULTIPROC_DIR=/tmp/tuneplex-metrics
RUN mkdir -p /var/lib/tuneplex && chown tuneplex:tuneplex /var/lib/tuneplex
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9540
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s CMD ["tuneplex-entrypoint", "healthcheck"]
ENTRYPOINT ["tuneplex-entrypoint"]
CMD ["web"]
