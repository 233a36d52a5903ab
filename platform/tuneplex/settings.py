"""Django settings, read once from the environment (see README "Configuration").

With nothing set this is the embedded default: SQLite, a serverless Celery transport and local
files, all under one data folder. DATABASE_URL and REDIS_URL switch to PostgreSQL and Redis.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from tuneplex.env import (
    env_bool,
    env_bytes,
    env_int,
    env_list,
    env_path,
    env_str,
    env_url,
)

REPO_DIR = Path(__file__).resolve().parents[2]

# --- where things live -------------------------------------------------------------------------
DATA_DIR = env_path("TUNEPLEX_DATA_DIR", REPO_DIR / "var")
MODELS_DIR = env_path("TUNEPLEX_MODELS_DIR", DATA_DIR / "models")
ARTIFACTS_DIR = env_path("TUNEPLEX_ARTIFACTS_DIR", DATA_DIR / "artifacts")
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    configured = env_str("SECRET_KEY")
    if configured is not None:
        if len(configured) < 32:
            raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters long")
        return configured
    # Embedded default: one random key generated on first start and kept in the data folder.
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()


def _kept_secret(variable: str, file_name: str) -> str:
    """A secret from the environment, or (embedded default) generated once into the data folder."""
    configured = env_str(variable)
    if configured is not None:
        if len(configured) < 32:
            raise ImproperlyConfigured(f"{variable} must be at least 32 characters long")
        return configured
    key_file = DATA_DIR / file_name
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(32))
    return key_file.read_text().strip()
DEBUG = env_bool("TUNEPLEX_DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- apps ----------------------------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "axes",
    "tuneplex.core",
    "tuneplex.tenancy",
    "tuneplex.apikeys",
    "tuneplex.audit",
    "tuneplex.basemodels",
    "tuneplex.files",
    "tuneplex.finetuning",
    "tuneplex.adapters",
    "tuneplex.inference",
    "tuneplex.feedback",
    "tuneplex.evals",
    "tuneplex.batches",
    "tuneplex.exports",
    "tuneplex.sweeps",
    "tuneplex.operations",  # above the feature apps: /healthz, /readyz, /metrics
    "frontend",
]

MIDDLEWARE = [
    "tuneplex.core.request_id.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "tuneplex.core.middleware.ApiErrorMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "frontend.middleware.ApiErrorPageMiddleware",
    "axes.middleware.AxesMiddleware",  # last: it turns a lockout into the lockout page
]

ROOT_URLCONF = "tuneplex.urls"
ASGI_APPLICATION = "tuneplex.asgi.application"
AUTH_USER_MODEL = "tenancy.User"
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "frontend:home"
LOGOUT_REDIRECT_URL = "frontend:login"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "frontend.context.navigation",
            ],
        },
    },
]

# --- database ------------------------------------------------------------------------------------
DATABASE_URL = env_url(
    "DATABASE_URL",
    f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
    schemes=("sqlite", "postgres", "postgresql"),
)
# No persistent connections: under ASGI each request's sync code may run in a different thread,
# and a connection kept per thread outlives its thread (Django's advice for ASGI).
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web and worker share the file: wait for a lock instead of failing at once.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- broker and cache ----------------------------------------------------------------------------
REDIS_URL = env_url("REDIS_URL", None, schemes=("redis", "rediss"))
BROKER_DIR = DATA_DIR / "broker"

if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {
        # A training task runs for hours; the job row, not redelivery, guards against loss.
        "visibility_timeout": env_int("TUNEPLEX_BROKER_VISIBILITY_TIMEOUT", 12 * 3600, minimum=60),
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": REDIS_URL}}
else:
    # Embedded default: kombu's filesystem transport is a real broker that needs no server.
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(DATA_DIR / "cache")}}

# The queues (tuneplex.core.queue): "default" for light work (job validation, dispatch, sweeps),
# "statistics" for dataset statistics (minutes for a large file; kept out of the scheduler's way),
# "gpu" for training and merges, served by one worker process per GPU, "evals" for background
# inference and "exports" for the conversions of exports (CPU, the trainer's environment).
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"tuneplex.train.*": {"queue": "gpu"},
                      "tuneplex.files.statistics": {"queue": "statistics"},
                      "tuneplex.evals.run": {"queue": "evals"},
                      "tuneplex.batches.run": {"queue": "evals"},
                      "tuneplex.exports.run": {"queue": "exports"}}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = False  # only idempotent tasks opt in, per task
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- artifact storage ----------------------------------------------------------------------------
STORAGE_BACKEND = env_str("TUNEPLEX_STORAGE", "local", choices=("local", "s3"))
if STORAGE_BACKEND == "s3":
    _bucket = env_str("TUNEPLEX_S3_BUCKET")
    if not _bucket:
        raise ImproperlyConfigured("TUNEPLEX_S3_BUCKET is required when TUNEPLEX_STORAGE=s3")
    _artifacts = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": _bucket,
            "endpoint_url": env_url("TUNEPLEX_S3_ENDPOINT_URL", None, schemes=("http", "https")),
            "region_name": env_str("TUNEPLEX_S3_REGION"),
            "location": env_str("TUNEPLEX_S3_PREFIX", "tuneplex"),
            "file_overwrite": False,
            "default_acl": None,
        },
    }
else:
    _artifacts = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(ARTIFACTS_DIR), "file_permissions_mode": 0o640,
                    "directory_permissions_mode": 0o750},
    }
# Downloads (tuneplex.core.downloads) stream through the web process in 1 MiB chunks. With S3
# storage and this above 0, a single-blob download (a dataset's content) answers 302 to a
# presigned URL of the bucket valid this many seconds instead, and the web process never carries
# the bytes; clients must then reach the bucket at TUNEPLEX_S3_ENDPOINT_URL.
DOWNLOAD_REDIRECT_SECONDS = env_int("TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS", 0, minimum=0,
                                    maximum=3600)
if DOWNLOAD_REDIRECT_SECONDS and STORAGE_BACKEND != "s3":
    raise ImproperlyConfigured("TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS needs TUNEPLEX_STORAGE=s3")
STORAGES = {
    "default": _artifacts,
    "artifacts": _artifacts,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
STATIC_URL = "/static/"
SERVE_STATIC = env_bool("TUNEPLEX_SERVE_STATIC", True)
STATIC_ROOT = DATA_DIR / "static"

# --- trainer and engine --------------------------------------------------------------------------
# The trainer is a plain library run in its own Python environment (torch, transformers, peft).
TRAINER_PYTHON = env_path("TUNEPLEX_TRAINER_PYTHON", REPO_DIR / ".venv-train" / "bin" / "python")
DEFAULT_BASE_MODEL = env_str("TUNEPLEX_DEFAULT_BASE_MODEL", "SmolLM2-135M-Instruct")

# Inference runs on vLLM replicas listening on loopback or an internal network only. `spawn`: the
# README's command 1 starts one replica for the default base model (manage.py run_engine) on
# TUNEPLEX_ENGINE_PORT; `attach`: replicas run elsewhere and join the fleet by themselves (below),
# or, with TUNEPLEX_ENGINE_URLS, exactly the ones listed; `off`: no inference endpoints.
# A replica's address is its pool agent's (docs/serving.md); its vLLM listens on the next port.
ENGINE_MODE = env_str("TUNEPLEX_ENGINE_MODE", "spawn", choices=("spawn", "attach", "off"))
ENGINE_PORT = env_int("TUNEPLEX_ENGINE_PORT", 8100, minimum=1, maximum=65535)
ENGINE_PYTHON = env_path("TUNEPLEX_ENGINE_PYTHON", REPO_DIR / ".venv-engine" / "bin" / "python")
ENGINE_MAX_LORAS = env_int("TUNEPLEX_ENGINE_MAX_LORAS", 4, minimum=1, maximum=256)
ENGINE_LORA_SLOTS = env_int("TUNEPLEX_ENGINE_LORA_SLOTS", 8, minimum=1, maximum=1024)
ENGINE_MAX_LORA_RANK = env_int("TUNEPLEX_ENGINE_MAX_LORA_RANK", 16, minimum=1, maximum=512)
ENGINE_MAX_MODEL_LEN = env_int("TUNEPLEX_ENGINE_MAX_MODEL_LEN", 2048, minimum=128)
ENGINE_KV_CACHE_GIB = env_int("TUNEPLEX_ENGINE_KV_CACHE_GIB", 1, minimum=1)
ENGINE_RECONCILE_SECONDS = env_int("TUNEPLEX_ENGINE_RECONCILE_SECONDS", 5, minimum=1)
ENGINE_TIMEOUT = env_int("TUNEPLEX_ENGINE_TIMEOUT", 600, minimum=1)
# The engines schedule requests by priority (vLLM's --scheduling-policy priority; the platform
# starts its own so, and attached engines must be started with that flag): an eval run's
# requests then wait behind the tenants' interactive ones. Off: first come, first served.
ENGINE_PRIORITY_SCHEDULING = env_bool("TUNEPLEX_ENGINE_PRIORITY_SCHEDULING", True)
_default_urls = [f"http://127.0.0.1:{ENGINE_PORT}"] if ENGINE_MODE == "spawn" else []
_engine_urls = env_list("TUNEPLEX_ENGINE_URLS", _default_urls) if ENGINE_MODE != "off" else []
# Membership (docs/operations.md, "Replicas join by themselves"): every replica's pool agent
# registers in Redis under the fleet's name, renewed each TUNEPLEX_MEMBERSHIP_HEARTBEAT_SECONDS and
# gone after three missed beats. In `attach` mode without TUNEPLEX_ENGINE_URLS the gateways serve
# whatever replicas are registered, read each second: starting a replica adds it, with no
# configuration edit or restart. One Redis shared by two installs: give each its own fleet name.
SERVING_FLEET = env_str("TUNEPLEX_SERVING_FLEET", "default")
if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", SERVING_FLEET):
    raise ImproperlyConfigured(f"TUNEPLEX_SERVING_FLEET={SERVING_FLEET!r}: use 1-64 letters, digits, "
                               f"'.', '_' or '-'")
MEMBERSHIP_HEARTBEAT_SECONDS = env_int("TUNEPLEX_MEMBERSHIP_HEARTBEAT_SECONDS", 2, minimum=1, maximum=60)
# The Redis the membership lives in: REDIS_URL, or on engine nodes (which must not hold the
# platform's Redis user) a user that may touch the fleet's keys only (docs/operations.md).
FLEET_REDIS_URL = env_url("TUNEPLEX_FLEET_REDIS_URL", REDIS_URL, schemes=("redis", "rediss"))
ENGINE_DISCOVERY = ENGINE_MODE == "attach" and not _engine_urls
if ENGINE_DISCOVERY and not FLEET_REDIS_URL:
    raise ImproperlyConfigured("TUNEPLEX_ENGINE_MODE=attach needs TUNEPLEX_ENGINE_URLS, or REDIS_URL "
                               "for the replicas to register in")
# base model name -> replica URLs. Entries are `URL` (a replica of the default base model) or
# `MODEL=URL`.
ENGINE_REPLICAS: dict[str, list[str]] = {}
for _entry in _engine_urls:
    _model, _, _url = ("", "", _entry) if _entry.startswith("http") else _entry.partition("=")
    if not _url.startswith(("http://", "https://")):
        raise ImproperlyConfigured(f"TUNEPLEX_ENGINE_URLS has {_entry!r}; expected URL or MODEL=URL "
                                   f"with an http(s) URL")
    ENGINE_REPLICAS.setdefault(_model or DEFAULT_BASE_MODEL, []).append(_url.rstrip("/"))
SERVING_DIR = env_path("TUNEPLEX_SERVING_DIR", DATA_DIR / "serving")  # adapters staged for the engine
# Every replica (vLLM and its pool agent) requires this key; the gateways and agents send it.
ENGINE_API_KEY = _kept_secret("TUNEPLEX_ENGINE_API_KEY", "engine_api_key")
# Where a replica's pool agent and vLLM listen (run_engine --host): loopback unless the operator
# names an internal address (the Compose and Kubernetes deployments do).
ENGINE_HOST = env_str("TUNEPLEX_ENGINE_HOST", "127.0.0.1")
# The pool agent handles at most this many requests at once (a fixed pool of threads; a lease may
# wait up to 30 s for a slot), and cuts a connection whose request has not arrived whole, headers
# and body, within TUNEPLEX_AGENT_READ_TIMEOUT seconds.
AGENT_THREADS = env_int("TUNEPLEX_AGENT_THREADS", 32, minimum=2, maximum=1024)
AGENT_READ_TIMEOUT = env_int("TUNEPLEX_AGENT_READ_TIMEOUT", 10, minimum=1, maximum=300)
# TLS on a replica's two ports (docs/operations.md, "TLS between nodes"): the pool agent serves
# https with this certificate and starts vLLM with it; gateways then list https:// agents.
ENGINE_TLS_CERT = env_str("TUNEPLEX_ENGINE_TLS_CERT")
ENGINE_TLS_KEY = env_str("TUNEPLEX_ENGINE_TLS_KEY")
if (ENGINE_TLS_CERT is None) != (ENGINE_TLS_KEY is None):
    raise ImproperlyConfigured("TUNEPLEX_ENGINE_TLS_CERT and TUNEPLEX_ENGINE_TLS_KEY are set together "
                               "or not at all")
# vLLM gets an allow-listed environment (serving.engine.engine_env); these names are added to it.
ENGINE_ENV_PASS = tuple(env_list("TUNEPLEX_ENGINE_ENV_PASS", []))
# The pool agent stages adapters from S3 with credentials of its own, meant to be read-only
# (docs/deploy.md has the bucket policy); unset, it uses the platform's, and warns.
AGENT_S3_ACCESS_KEY_ID = env_str("TUNEPLEX_AGENT_S3_ACCESS_KEY_ID")
AGENT_S3_SECRET_ACCESS_KEY = env_str("TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY")
if (AGENT_S3_ACCESS_KEY_ID is None) != (AGENT_S3_SECRET_ACCESS_KEY is None):
    raise ImproperlyConfigured("TUNEPLEX_AGENT_S3_ACCESS_KEY_ID and TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY "
                               "are set together or not at all")
if STORAGE_BACKEND == "s3" and AGENT_S3_ACCESS_KEY_ID:
    STORAGES["serving"] = {**_artifacts, "OPTIONS": {**_artifacts["OPTIONS"],
                                                     "access_key": AGENT_S3_ACCESS_KEY_ID,
                                                     "secret_key": AGENT_S3_SECRET_ACCESS_KEY}}
else:
    STORAGES["serving"] = _artifacts
# A gateway's lease on an adapter it is serving expires this long after its last renewal (a
# gateway that died pins nothing for longer).
ENGINE_LEASE_SECONDS = env_int("TUNEPLEX_ENGINE_LEASE_SECONDS", 15, minimum=3)


# --- secrets that nodes share ----------------------------------------------------------------------
# The embedded default generates SECRET_KEY and the engine key into the data folder. Processes on
# other machines have other data folders, hence other keys: sessions, CSRF tokens and signed links
# fail across web processes, gateways cannot reach engines. So where the install spans machines,
# both must be given (an empty value, as in the example secrets files, counts as none).
def _is_remote(url: str | None) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname if url else None
    if not host or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name other than localhost: another machine


_SHARED_DATABASE_AND_BROKER = (DATABASES["default"]["ENGINE"].endswith("postgresql")
                               and REDIS_URL is not None
                               and (_is_remote(DATABASE_URL) or _is_remote(REDIS_URL)))
_REMOTE_ENGINES = any(_is_remote(url) for urls in ENGINE_REPLICAS.values() for url in urls)
_SHARED_STORAGE = STORAGE_BACKEND == "s3" and (
    _artifacts["OPTIONS"]["endpoint_url"] is None or _is_remote(_artifacts["OPTIONS"]["endpoint_url"]))
if _SHARED_DATABASE_AND_BROKER and env_str("SECRET_KEY") is None:
    raise ImproperlyConfigured(
        "SECRET_KEY is required: DATABASE_URL and REDIS_URL name servers on another machine, so "
        "several machines' processes share this install and must sign with one key (a key "
        "generated per machine breaks sessions and signed links). Set it, 32 characters or more, "
        "for every web, worker and beat process.")
if ((_SHARED_DATABASE_AND_BROKER or _REMOTE_ENGINES or _SHARED_STORAGE)
        and env_str("TUNEPLEX_ENGINE_API_KEY") is None):
    raise ImproperlyConfigured(
        "TUNEPLEX_ENGINE_API_KEY is required: this install spans machines (shared database and "
        "broker, engines on another machine, or S3 storage), and gateways, workers and engines "
        "must all hold the same key (a key generated per machine locks the gateways out). Set "
        "it, 32 characters or more, for every process.")

# --- inference gateway -----------------------------------------------------------------------------
INFERENCE_MAX_BODY = env_bytes("TUNEPLEX_INFERENCE_MAX_BODY", 1 * 2**20)
INFERENCE_MAX_TOKENS = env_int("TUNEPLEX_INFERENCE_MAX_TOKENS", 512, minimum=1)
INFERENCE_MAX_N = env_int("TUNEPLEX_INFERENCE_MAX_N", 4, minimum=1, maximum=128)
# One completion request may carry a list of prompts: at most this many, and at most
# INFERENCE_MAX_SEQUENCES prompts x n, so one request cannot occupy the shared engine.
# REST API requests per minute per organization (every key and member together); 0: unlimited.
ORG_API_RATE_LIMIT = env_int("TUNEPLEX_ORG_API_RATE_LIMIT", 1200, minimum=0)
# Per organization, shared by every web process (Redis): tokens a minute (each request reserves
# its prompt plus max_tokens x n and settles with the real usage) and requests in flight; 0: off.
ORG_INFERENCE_TOKENS_PER_MINUTE = env_int("TUNEPLEX_ORG_INFERENCE_TOKENS_PER_MINUTE", 200_000,
                                          minimum=0)
ORG_INFERENCE_CONCURRENCY = env_int("TUNEPLEX_ORG_INFERENCE_CONCURRENCY", 32, minimum=0)
INFERENCE_MAX_PROMPTS = env_int("TUNEPLEX_INFERENCE_MAX_PROMPTS", 16, minimum=1, maximum=1024)
INFERENCE_MAX_SEQUENCES = env_int("TUNEPLEX_INFERENCE_MAX_SEQUENCES", 32, minimum=1,
                                  maximum=4096)
INFERENCE_AUTH_CACHE_SECONDS = env_int("TUNEPLEX_INFERENCE_AUTH_CACHE_SECONDS", 2, minimum=0, maximum=60)
# Why a key was refused is remembered this long: a flood of one bad key asks the database once.
INFERENCE_AUTH_REFUSAL_CACHE_SECONDS = env_int("TUNEPLEX_INFERENCE_AUTH_REFUSAL_CACHE_SECONDS", 10,
                                               minimum=0, maximum=300)
# Failed authentications a client address may make on the inference endpoints per minute before
# it is answered 429 (0: no limit); keys already known to the process are not held back.
INFERENCE_AUTH_FAILURES_PER_MINUTE = env_int("TUNEPLEX_INFERENCE_AUTH_FAILURES_PER_MINUTE", 30,
                                             minimum=0)
# Threads per web process for the inference fast path's database look-ups (keys and models not
# in the admission cache); bounded, so that a flood of unknown keys waits there.
INFERENCE_LOOKUP_THREADS = env_int("TUNEPLEX_INFERENCE_LOOKUP_THREADS", 8, minimum=1, maximum=256)
INFERENCE_RATE_LIMIT = env_int("TUNEPLEX_INFERENCE_RATE_LIMIT", 600, minimum=0)  # per key per minute

# --- fine-tuning ---------------------------------------------------------------------------------
TRAINING_DEVICE = env_str("TUNEPLEX_TRAINING_DEVICE", "cpu", choices=("cpu", "cuda"))
TRAINING_MEMORY = env_bytes("TUNEPLEX_TRAINING_MEMORY", 16 * 2**30)
# Effective training speed assumed by the pre-flight time estimate until the organization has
# finished jobs on the model to measure from: LoRA costs about 4 x parameters FLOPs a token.
# Defaults: what the embedded model reaches on 2 CPU cores; ~15% MFU of an H100.
TRAINING_GFLOPS = env_int("TUNEPLEX_TRAINING_GFLOPS", 150_000 if TRAINING_DEVICE == "cuda" else 60,
                          minimum=1)
# GPUs over all GPU workers: the scheduler dispatches while the GPUs of running jobs (and merges,
# one each) leave room for the next job's. A job asks for up to JOB_MAX_GPUS (the GPUs one GPU
# worker sees; it trains data-parallel on them under torchrun). Unset (None), they are the GPUs
# of the GPU workers registered now (finetuning.selectors.gpu_capacity): each `gpu`-queue worker
# registers in the database when it is ready, renews its row every
# GPU_WORKER_HEARTBEAT_SECONDS and stops counting after three missed beats; set, this number is
# used as it is (an override).
GPU_SLOTS: int | None = env_int("TUNEPLEX_GPU_SLOTS", None,  # type: ignore[arg-type]
                                minimum=1, maximum=4096)
GPU_WORKER_HEARTBEAT_SECONDS = env_int("TUNEPLEX_GPU_WORKER_HEARTBEAT_SECONDS", 10, minimum=1,
                                       maximum=300)
JOB_MAX_GPUS = env_int("TUNEPLEX_JOB_MAX_GPUS", 1, minimum=1, maximum=64)
ORG_MAX_CONCURRENT_JOBS = env_int("TUNEPLEX_ORG_MAX_CONCURRENT_JOBS", 1, minimum=1)
# Jobs an organization may have waiting (validating their files or queued) at once; one more is
# refused with 429 too_many_queued_jobs.
ORG_MAX_QUEUED_JOBS = env_int("TUNEPLEX_ORG_MAX_QUEUED_JOBS", 100, minimum=1)
JOB_HEARTBEAT_SECONDS = env_int("TUNEPLEX_JOB_HEARTBEAT_SECONDS", 5, minimum=1)
JOB_HEARTBEAT_TIMEOUT = env_int("TUNEPLEX_JOB_HEARTBEAT_TIMEOUT", 60, minimum=5)
JOB_MAX_ATTEMPTS = env_int("TUNEPLEX_JOB_MAX_ATTEMPTS", 3, minimum=1, maximum=20)
# A job running longer than this since it first started (over all attempts) is stopped and failed.
JOB_MAX_RUNTIME_SECONDS = env_int("TUNEPLEX_JOB_MAX_RUNTIME_SECONDS", 72 * 3600, minimum=60)
# Checkpoints live in artifact storage (the newest N of each job); the work folder is a cache.
JOB_KEEP_CHECKPOINTS = env_int("TUNEPLEX_JOB_KEEP_CHECKPOINTS", 3, minimum=1, maximum=100)
# How long a worker keeps retrying a progress write (metrics, events) the database refused
# before it drops that one write; checkpoints and success are retried until the job is re-queued.
JOB_WRITE_RETRY_SECONDS = env_int("TUNEPLEX_JOB_WRITE_RETRY_SECONDS", 60, minimum=1)
WORK_DIR = env_path("TUNEPLEX_WORK_DIR", DATA_DIR / "work")
# Deadlines of the sweep (tuneplex.finetuning.scheduler.sweep): work whose worker or message was
# lost is sent again after a minute, and failed with a clear error after its deadline.
VALIDATION_DEADLINE_SECONDS = env_int("TUNEPLEX_VALIDATION_DEADLINE_SECONDS", 600, minimum=60)
STATISTICS_TIMEOUT_SECONDS = env_int("TUNEPLEX_STATISTICS_TIMEOUT_SECONDS", 1800, minimum=60)
STATISTICS_DEADLINE_SECONDS = env_int("TUNEPLEX_STATISTICS_DEADLINE_SECONDS", 7200, minimum=120)
MERGE_DEADLINE_SECONDS = env_int("TUNEPLEX_MERGE_DEADLINE_SECONDS", 4 * 3600, minimum=60)
# How often each running hyperparameter sweep takes a step (docs/evaluation.md#sweeps): reports
# its trials' validation losses to Optuna, prunes, tells, and starts the next trials.
SWEEP_STEP_SECONDS = env_int("TUNEPLEX_SWEEP_STEP_SECONDS", 10, minimum=1, maximum=3600)
CELERY_BEAT_SCHEDULE = {
    "sweep": {"task": "tuneplex.sweep", "schedule": 10.0},
    "evals-sweep": {"task": "tuneplex.evals.sweep", "schedule": 10.0},
    "batches-sweep": {"task": "tuneplex.batches.sweep", "schedule": 10.0},
    "exports-sweep": {"task": "tuneplex.exports.sweep", "schedule": 10.0},
    # On the default queue (CELERY_TASK_DEFAULT_QUEUE): seconds of work per sweep.
    "sweeps-step": {"task": "tuneplex.sweeps.step", "schedule": float(SWEEP_STEP_SECONDS)},
    # Deletes the parts of uploads that ended (docs/datasets.md#uploads); default queue.
    "uploads-clean": {"task": "tuneplex.files.uploads_clean", "schedule": 60.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")


# --- evaluation ----------------------------------------------------------------------------------
# Eval runs (docs/evaluation.md) answer their items through the serving pool, in the
# organization's own limits, on the "evals" queue's workers.
EVAL_MAX_ITEMS = env_int("TUNEPLEX_EVAL_MAX_ITEMS", 10_000, minimum=1)  # items a run
EVAL_MAX_ITEM_BYTES = env_int("TUNEPLEX_EVAL_MAX_ITEM_BYTES", 256 * 1024, minimum=1024)  # one item's JSON
# Items a run has in flight at once (samples and judge calls): at most this many of the
# organization's TUNEPLEX_ORG_INFERENCE_CONCURRENCY slots.
EVAL_CONCURRENCY = env_int("TUNEPLEX_EVAL_CONCURRENCY", 16, minimum=1, maximum=256)
# ... and while tenants' own requests are being answered on the same engines: an eval makes room
# for interactive traffic (on these CPUs every request in a batch slows the others).
EVAL_CONCURRENCY_BESIDE_INTERACTIVE = env_int("TUNEPLEX_EVAL_CONCURRENCY_BESIDE_INTERACTIVE", 1,
                                              minimum=1, maximum=256)
# ... and the requests already in flight beyond that are stopped at the engine when tenants'
# requests come (their tokens counted against the organization) and sent again later.
EVAL_PREEMPT = env_bool("TUNEPLEX_EVAL_PREEMPT", True)
EVAL_MAX_TOKENS = env_int("TUNEPLEX_EVAL_MAX_TOKENS", 256, minimum=1)  # a sample's default max_completion_tokens
ORG_MAX_ACTIVE_EVAL_RUNS = env_int("TUNEPLEX_ORG_MAX_ACTIVE_EVAL_RUNS", 4, minimum=1)  # queued or in progress
EVAL_HEARTBEAT_SECONDS = env_int("TUNEPLEX_EVAL_HEARTBEAT_SECONDS", 5, minimum=1)
EVAL_HEARTBEAT_TIMEOUT = env_int("TUNEPLEX_EVAL_HEARTBEAT_TIMEOUT", 60, minimum=5)
EVAL_MAX_ATTEMPTS = env_int("TUNEPLEX_EVAL_MAX_ATTEMPTS", 3, minimum=1, maximum=20)
# How long a run waits for an engine that does not answer (replicas down, restarting) before it
# fails with engine_unavailable; the items graded until then are kept.
EVAL_ENGINE_WAIT_SECONDS = env_int("TUNEPLEX_EVAL_ENGINE_WAIT_SECONDS", 300, minimum=1)
# vLLM priority of an eval's requests (higher waits longer; interactive requests have 0).
EVAL_PRIORITY = env_int("TUNEPLEX_EVAL_PRIORITY", 10, minimum=0, maximum=1000)

# --- batches -------------------------------------------------------------------------------------
# OpenAI's Batch API (docs/batches.md): a file of requests answered in the background on the
# "evals" queue's workers (the queue of background inference), in the organization's own limits.
BATCH_MAX_REQUESTS = env_int("TUNEPLEX_BATCH_MAX_REQUESTS", 50_000, minimum=1)  # requests a batch (OpenAI's)
BATCH_MAX_INPUT_BYTES = env_bytes("TUNEPLEX_BATCH_MAX_INPUT_BYTES", 200 * 2**20)  # its input file (OpenAI's)
ORG_MAX_ACTIVE_BATCHES = env_int("TUNEPLEX_ORG_MAX_ACTIVE_BATCHES", 10, minimum=1)  # not ended yet
BATCH_MAX_ERRORS = env_int("TUNEPLEX_BATCH_MAX_ERRORS", 1000, minimum=1)  # lines named in a failed batch's errors
# Requests a batch has in flight at once, and while tenants' own requests are being answered on
# the same engines: a batch makes room for interactive traffic, as an eval run does.
BATCH_CONCURRENCY = env_int("TUNEPLEX_BATCH_CONCURRENCY", 8, minimum=1, maximum=256)
BATCH_CONCURRENCY_BESIDE_INTERACTIVE = env_int("TUNEPLEX_BATCH_CONCURRENCY_BESIDE_INTERACTIVE", 1,
                                               minimum=1, maximum=256)
# ... and for this many seconds after the last such request (a person reads the answer before
# asking again: the batch does not fill the engines in between).
BATCH_INTERACTIVE_QUIET_SECONDS = env_int("TUNEPLEX_BATCH_INTERACTIVE_QUIET_SECONDS", 5, minimum=0,
                                          maximum=3600)
# vLLM priority of a batch's requests (higher waits longer; interactive 0, eval runs 10).
BATCH_PRIORITY = env_int("TUNEPLEX_BATCH_PRIORITY", 20, minimum=0, maximum=1000)
# How long a batch waits for an engine that does not answer before it fails (engine_unavailable)
# with what was answered in its files.
BATCH_ENGINE_WAIT_SECONDS = env_int("TUNEPLEX_BATCH_ENGINE_WAIT_SECONDS", 600, minimum=1)
BATCH_HEARTBEAT_SECONDS = env_int("TUNEPLEX_BATCH_HEARTBEAT_SECONDS", 5, minimum=1)
BATCH_HEARTBEAT_TIMEOUT = env_int("TUNEPLEX_BATCH_HEARTBEAT_TIMEOUT", 60, minimum=5)
BATCH_MAX_ATTEMPTS = env_int("TUNEPLEX_BATCH_MAX_ATTEMPTS", 3, minimum=1, maximum=20)

# --- exports -------------------------------------------------------------------------------------
# An adapter's model in another format (docs/export.md), converted on the "exports" queue's
# workers (CPU, the trainer's environment) after the adapter's merge where the format needs it.
# An export running longer than this fails (export_timeout; the sweep fails one whose worker
# died, export_stalled, a minute later).
EXPORT_DEADLINE_SECONDS = env_int("TUNEPLEX_EXPORT_DEADLINE_SECONDS", 4 * 3600, minimum=60)
# Exports an organization may have queued or running at once; one more is refused (429
# too_many_active_exports).
ORG_MAX_ACTIVE_EXPORTS = env_int("TUNEPLEX_ORG_MAX_ACTIVE_EXPORTS", 5, minimum=1)

# --- hyperparameter sweeps -----------------------------------------------------------------------
# A sweep's trials are fine-tuning jobs (never more in flight than the organization's
# TUNEPLEX_ORG_MAX_CONCURRENT_JOBS); its Optuna study is kept in this database.
SWEEP_MAX_TRIALS = env_int("TUNEPLEX_SWEEP_MAX_TRIALS", 100, minimum=1, maximum=9999)  # a sweep's budget
# Sweeps an organization may have running at once; one more is refused (429 too_many_active_sweeps).
ORG_MAX_ACTIVE_SWEEPS = env_int("TUNEPLEX_ORG_MAX_ACTIVE_SWEEPS", 5, minimum=1)


# --- experiment tracking -------------------------------------------------------------------------
# A job's `integrations` (docs/evaluation.md#experiment-tracking), sent by the GPU workers.
# The MLflow tracking server is the operator's: tenants name an experiment, never an address. Unset:
# an `mlflow` integration is refused (400 integration_unavailable). MLflow's own client variables
# (MLFLOW_TRACKING_TOKEN, MLFLOW_HTTP_REQUEST_MAX_RETRIES, ...) apply to the workers as usual.
MLFLOW_TRACKING_URI = env_url("TUNEPLEX_MLFLOW_TRACKING_URI", None, schemes=("http", "https"))
# offline: W&B writes its files only (no key, no network), stored with the job and downloadable;
# online: the run goes to W&B (WANDB_BASE_URL for a self-hosted server) with the organization's key.
WANDB_MODE = env_str("TUNEPLEX_WANDB_MODE", "offline", choices=("offline", "online"))
# How long a finished attempt waits for its trackers to send what they still hold (the adapter
# artifact, the run's end) before it gives up on them; training itself never waits for them.
TRACKING_DRAIN_SECONDS = env_int("TUNEPLEX_TRACKING_DRAIN_SECONDS", 120, minimum=0, maximum=3600)


# --- metrics -------------------------------------------------------------------------------------
# /metrics (Prometheus text format) on web processes, Celery workers (TUNEPLEX_WORKER_METRICS_PORT)
# and pool agents. Served to callers in TUNEPLEX_METRICS_NETWORKS that come straight (not through
# a proxy: no X-Forwarded-For), or to any caller with TUNEPLEX_METRICS_TOKEN as a bearer token.
METRICS_TOKEN = env_str("TUNEPLEX_METRICS_TOKEN")
if METRICS_TOKEN is not None and len(METRICS_TOKEN) < 24:
    raise ImproperlyConfigured("TUNEPLEX_METRICS_TOKEN must be at least 24 characters long")


def _networks(items: list[str]) -> tuple:
    import ipaddress

    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError as exc:
        raise ImproperlyConfigured(f"TUNEPLEX_METRICS_NETWORKS: {exc}") from None


METRICS_NETWORKS = _networks(env_list("TUNEPLEX_METRICS_NETWORKS", ["127.0.0.0/8", "::1/128"]))
# /readyz (tuneplex.operations.health): each process runs its checks at most once per this many
# seconds (0: on every call, one at a time), and answers this many calls a minute per client
# address (then 429; 0: no limit). Its details are for the callers /metrics serves, and staff users.
READYZ_CACHE_SECONDS = env_int("TUNEPLEX_READYZ_CACHE_SECONDS", 5, minimum=0, maximum=60)
READYZ_RATE_LIMIT = env_int("TUNEPLEX_READYZ_RATE_LIMIT", 60, minimum=0)
# Organization ids as label values (storage per organization): off by default, to bound the
# number of series.
METRICS_ORG_LABELS = env_bool("TUNEPLEX_METRICS_ORG_LABELS", False)
# A Celery worker's exporter (its pool processes' metrics, aggregated); 0: none.
WORKER_METRICS_PORT = env_int("TUNEPLEX_WORKER_METRICS_PORT", 0, minimum=0, maximum=65535)
WORKER_METRICS_HOST = env_str("TUNEPLEX_WORKER_METRICS_HOST", "127.0.0.1")


# --- API ---------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tuneplex.apikeys.authentication.ApiKeyAuthentication",
        "tuneplex.tenancy.authentication.OrganizationSessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["tuneplex.core.permissions.HasScope"],
    "DEFAULT_THROTTLE_CLASSES": ["tuneplex.core.throttles.OrganizationRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["tuneplex.core.parsers.StrictJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "tuneplex.core.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tuneplex API",
    "DESCRIPTION": "Fine-tuning jobs in the shape of OpenAI's API, files, adapters and inference.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # A PATCH's request schema says which fields it requires (a member's new role), instead of
    # drf-spectacular's "Patched" copy with none required.
    "COMPONENT_SPLIT_PATCH": False,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "tuneplex.inference.schema.add_inference_paths",
                             "tuneplex.core.schema.document_lists_and_errors"],
}

API_KEY_PREFIX = "tpx_"

# --- datasets ------------------------------------------------------------------------------------
FILE_UPLOAD_MAX_BYTES = env_bytes("TUNEPLEX_MAX_FILE_SIZE", 512 * 2**20)
ORG_STORAGE_QUOTA = env_bytes("TUNEPLEX_ORG_STORAGE_QUOTA", 20 * 2**30)
DATASET_MAX_LINE_BYTES = env_bytes("TUNEPLEX_DATASET_MAX_LINE", 8 * 2**20)
DATASET_MIN_EXAMPLES = env_int("TUNEPLEX_DATASET_MIN_EXAMPLES", 10, minimum=1)
# Uploads in parts (OpenAI's Uploads API, docs/datasets.md#uploads): a file of up to
# TUNEPLEX_UPLOAD_MAX_BYTES sent in parts of up to TUNEPLEX_UPLOAD_PART_MAX_BYTES each (one request
# each), completed within TUNEPLEX_UPLOAD_EXPIRY_SECONDS of its creation; the beat deletes the
# parts of uploads that ended (completed, cancelled, expired).
UPLOAD_MAX_BYTES = env_bytes("TUNEPLEX_UPLOAD_MAX_BYTES", 8 * 2**30)
UPLOAD_PART_MAX_BYTES = env_bytes("TUNEPLEX_UPLOAD_PART_MAX_BYTES", 64 * 2**20)
UPLOAD_EXPIRY_SECONDS = env_int("TUNEPLEX_UPLOAD_EXPIRY_SECONDS", 3600, minimum=60)
# Uploads spool to disk next to local artifacts, so storing one is a rename, not a copy.
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "uploads")
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 2**20
DATA_UPLOAD_MAX_MEMORY_SIZE = env_bytes("TUNEPLEX_MAX_REQUEST_BODY", 10 * 2**20)

# --- accounts and sign-in --------------------------------------------------------------------------
# django-axes with three failure budgets (tuneplex.tenancy.signin): one username from one address
# (TUNEPLEX_LOGIN_FAILURE_LIMIT), one username from any address (..._USERNAME_FAILURE_LIMIT) and
# one address for any usernames (..._ADDRESS_FAILURE_LIMIT); reaching one locks what it counts for
# TUNEPLEX_LOGIN_LOCKOUT_MINUTES. Every failure is logged in the database (axes' access failure
# log), and the counters are shared by every web process. The address is the one uvicorn takes
# from the proxy (FORWARDED_ALLOW_IPS): trust only the proxy's address there.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend",
                           "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("TUNEPLEX_LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_USERNAME_FAILURE_LIMIT = env_int("TUNEPLEX_LOGIN_USERNAME_FAILURE_LIMIT", 20,
                                       minimum=AXES_FAILURE_LIMIT)
LOGIN_ADDRESS_FAILURE_LIMIT = env_int("TUNEPLEX_LOGIN_ADDRESS_FAILURE_LIMIT", 50,
                                      minimum=AXES_FAILURE_LIMIT)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("TUNEPLEX_LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "username", "ip_address"]
AXES_HANDLER = "tuneplex.tenancy.signin.SignInLockoutHandler"
AXES_USERNAME_CALLABLE = "tuneplex.tenancy.signin.attempt_username"
AXES_RESET_ON_SUCCESS = True
AXES_ENABLE_ACCESS_FAILURE_LOG = True
AXES_LOCKOUT_TEMPLATE = "frontend/locked_out.html"
AXES_VERBOSE = False
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
     "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Single sign-on with OpenID Connect (tuneplex.tenancy.oidc): on when a client id is set. The
# provider's endpoints are given one by one (every provider publishes them in its discovery
# document); TUNEPLEX_OIDC_GROUPS maps its groups to memberships: "group=org-slug:role,...".
def _oidc_endpoint(name: str) -> str | None:
    """A provider endpoint: https, or http on a loopback address only (a provider in tests)."""
    url = env_url(name, None, schemes=("https", "http"))
    if url and urlsplit(url).scheme == "http" and not _is_loopback(urlsplit(url).hostname):
        raise ImproperlyConfigured(f"{name} must be an https:// URL (plain http:// only on a "
                                   "loopback address, for tests)")
    return url


def _is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


OIDC_RP_CLIENT_ID = env_str("TUNEPLEX_OIDC_CLIENT_ID", "")
OIDC_ENABLED = bool(OIDC_RP_CLIENT_ID)
if OIDC_ENABLED:
    OIDC_RP_CLIENT_SECRET = env_str("TUNEPLEX_OIDC_CLIENT_SECRET", "")
    OIDC_OP_AUTHORIZATION_ENDPOINT = _oidc_endpoint("TUNEPLEX_OIDC_AUTHORIZATION_URL")
    OIDC_OP_TOKEN_ENDPOINT = _oidc_endpoint("TUNEPLEX_OIDC_TOKEN_URL")
    OIDC_OP_USER_ENDPOINT = _oidc_endpoint("TUNEPLEX_OIDC_USERINFO_URL")
    OIDC_OP_JWKS_ENDPOINT = _oidc_endpoint("TUNEPLEX_OIDC_JWKS_URL")
    for _name, _value in (("TUNEPLEX_OIDC_CLIENT_SECRET", OIDC_RP_CLIENT_SECRET),
                          ("TUNEPLEX_OIDC_AUTHORIZATION_URL", OIDC_OP_AUTHORIZATION_ENDPOINT),
                          ("TUNEPLEX_OIDC_TOKEN_URL", OIDC_OP_TOKEN_ENDPOINT),
                          ("TUNEPLEX_OIDC_USERINFO_URL", OIDC_OP_USER_ENDPOINT),
                          ("TUNEPLEX_OIDC_JWKS_URL", OIDC_OP_JWKS_ENDPOINT)):
        if not _value:
            raise ImproperlyConfigured(f"{_name} is required when TUNEPLEX_OIDC_CLIENT_ID is set")
    OIDC_RP_SIGN_ALGO = "RS256"
    OIDC_RP_SCOPES = env_str("TUNEPLEX_OIDC_SCOPES", "openid email profile groups")
    OIDC_USE_PKCE = True
    OIDC_TIMEOUT = 10
    LOGIN_REDIRECT_URL_FAILURE = "/login/?sso=failed"
    AUTHENTICATION_BACKENDS = [*AUTHENTICATION_BACKENDS, "tuneplex.tenancy.oidc.OrganizationOIDCBackend"]


def _group_map(items: list[str]) -> list[tuple[str, tuple[str, str]]]:
    roles = ("owner", "admin", "member", "viewer")
    mapping = []
    for item in items:
        group, _, target = item.partition("=")
        slug, _, role = target.partition(":")
        if not group or not slug or role not in roles:
            raise ImproperlyConfigured(f"TUNEPLEX_OIDC_GROUPS: {item!r} is not group=org-slug:role "
                                       f"(role one of {', '.join(roles)})")
        mapping.append((group, (slug, role)))
    return mapping


OIDC_GROUP_MAP = _group_map(env_list("TUNEPLEX_OIDC_GROUPS", []))

# Self-service sign-up at /signup/ creates a user and a new organization they own. Off by
# default: operators create organizations (manage.py create_organization) and admins invite.
SIGNUP_ENABLED = env_bool("TUNEPLEX_SIGNUP", False)
# Invitations travel as single-use links valid this long (tuneplex.tenancy.links); they are
# mailed when an SMTP server is set, and built on TUNEPLEX_PUBLIC_URL (else the admin's address).
INVITATION_DAYS = env_int("TUNEPLEX_INVITATION_DAYS", 7, minimum=1, maximum=365)
PUBLIC_URL = env_url("TUNEPLEX_PUBLIC_URL", None, schemes=("https", "http"))
EMAIL_HOST = env_str("TUNEPLEX_EMAIL_HOST", "")
EMAIL_ENABLED = bool(EMAIL_HOST)
EMAIL_PORT = env_int("TUNEPLEX_EMAIL_PORT", 587, minimum=1, maximum=65535)
EMAIL_HOST_USER = env_str("TUNEPLEX_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = env_str("TUNEPLEX_EMAIL_PASSWORD", "")
_EMAIL_SECURITY = env_str("TUNEPLEX_EMAIL_SECURITY", "starttls", choices=("starttls", "tls", "none"))
EMAIL_USE_TLS, EMAIL_USE_SSL = _EMAIL_SECURITY == "starttls", _EMAIL_SECURITY == "tls"
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = env_str("TUNEPLEX_EMAIL_FROM", "tuneplex@localhost")
ORG_MAX_API_KEYS = env_int("TUNEPLEX_ORG_MAX_API_KEYS", 50, minimum=1)

# --- TLS deployment ---------------------------------------------------------------------------------
# Behind a TLS-terminating proxy: secure cookies, HSTS, the proxy's X-Forwarded-Proto trusted,
# plain HTTP redirected (except the probes).
TLS = env_bool("TUNEPLEX_TLS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = TLS
SECURE_HSTS_SECONDS = 31_536_000 if TLS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = TLS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if TLS else None
SECURE_SSL_REDIRECT = TLS
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
# Django's content security policy, on every page: only this origin's scripts, styles, images
# and connections; no inline script, no framing. (The API reference page has its own, looser one.)
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "font-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}

# --- misc --------------------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True
USE_I18N = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "tuneplex.core.request_id.RequestIdFilter"}},
    "formatters": {"plain": {
        "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain",
                             "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": env_str("TUNEPLEX_LOG_LEVEL", "INFO",
                                                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))},
}
CSRF_FAILURE_VIEW = "tuneplex.core.errors.csrf_failure"
SPECTACULAR_SETTINGS.update({
    "SWAGGER_UI_DIST": "SIDECAR",  # vendored assets, no CDN
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
})
