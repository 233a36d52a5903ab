"""Run one serving replica in the foreground: a vLLM engine and its pool agent (deploy/up.sh
starts it under the supervisor; on an engine node, run one per replica).

    manage.py run_engine [--model NAME] [--port AGENT_PORT] [--engine-port PORT]
                         [--host ADDRESS] [--advertise HOST]

The pool agent (``serving/agent.py``) listens on ``--port`` and is the replica's address: it
registers itself in the fleet (Redis; ``tuneplex.inference.membership``) under the ``--advertise``
name, where gateways find it, or a gateway lists it in TUNEPLEX_ENGINE_URLS; vLLM listens on ``--engine-port`` (the next port by default). Both bind
``--host`` (TUNEPLEX_ENGINE_HOST, loopback by default; an internal address on an engine node, with
``--advertise`` naming the host the gateways should use). Both require TUNEPLEX_ENGINE_API_KEY.
With TUNEPLEX_ENGINE_TLS_CERT and _KEY both serve https (the agent reaches its vLLM, and
advertises it, by the ``--advertise`` name, which the certificate must hold; SSL_CERT_FILE names
the CA it trusts). The agent handles TUNEPLEX_AGENT_THREADS requests at once and gives each
TUNEPLEX_AGENT_READ_TIMEOUT seconds to arrive; vLLM gets an allow-listed environment
(``serving.engine.engine_env``), none of the platform's secrets.

The agent stages adapters from artifact storage into this node's TUNEPLEX_SERVING_DIR (a cache)
with its own read-only credentials when S3 is the storage (TUNEPLEX_AGENT_S3_*; a warning if not),
follows the deployed set in the database every TUNEPLEX_ENGINE_RECONCILE_SECONDS, and owns the
replica's slots. When the engine dies, this command marks the replica not ready, ends the
engine's whole process group, and starts it again with back-off (1 s doubling to 30 s); once it
answers, the deployed adapters are loaded again. SIGTERM or Ctrl-C stops everything.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from serving.adapters import AdapterInvalid
from serving.agent import AgentServer
from serving.engine import EngineProcess, EngineSpec, EngineStartError
from serving.pool import AdapterLoadError, EngineClient, ReplicaPool
from tuneplex.adapters.models import Adapter
from tuneplex.basemodels.models import BaseModel
from tuneplex.inference.membership import Heartbeat
from tuneplex.inference.replica_metrics import ReplicaMetrics
from tuneplex.inference.staging import stage_adapter

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # an engine that ran this long starts the back-off over


class Command(BaseCommand):
    help = "Run one serving replica (vLLM engine + pool agent) for a base model."

    def add_arguments(self, parser):
        parser.add_argument("--model", default=settings.DEFAULT_BASE_MODEL)
        parser.add_argument("--port", type=int, default=settings.ENGINE_PORT, help="the pool agent's port")
        parser.add_argument("--engine-port", type=int, default=None, help="vLLM's port (default: --port + 1)")
        parser.add_argument("--host", default=settings.ENGINE_HOST,
                            help="address both listen on (default: TUNEPLEX_ENGINE_HOST, loopback)")
        parser.add_argument("--advertise", default=None, help="host the gateways reach (default: --host)")
        parser.add_argument("--timeout", type=float, default=300.0, help="start-up wait, seconds")

    def handle(self, *args, model: str, port: int, engine_port: int | None, host: str,
               advertise: str | None, timeout: float, **options):
        base = BaseModel.objects.filter(name=model, enabled=True).first()
        if base is None:
            raise CommandError(f"No enabled base model named {model}; register it first.")
        if not settings.ENGINE_PYTHON.exists():
            raise CommandError(f"No engine environment at {settings.ENGINE_PYTHON}; run deploy/setup.sh.")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call otherwise
        engine_port = engine_port or port + 1
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        tls = _tls()
        scheme = "https" if tls else "http"
        spec = EngineSpec(python=settings.ENGINE_PYTHON, model_dir=base.directory, served_name=base.name,
                          host=host, port=engine_port, max_loras=settings.ENGINE_MAX_LORAS,
                          max_cpu_loras=settings.ENGINE_LORA_SLOTS,
                          max_lora_rank=settings.ENGINE_MAX_LORA_RANK,
                          max_model_len=min(settings.ENGINE_MAX_MODEL_LEN, base.max_sequence_length),
                          kv_cache_gib=settings.ENGINE_KV_CACHE_GIB, api_key=settings.ENGINE_API_KEY,
                          env_pass=settings.ENGINE_ENV_PASS,
                          priority_scheduling=settings.ENGINE_PRIORITY_SCHEDULING,
                          tls=(settings.ENGINE_TLS_CERT, settings.ENGINE_TLS_KEY) if tls else None,
                          # with TLS, by the name its certificate holds (the advertised one)
                          reach=(advertise or local) if tls else local)
        if settings.STORAGE_BACKEND == "s3" and not settings.AGENT_S3_ACCESS_KEY_ID:
            log.warning("TUNEPLEX_AGENT_S3_ACCESS_KEY_ID is not set: this replica stages adapters with "
                        "the platform's storage credentials, which can write and delete. Give it "
                        "read-only ones (docs/deploy.md).")
        engine = EngineProcess(spec, settings.DATA_DIR / "logs" / f"engine-{engine_port}.log")
        pool = ReplicaPool(EngineClient(spec.url, settings.ENGINE_API_KEY),
                           slots=settings.ENGINE_LORA_SLOTS, stage=_stager(base.name),
                           lease_seconds=settings.ENGINE_LEASE_SECONDS)
        exporter = ReplicaMetrics(pool, base.name)
        pool.on_load = exporter.on_load
        reconcile = _reconciler(pool, base.name)
        server = AgentServer((host, port), pool=pool, api_key=settings.ENGINE_API_KEY,
                             engine_url=f"{scheme}://{advertise or local}:{engine_port}", model=base.name,
                             reconcile=reconcile, metrics=exporter,
                             engine_metrics_url=f"{spec.url}/metrics", tls=tls,
                             workers=settings.AGENT_THREADS, read_timeout=settings.AGENT_READ_TIMEOUT)
        server.serve_in_thread()
        self.agent_url = f"{scheme}://{local}:{port}"
        # The gateways find it in the fleet (docs/operations.md); without Redis, only by their
        # TUNEPLEX_ENGINE_URLS.
        if host != local and not advertise:
            log.warning("--host %s without --advertise: this replica joins the fleet as %s, which "
                        "only gateways on this machine can reach", host, local)
        heartbeat = (Heartbeat(base.name, f"{scheme}://{advertise or local}:{port}",
                               state=server.state).start()
                     if settings.FLEET_REDIS_URL else None)
        threading.Thread(target=_reconcile_forever, args=(pool, reconcile), daemon=True,
                         name="pool-reconcile").start()

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            self._run(engine, pool, reconcile, timeout)
        except KeyboardInterrupt:
            pass
        finally:
            if heartbeat is not None:
                heartbeat.stop()  # leaves the fleet before the engine goes
            pool.engine_stopped()
            server.shutdown()
            server.server_close()
            engine.stop()

    def _run(self, engine: EngineProcess, pool: ReplicaPool, reconcile, timeout: float) -> None:
        """Start the engine and start it again whenever it dies. Runs on the main thread: the
        engine is told to stop when the thread that started it ends."""
        backoff, first = 1.0, True
        while True:
            engine.start()
            started = time.monotonic()
            try:
                engine.wait_ready(timeout=timeout)
            except EngineStartError as exc:
                if first:
                    raise CommandError(str(exc)) from None
                log.error("the engine did not start again: %s", exc)
            else:
                pool.engine_started()
                self.stdout.write(f"engine for {engine.spec.served_name} {'ready' if first else 'restarted and ready'} "
                                  f"at {engine.url} (pool agent: {self.agent_url}; log: {engine.log_path})",
                                  ending="\n")
                self.stdout.flush()
                first = False
                _quietly(reconcile)  # a restarted engine gets its deployed adapters back
                engine.process.wait()
            pool.engine_stopped()
            status = engine.process.returncode
            engine.stop(timeout=10)  # its engine-core helpers too, if the server died alone
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 1.0
            self.stdout.write(f"the engine exited with status {status}; starting it again in "
                              f"{backoff:.0f}s (log: {engine.log_path})", ending="\n")
            self.stdout.flush()
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


def _tls() -> ssl.SSLContext | None:
    """The agent's server context when the replica serves TLS (TUNEPLEX_ENGINE_TLS_*)."""
    if not settings.ENGINE_TLS_CERT:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.ENGINE_TLS_CERT, settings.ENGINE_TLS_KEY)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"TUNEPLEX_ENGINE_TLS_CERT/_KEY: {exc}") from None
    return context


