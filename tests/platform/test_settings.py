"""Settings are parsed once and strictly; a bad value names its variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from tuneplex import env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value,expected", [("true", True), ("0", False), ("YES", True), ("off", False)])
def test_booleans_parse(value, expected):
    assert env.env_bool("X", False, environ={"X": value}) is expected


@pytest.mark.parametrize("helper,value,kwargs", [
    (env.env_bool, "maybe", {"default": False}),
    (env.env_int, "12a", {"default": 1}),
    (env.env_int, "-1", {"default": 1, "minimum": 0}),
    (env.env_bytes, "12 parsecs", {"default": 1}),
    (env.env_list, "a,,b", {"default": []}),
    (env.env_url, "mysql://h/db", {"schemes": ("postgres",)}),
    (env.env_url, "postgres://:99999999/db", {"schemes": ("postgres",)}),
    (env.env_path, "relative/dir", {"default": Path("/")}),
    (env.env_str, "s4", {"choices": ("local", "s3")}),
])
def test_bad_values_raise_naming_the_variable(helper, value, kwargs):
    with pytest.raises(ImproperlyConfigured, match="TUNEPLEX_THING"):
        helper("TUNEPLEX_THING", environ={"TUNEPLEX_THING": value}, **kwargs)


def test_sizes_and_defaults():
    assert env.env_bytes("S", 5, environ={"S": "512MiB"}) == 512 * 2**20
    assert env.env_bytes("S", 5, environ={"S": "2GB"}) == 2 * 10**9
    assert env.env_bytes("S", 5, environ={}) == 5
    assert env.env_int("I", 7, environ={"I": "  "}) == 7  # blank means unset
    assert env.env_list("L", ["x"], environ={"L": "a, b"}) == ["a", "b"]


def _load_settings(**overrides: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TUNEPLEX_", "DATABASE_URL", "REDIS_URL"))}
    environ.update({"TUNEPLEX_DATA_DIR": os.environ["TUNEPLEX_DATA_DIR"],
                    "DJANGO_SETTINGS_MODULE": "tuneplex.settings"}, **overrides)
    code = ("import json, django; from django.conf import settings; django.setup(); "
            "print(json.dumps({'db': settings.DATABASES['default']['ENGINE'], "
            "'broker': settings.CELERY_BROKER_URL, 'storage': settings.STORAGES['artifacts']['BACKEND'], "
            "'cache': settings.CACHES['default']['BACKEND'], 'hosts': settings.ALLOWED_HOSTS}))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("variable,value", [
    ("DATABASE_URL", "mysql://root@localhost/x"),
    ("REDIS_URL", "http://127.0.0.1:6379"),
    ("TUNEPLEX_STORAGE", "ftp"),
    ("TUNEPLEX_DEBUG", "sometimes"),
    ("SECRET_KEY", "short"),
    ("TUNEPLEX_ENGINE_MAX_LORAS", "0"),
    ("TUNEPLEX_ENGINE_URLS", "SmolLM2=ftp://10.0.0.5:8100"),
    ("TUNEPLEX_INFERENCE_MAX_TOKENS", "0"),
    ("TUNEPLEX_INFERENCE_MAX_BODY", "big"),
    ("TUNEPLEX_MAX_REQUEST_BODY", "lots"),
    ("ALLOWED_HOSTS", "a,,b"),
    ("TUNEPLEX_OIDC_GROUPS", "admins=acme:king"),
    ("TUNEPLEX_OIDC_CLIENT_ID", "tuneplex"),  # without the provider's endpoints
    ("TUNEPLEX_METRICS_NETWORKS", "10.0.0.0/8,the-office"),
    ("TUNEPLEX_METRICS_TOKEN", "short"),
    ("TUNEPLEX_METRICS_ORG_LABELS", "perhaps"),
    ("TUNEPLEX_WORKER_METRICS_PORT", "70000"),
    ("TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS", "60"),  # with local storage: nothing to redirect to
    ("TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS", "86400"),
    ("TUNEPLEX_READYZ_CACHE_SECONDS", "600"),
    ("TUNEPLEX_READYZ_RATE_LIMIT", "-1"),
    ("TUNEPLEX_SERVING_FLEET", "a fleet/with spaces"),
    ("TUNEPLEX_MEMBERSHIP_HEARTBEAT_SECONDS", "0"),
    ("TUNEPLEX_ENGINE_MODE", "attach"),  # no replica listed, and no Redis for them to join in
    ("TUNEPLEX_GPU_SLOTS", "0"),
    ("TUNEPLEX_GPU_WORKER_HEARTBEAT_SECONDS", "0"),
])
def test_the_settings_module_refuses_bad_values(variable, value):
    result = _load_settings(**{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and variable in result.stderr


def test_the_embedded_default_needs_no_server():
    import json

    result = _load_settings()
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["db"].endswith("sqlite3")
    assert effective["broker"] == "filesystem://"
    assert effective["storage"].endswith("FileSystemStorage")
    assert effective["cache"].endswith("FileBasedCache")


def test_urls_switch_to_postgres_and_redis():
    import json

    result = _load_settings(DATABASE_URL="postgres://u@127.0.0.1:5432/x",
                            REDIS_URL="redis://127.0.0.1:6379/3", ALLOWED_HOSTS="tuneplex.example")
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["db"].endswith("postgresql")
    assert effective["broker"] == "redis://127.0.0.1:6379/3"
    assert effective["cache"].endswith("RedisCache")
    assert effective["hosts"] == ["tuneplex.example"]


@pytest.mark.parametrize("overrides,expected", [
    ({}, [None, 10]),  # unset: the GPUs of the registered GPU workers
    ({"TUNEPLEX_GPU_SLOTS": "4", "TUNEPLEX_GPU_WORKER_HEARTBEAT_SECONDS": "3"}, [4, 3]),
])
def test_gpu_slots_are_an_optional_override_of_the_membership(overrides, expected):
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TUNEPLEX_", "DATABASE_URL", "REDIS_URL"))}
    environ.update({"TUNEPLEX_DATA_DIR": os.environ["TUNEPLEX_DATA_DIR"],
                    "DJANGO_SETTINGS_MODULE": "tuneplex.settings"}, **overrides)
    code = ("import json, django; from django.conf import settings; django.setup(); "
            "print(json.dumps([settings.GPU_SLOTS, settings.GPU_WORKER_HEARTBEAT_SECONDS]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


def test_the_running_suite_uses_the_servers_it_was_given_or_the_embedded_default(settings):
    engine = settings.DATABASES["default"]["ENGINE"]
    if "DATABASE_URL" in os.environ:
        assert engine.endswith("postgresql")
    else:
        assert engine.endswith("sqlite3")
    if "REDIS_URL" in os.environ:
        assert settings.CELERY_BROKER_URL == os.environ["REDIS_URL"]
    else:
        assert settings.CELERY_BROKER_URL == "filesystem://"


def test_engine_urls_map_replicas_to_base_models():
    code = ("import os, django; os.environ['DJANGO_SETTINGS_MODULE']='tuneplex.settings'; "
            "django.setup(); from django.conf import settings; print(settings.ENGINE_REPLICAS)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEPLEX_ENGINE", "DJANGO_"))}
    environ.update(TUNEPLEX_ENGINE_MODE="attach", TUNEPLEX_DATA_DIR=os.environ["TUNEPLEX_DATA_DIR"],
                   TUNEPLEX_ENGINE_URLS="http://10.0.0.4:8100/,Other-1B=http://10.0.0.5:8100",
                   TUNEPLEX_ENGINE_API_KEY="k" * 40)  # engines on other machines need the key
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("{'SmolLM2-135M-Instruct': ['http://10.0.0.4:8100'], "
                                     "'Other-1B': ['http://10.0.0.5:8100']}")


def test_the_engine_key_is_generated_once_per_install_or_taken_from_the_environment(tmp_path):
    code = ("import os, django; os.environ['DJANGO_SETTINGS_MODULE']='tuneplex.settings'; "
            "django.setup(); from django.conf import settings; print(settings.ENGINE_API_KEY)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEPLEX_", "DJANGO_"))}
    environ["TUNEPLEX_DATA_DIR"] = str(tmp_path)

    def key(**extra: str) -> str:
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**environ, **extra},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    generated = key()
    assert len(generated) >= 32 and key() == generated  # kept in the data folder, like SECRET_KEY
    assert (tmp_path / "engine_api_key").stat().st_mode & 0o777 == 0o600
    assert key(TUNEPLEX_ENGINE_API_KEY="k" * 40) == "k" * 40
    short = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           env={**environ, "TUNEPLEX_ENGINE_API_KEY": "short"}, timeout=60)
    assert short.returncode != 0 and "TUNEPLEX_ENGINE_API_KEY" in short.stderr


# --- secrets that nodes share ------------------------------------------------------------------------

SECRET = "s" * 40
ENGINE_KEY = "k" * 40
SHARED_SERVERS = {"DATABASE_URL": "postgres://tuneplex:pw@db.internal:5432/tuneplex",
                  "REDIS_URL": "redis://:pw@redis.internal:6379/0"}
ENGINE_NODE = {"DATABASE_URL": "postgres://tuneplex:pw@db.internal:5432/tuneplex",
               "TUNEPLEX_STORAGE": "s3", "TUNEPLEX_S3_BUCKET": "tuneplex",
               "TUNEPLEX_S3_ENDPOINT_URL": "https://s3.internal",
               "TUNEPLEX_ENGINE_MODE": "attach",
               "TUNEPLEX_ENGINE_URLS": "http://engine-0.engine-pods.tuneplex.svc.cluster.local:8100"}


@pytest.mark.parametrize("environment,missing", [
    # the example secrets files leave them empty: empty is none
    ({**SHARED_SERVERS, "SECRET_KEY": "", "TUNEPLEX_ENGINE_API_KEY": ENGINE_KEY}, "SECRET_KEY"),
    ({**SHARED_SERVERS, "TUNEPLEX_ENGINE_API_KEY": ENGINE_KEY}, "SECRET_KEY"),
    ({**SHARED_SERVERS, "SECRET_KEY": SECRET, "TUNEPLEX_ENGINE_API_KEY": ""}, "TUNEPLEX_ENGINE_API_KEY"),
    ({"TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": "http://10.0.0.4:8100"},
     "TUNEPLEX_ENGINE_API_KEY"),
    ({"TUNEPLEX_STORAGE": "s3", "TUNEPLEX_S3_BUCKET": "b", "TUNEPLEX_ENGINE_API_KEY": " "},
     "TUNEPLEX_ENGINE_API_KEY"),
    (ENGINE_NODE, "TUNEPLEX_ENGINE_API_KEY"),
], ids=["empty-secret-key", "no-secret-key", "empty-engine-key", "remote-engines", "aws-s3",
        "engine-node"])
def test_an_install_across_machines_refuses_to_start_without_its_shared_secrets(environment, missing):
    result = _load_settings(**environment)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert f"{missing} is required" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("environment", [
    {},  # the embedded default
    # one machine: its processes share the data folder, hence the generated keys
    {"DATABASE_URL": "postgres://u@127.0.0.1:5432/x", "REDIS_URL": "redis://localhost:6379/3",
     "TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": "http://127.0.0.1:8100",
     "TUNEPLEX_STORAGE": "s3", "TUNEPLEX_S3_BUCKET": "b", "TUNEPLEX_S3_ENDPOINT_URL": "http://[::1]:9000"},
    {**SHARED_SERVERS, "SECRET_KEY": SECRET, "TUNEPLEX_ENGINE_API_KEY": ENGINE_KEY},
    # an engine node gets no broker and signs nothing: the engine key alone
    {**ENGINE_NODE, "TUNEPLEX_ENGINE_API_KEY": ENGINE_KEY},
], ids=["embedded", "one-machine", "given", "engine-node"])
def test_installs_with_their_secrets_or_on_one_machine_start(environment):
    result = _load_settings(SECRET_KEY="", **environment) if "SECRET_KEY" not in environment \
        else _load_settings(**environment)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_pool_agent_reads_storage_with_its_own_credentials():
    code = ("import json, django; from django.conf import settings; django.setup(); "
            "print(json.dumps({alias: settings.STORAGES[alias]['OPTIONS'].get('access_key') "
            "for alias in ('artifacts', 'serving')}))")

    def keys(**overrides: str) -> dict:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEPLEX_", "DJANGO_"))}
        environ.update({"TUNEPLEX_DATA_DIR": os.environ["TUNEPLEX_DATA_DIR"], "TUNEPLEX_STORAGE": "s3",
                        "TUNEPLEX_S3_BUCKET": "b", "TUNEPLEX_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                        "DJANGO_SETTINGS_MODULE": "tuneplex.settings"}, **overrides)
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    assert keys(TUNEPLEX_AGENT_S3_ACCESS_KEY_ID="agent-reader", TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY="x") \
        == {"artifacts": None, "serving": "agent-reader"}
    assert keys() == {"artifacts": None, "serving": None}  # the platform's (from AWS_*), with a warning
    half = _load_settings(TUNEPLEX_AGENT_S3_ACCESS_KEY_ID="agent-reader")
    assert half.returncode != 0 and "TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY" in half.stderr
