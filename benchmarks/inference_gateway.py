"""Serving: our gateway against vLLM directly, job success to first token, mixed adapters.

    .venv/bin/python benchmarks/inference_gateway.py [--requests 48] [--concurrency 8] [--max-tokens 32]

Starts everything it needs on this machine and stops it at the end, even on failure: a serving
replica of the embedded base model (`manage.py run_engine`: vLLM CPU with its pool agent, the
README's engine settings and the install's engine key), the platform
under uvicorn (the real gateway, attached to that replica) on a scratch data folder (var/bench;
DATABASE_URL and REDIS_URL are honoured), and LoRA adapters made with peft
(tests/fixtures/make_adapters.py, r=8 on q_proj/v_proj). Then, in one run:

1. the same load (``--requests`` chat completions, ``--concurrency`` at a time, ``--max-tokens``
   each, base model) straight to vLLM and through /v1/chat/completions, alternated over
   ``--rounds`` rounds: output tokens/s and p50/p95 latency; plus sequential one-token requests
   over kept-alive connections, whose p50 difference is the gateway's own cost per request (under
   load the difference also holds the CPU the gateway takes from vLLM on a 2-core machine).
   Targets: >= 0.95x throughput, <= 5 ms added p50.
2. job success to first token: ``job_succeed`` (what the GPU worker calls when training ends;
   it auto-deploys the adapter, there being no deploy gate), then at once a streaming request for the adapter through the
   gateway; the time to its first content token. Target <= 2 s here.
3. mixed-adapter throughput through the gateway: requests spread round-robin over 1, 4 and 8
   adapters, against the base model alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setup_django() -> None:
    # A SIGTERM (e.g. from `timeout`) unwinds like an exception, so the `finally` blocks stop the
    # replica and gateways this run started instead of leaving them behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    os.environ.setdefault("TUNEPLEX_DATA_DIR", str(REPO / "var" / "bench"))
    os.environ.setdefault("TUNEPLEX_MODELS_DIR", str(REPO / "var" / "models"))
    os.environ["TUNEPLEX_ENGINE_MODE"] = "off"  # set to the replica started below, once it runs
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tuneplex.settings")
    import django

    django.setup()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def load(url: str, key: str | None, models: list[str], *, requests: int, concurrency: int,
               max_tokens: int) -> dict:
    """``requests`` chat completions, ``concurrency`` in flight, models taken round-robin."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    latencies: list[float] = []
    tokens = 0
    queue = list(range(requests))

    async def worker(client):
        nonlocal tokens
        while queue:
            index = queue.pop()
            body = {"model": models[index % len(models)], "max_tokens": max_tokens,
                    # Every answer runs to max_tokens: the end-of-text tokens are banned through
                    # OpenAI's logit_bias (the gateway forwards no engine-specific fields).
                    "temperature": 0, "logit_bias": {"0": -100, "2": -100},
                    "messages": [{"role": "user", "content": f"Tell me a story about number {index}."}]}
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "p50_ms": 1000 * percentile(latencies, 0.5),
            "p95_ms": 1000 * percentile(latencies, 0.95), "requests": requests, "tokens": tokens,
            "latencies": latencies}


async def one_token_latencies(direct_url: str, gateway_url: str, key: str, model: str, engine_key: str,
                              rounds: int = 10, per_round: int = 20) -> tuple[list[float], list[float]]:
    """Sequential one-token completions over kept-alive connections, alternating direct and
    gateway rounds: the difference of their medians is the gateway's own cost per request
    (200 a side: with 60, the medians of ~80 ms requests moved by several ms between runs)."""
    import httpx

    body = {"model": model, "prompt": "Hello", "max_tokens": 1}
    direct, ours = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(rounds):
            for url, headers, out in ((direct_url, {"Authorization": f"Bearer {engine_key}"}, direct),
                                      (gateway_url, {"Authorization": f"Bearer {key}"}, ours)):
                for _ in range(per_round):
                    start = time.perf_counter()
                    (await client.post(f"{url}/v1/completions", json=body, headers=headers)).raise_for_status()
                    out.append(time.perf_counter() - start)
    return direct, ours


async def first_token(url: str, key: str, model: str) -> float:
    """Seconds until the first content token of a streamed chat completion."""
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{url}/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {key}"},
                                 json={"model": model, "max_tokens": 8, "stream": True,
                                       "messages": [{"role": "user", "content": "Hello!"}]}) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"{reply.status_code}: {(await reply.aread())[:300]!r}")
            async for line in reply.aiter_lines():
                if line.startswith("data: {") and '"content":"' in line:
                    return time.perf_counter() - start
    raise RuntimeError("no token came back")


class Child:
    def __init__(self, command: list[str], env: dict, log: Path, cwd: Path = REPO) -> None:
        self.log = log
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        from serving.engine import stop_process_group

        stop_process_group(self.process)