def _stager(base_model: str):
    """Adapter id -> a validated local directory, staged from artifact storage onto this node."""
    def stage(adapter_id: str, name: str) -> str:
        try:
            adapter = Adapter.objects.select_related("base_model").filter(pk=adapter_id).first()
            if adapter is None or adapter.name != name or adapter.base_model.name != base_model:
                raise AdapterLoadError(f"No adapter {adapter_id} named {name} for {base_model}.",
                                       code="adapter_unknown")
            path, _ = stage_adapter(adapter)
            return str(path)
        except AdapterInvalid as exc:
            raise AdapterLoadError(str(exc), code=exc.code) from None
        finally:
            connections.close_all()  # this thread's; the agent's threads come and go
    return stage


def _reconciler(pool: ReplicaPool, base_model: str):
    def reconcile() -> dict:
        try:
            deployed = {name: (adapter_id, pinned) for name, adapter_id, pinned in
                        Adapter.objects.filter(deployed=True, base_model__name=base_model)
                        .values_list("name", "id", "pinned")}
        finally:
            connections.close_all()
        if not pool.ready:
            return {"unloaded": [], "loaded": []}
        return pool.reconcile(deployed)
    return reconcile


def _quietly(reconcile) -> None:
    try:
        reconcile()
    except Exception:  # the database or engine hiccuped: the next round tries again
        log.exception("pool reconciliation failed")


def _reconcile_forever(pool: ReplicaPool, reconcile) -> None:
    stop = threading.Event()
    while not stop.wait(settings.ENGINE_RECONCILE_SECONDS):
        if pool.ready:
            _quietly(reconcile)
