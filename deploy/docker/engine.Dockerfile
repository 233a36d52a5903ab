# syntax=docker/dockerfile:1.7
# A serving replica: the official vLLM image (CUDA) with the pool agent (manage.py run_engine),
# which starts vLLM with Tuneplex's settings (runtime LoRA updates, the engine API key, slots).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

FROM ${VLLM_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The platform in a venv of its own beside the image's vLLM (its pins stay out of the platform).
RUN python3 -m venv /opt/venv
WORKDIR /app
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

FROM ${VLLM_IMAGE} AS runtime
RUN groupadd --gid 10001 tuneplex \
    && useradd --uid 10001 --gid 10001 --home-dir /home/tuneplex --create-home --shell /usr/sbin/nologin tuneplex
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=build /usr/local/bin/tuneplex-entrypoint /usr/local/bin/tuneplex-entrypoint
ENV PYTHONPATH=/app:/app/platform \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=tuneplex.settings \
    TUNEPLEX_DATA_DIR=/var/lib/tuneplex \
    TUNEPLEX_SERVING_DIR=/var/lib/tuneplex/serving \
    TUNEPLEX_ENGINE_PYTHON=/usr/bin/python3 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/tuneplex
RUN mkdir -p /var/lib/tuneplex && chown tuneplex:tuneplex /var/lib/tuneplex
WORKDIR /app
USER 10001:10001
EXPOSE 8100 8101
ENTRYPOINT ["tuneplex-entrypoint"]
CMD ["engine", "--port", "8100"]