def bench_setup(adapter_count: int):
    """Migrated scratch database, the embedded base model, a tenant and ``adapter_count`` LoRA
    adapter directories (made once with peft): (base model, organization, key, directories)."""
    from django.conf import settings
    from django.core.management import call_command

    from tuneplex.basemodels.models import BaseModel

    (settings.DATA_DIR / "logs").mkdir(parents=True, exist_ok=True)
    call_command("migrate", verbosity=0)
    call_command("prepare_default_model")
    base = BaseModel.objects.get(name=settings.DEFAULT_BASE_MODEL)
    adapters_dir = settings.DATA_DIR / "bench-adapters"
    if len(list(adapters_dir.glob("adapter-*"))) < adapter_count:
        print(f"making {adapter_count} LoRA adapters with peft ...", flush=True)
        subprocess.run([str(settings.TRAINER_PYTHON), str(REPO / "tests/fixtures/make_adapters.py"),
                        base.directory, str(adapters_dir), str(adapter_count)], cwd=REPO, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    sources = sorted(adapters_dir.glob("adapter-*"), key=lambda p: int(p.name.split("-")[1]))
    return base, *bench_tenant(), sources


def bench_tenant():
    """A fresh organization and a full-scope key of its owner (Django set up)."""
    from tuneplex.apikeys.services import api_key_create
    from tuneplex.core.actors import Principal
    from tuneplex.core.scopes import ALL_SCOPES
    from tuneplex.tenancy.models import Membership, User
    from tuneplex.tenancy.services import organization_create

    stamp = f"{int(time.time())}-{os.urandom(3).hex()}"  # two tenants may be made in one second
    owner = User.objects.create_user(f"bench-{stamp}")
    organization = organization_create(name=f"Bench {stamp}", owner=owner)
    principal = Principal.of_member(Membership.objects.get(organization=organization, user=owner))
    return organization, api_key_create(organization=organization, actor=principal, name="bench",
                                        scopes=list(ALL_SCOPES)).plaintext


def _ready(agent_url: str, engine_key: str) -> bool:
    import httpx

    from serving.engine import auth_headers

    try:
        return bool(httpx.get(f"{agent_url}/v1/state", headers=auth_headers(engine_key),
                              timeout=2).json().get("ready"))
    except (httpx.HTTPError, ValueError):
        return False


def wait_http(url: str, timeout: float, what: str, child) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{what} exited; see {child.log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start within {timeout:.0f}s; see {child.log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-mixed", action="store_true",
                        help="skip the mixed-adapter phase (the longest)")
    args = parser.parse_args()

    _setup_django()
    import httpx
    from django.conf import settings

    from jobs.training.layout import sha256_of
    from tests.fixtures.adapter_rows import adapter_from_dir
    from tuneplex.finetuning.models import FineTuningJob
    from tuneplex.finetuning.services.worker_writes import job_succeed

    base, organization, key, sources = bench_setup(13)
    logs = settings.DATA_DIR / "logs"

    agent_port = _free_port()
    agent_url, engine_url = f"http://127.0.0.1:{agent_port}", f"http://127.0.0.1:{agent_port + 1}"
    engine_key = settings.ENGINE_API_KEY
    engine = None
    gateway = None
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                     "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
                     "redis": bool(settings.REDIS_URL), "engine_slots": settings.ENGINE_LORA_SLOTS,
                     "engine_max_loras": settings.ENGINE_MAX_LORAS,
                     "load": {"requests": args.requests, "concurrency": args.concurrency,
                              "max_tokens": args.max_tokens}}
    try:
        print("starting a replica (vLLM + pool agent) ...", flush=True)
        engine = Child([sys.executable, "manage.py", "run_engine", "--port", str(agent_port),
                        "--timeout", "400"], {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'platform'}"},
                       logs / "bench-replica.log")
        deadline = time.monotonic() + 400
        while not _ready(agent_url, engine_key):
            if engine.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not start; see {engine.log}")
            time.sleep(1)
        port = _free_port()
        gateway = Child([str(REPO / ".venv/bin/uvicorn"), "tuneplex.asgi:application", "--host", "127.0.0.1",
                         "--port", str(port), "--no-access-log", "--log-level", "warning"],
                        {**os.environ, "TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": agent_url,
                         "TUNEPLEX_INFERENCE_RATE_LIMIT": "1000000"}, logs / "bench-gateway.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", 60, "the gateway", gateway)
        api = httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120)

        mixed = [adapter_from_dir(organization, source, suffix=f"mix{i}", base_model=base)
                 for i, source in enumerate(sources[:8])]
        for adapter in mixed:
            response = api.post(f"/adapters/{adapter.id}/deploy", json={})
            response.raise_for_status()

        run = asyncio.run
        common = dict(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens)
        run(load(engine_url, engine_key, [base.name], requests=8, concurrency=4, max_tokens=8))  # warm-up
        run(load(url, key, [base.name], requests=8, concurrency=4, max_tokens=8))

        # 1. gateway against vLLM directly, same load, alternated.
        direct, ours = [], []
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}: direct, then through the gateway ...", flush=True)
            direct.append(run(load(engine_url, engine_key, [base.name], **common)))
            ours.append(run(load(url, key, [base.name], **common)))
        single_direct, single_ours = run(one_token_latencies(engine_url, url, key, base.name, engine_key))
        def pooled(runs):
            latencies = [x for r in runs for x in r["latencies"]]
            return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                    "p50_ms": 1000 * percentile(latencies, 0.5), "p95_ms": 1000 * percentile(latencies, 0.95)}

        results["direct"], results["gateway"] = pooled(direct), pooled(ours)
        results["throughput_ratio"] = results["gateway"]["tokens_per_s"] / results["direct"]["tokens_per_s"]
        results["added_p50_ms_under_load"] = results["gateway"]["p50_ms"] - results["direct"]["p50_ms"]
        results["one_token_p50_ms"] = {"direct": 1000 * percentile(single_direct, 0.5),
                                       "gateway": 1000 * percentile(single_ours, 0.5)}
        results["added_p50_ms_one_token"] = (results["one_token_p50_ms"]["gateway"]
                                             - results["one_token_p50_ms"]["direct"])

        # 2. job success -> first token, through the worker's success path (auto-deploy; this
        # process plays the GPU worker, which shares the web processes' engine settings).
        settings.ENGINE_REPLICAS = {base.name: [agent_url]}
        firsts = []
        for index, source in enumerate(sources[8:13]):
            job = FineTuningJob.objects.create(organization=organization, base_model=base,
                                               training_file="file-bench", suffix=f"fresh{index}",
                                               seed=0, status=FineTuningJob.Status.RUNNING)
            start = time.perf_counter()
            job_succeed(job=job, attempt=job.attempts, adapter_dir=source,
                        result={"sha256": sha256_of(source), "steps": 1})
            job.refresh_from_db()
            firsts.append(time.perf_counter() - start + run(first_token(url, key, job.fine_tuned_model)))
        results["success_to_first_token_s"] = {"each": firsts, "median": statistics.median(firsts),
                                               "max": max(firsts)}

        # 3. mixed adapters through the gateway against the base model alone.
        mixed_runs = {"base": run(load(url, key, [base.name], **common))}
        for count in () if args.no_mixed else (1, 4, 8):
            print(f"mixed: {count} adapters ...", flush=True)
            mixed_runs[f"{count}_adapters"] = run(load(url, key, [a.name for a in mixed[:count]], **common))
        results["mixed"] = {name: {"tokens_per_s": r["tokens_per_s"], "p50_ms": r["p50_ms"],
                                   "vs_base": r["tokens_per_s"] / mixed_runs["base"]["tokens_per_s"]}
                            for name, r in mixed_runs.items()}
    finally:
        if gateway is not None:
            gateway.stop()
        if engine is not None:
            engine.stop()

    d, g = results["direct"], results["gateway"]
    print(f"\nload: {args.requests} chat requests, {args.concurrency} concurrent, {args.max_tokens} tokens "
          f"each, {args.rounds} alternated rounds; engine slots {settings.ENGINE_LORA_SLOTS}, "
          f"max_loras {settings.ENGINE_MAX_LORAS}; {results['database']}, redis={results['redis']}")
    print(f"{'':24}{'tokens/s':>10}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'vLLM directly':24}{d['tokens_per_s']:10.1f}{d['p50_ms']:10.1f}{d['p95_ms']:10.1f}")
    print(f"{'through the gateway':24}{g['tokens_per_s']:10.1f}{g['p50_ms']:10.1f}{g['p95_ms']:10.1f}")
    print(f"throughput ratio {results['throughput_ratio']:.3f}x (target >= 0.95); added p50 under load "
          f"{results['added_p50_ms_under_load']:+.1f} ms; one-token requests p50 "
          f"{results['one_token_p50_ms']['direct']:.1f} -> {results['one_token_p50_ms']['gateway']:.1f} ms: "
          f"added {results['added_p50_ms_one_token']:+.1f} ms (target <= 5)")
    s = results["success_to_first_token_s"]
    print(f"job success -> first token: median {s['median']:.3f} s, max {s['max']:.3f} s (target <= 2 s)")
    for name, r in results["mixed"].items():
        print(f"mixed {name:12} {r['tokens_per_s']:8.1f} tokens/s  p50 {r['p50_ms']:8.1f} ms  "
              f"{r['vs_base']:.2f}x base")
    if args.json:
        for part in ("direct", "gateway"):
            results[part].pop("latencies", None)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
