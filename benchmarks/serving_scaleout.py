"""Serving scale-out: cold-load latency, pool agent vs the previous in-process pool; gateway
throughput with two processes vs one.

    .venv/bin/python benchmarks/serving_scaleout.py [--legacy-rev 1dbb57d] [--json PATH]

In one run, on a scratch data folder (var/bench-scaleout; DATABASE_URL/REDIS_URL honoured), two
setups side by side, measured in alternated rounds so that other load on the machine falls on both:

- **before**: the code at ``--legacy-rev`` (each web process kept its own pool and loaded adapters
  under its lock; no engine key), extracted with ``git archive``: a vLLM replica and its gateway;
- **after**: this tree: ``manage.py run_engine`` (vLLM + its pool agent) and the gateway, once as
  one uvicorn process and once as two (``--workers 2``).

1. cold loads: ``--adapters`` adapters deployed on 4 slots, one-token requests to them in turn,
   so each finds its adapter evicted (cold); the same adapter again right after is warm; cold
   minus warm is the load's own cost.
2. gateway processes: the base model under ``--concurrency`` clients, and admission alone (an
   unknown model: key, rate limit, body checks, lookup, 404), through one process and two.

Two vLLM replicas at once: about 6 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]
os.environ.setdefault("TUNEPLEX_DATA_DIR", str(REPO / "var" / "bench-scaleout"))

from benchmarks.inference_gateway import (  # noqa: E402
    Child,
    _free_port,
    _ready,
    _setup_django,
    bench_setup,
    load,
    percentile,
    wait_http,
)

SLOTS = 4


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": 1000 * percentile(values, 0.5),
            "p95_ms": 1000 * percentile(values, 0.95), "mean_ms": 1000 * statistics.mean(values)}


def cold_and_warm(url: str, key: str, names: list[str], rounds: int) -> tuple[list[float], list[float]]:
    """One-token completions on each adapter in turn (evicted since its last use: cold), each
    followed by a second one on the same adapter (warm)."""
    import httpx

    cold, warm = [], []
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(rounds):
            for name in names:
                for out in (cold, warm):
                    start = time.perf_counter()
                    reply = client.post("/v1/completions", json={"model": name, "prompt": "Hello",
                                                                 "max_tokens": 1})
                    out.append(time.perf_counter() - start)
                    if reply.status_code != 200:
                        raise RuntimeError(f"{name}: {reply.status_code} {reply.text[:300]}")
    return cold, warm


async def admissions(url: str, key: str, requests: int, concurrency: int) -> float:
    """Requests per second that the gateway admits and answers alone (an unknown model: 404)."""
    import httpx

    body = {"model": "ft:no-such-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    remaining = list(range(requests))

    async def worker(client):
        while remaining:
            remaining.pop()
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 404

    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return requests / (time.perf_counter() - start)


def deploy_all(url: str, key: str, adapters) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for adapter in adapters:
            client.post(f"/v1/adapters/{adapter.id}/deploy", json={}).raise_for_status()


def gateway(env: dict, log: Path, *, workers: int = 1, cwd: Path = REPO) -> tuple[Child, str]:
    """uvicorn with ``workers`` processes (it imports the app from its working directory)."""
    port = _free_port()
    child = Child([str(REPO / ".venv/bin/uvicorn"), "tuneplex.asgi:application", "--host", "127.0.0.1",
                   "--port", str(port), "--no-access-log", "--log-level", "warning",
                   "--workers", str(workers)], env, log, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", 90, "the gateway", child)
    return child, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--legacy-rev", default="1dbb57d")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--cold-rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--admissions", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    os.environ["TUNEPLEX_ENGINE_LORA_SLOTS"] = str(SLOTS)
    os.environ["TUNEPLEX_INFERENCE_RATE_LIMIT"] = "1000000"
    _setup_django()
    from django.conf import settings

    from serving.engine import EngineProcess, EngineSpec
    from tests.fixtures.adapter_rows import adapter_from_dir

    base, organization, key, sources = bench_setup(4)
    data_dir = settings.DATA_DIR
    logs = data_dir / "logs"
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "slots": SLOTS,
                     "adapters": args.adapters, "legacy_rev": args.legacy_rev,
                     "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]}
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    legacy = data_dir / "legacy"
    if not (legacy / "manage.py").exists():
        legacy.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.legacy_rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(legacy)], input=archive, check=True)
    old_rows = [adapter_from_dir(organization, sources[i % len(sources)], suffix=f"old{i}", base_model=base)
                for i in range(args.adapters)]
    new_rows = [adapter_from_dir(organization, sources[i % len(sources)], suffix=f"new{i}", base_model=base)
                for i in range(args.adapters)]
    with ExitStack() as stack:
        # Both designs run side by side and are measured in alternated rounds, so that the load
        # other work puts on this machine falls on both alike.
        print("starting: vLLM + the previous gateway, and a replica (vLLM + pool agent) + this gateway ...",
              flush=True)
        engine = EngineProcess(EngineSpec(python=settings.ENGINE_PYTHON, model_dir=base.directory,
                                          served_name=base.name, port=_free_port(), max_loras=2,
                                          max_cpu_loras=SLOTS, max_model_len=1024),
                               logs / "bench-legacy-engine.log")
        engine.start()
        stack.callback(engine.stop)
        agent_port = _free_port()
        env = {**base_env, "PYTHONPATH": f"{REPO}:{REPO / 'platform'}", "TUNEPLEX_ENGINE_MAX_LORAS": "2",
               "TUNEPLEX_ENGINE_MAX_MODEL_LEN": "1024", "TUNEPLEX_ENGINE_RECONCILE_SECONDS": "3600"}
        replica = Child([sys.executable, "manage.py", "run_engine", "--port", str(agent_port),
                         "--timeout", "400"], env, logs / "bench-replica.log")
        stack.callback(replica.stop)
        engine.wait_ready(timeout=400)
        agent = f"http://127.0.0.1:{agent_port}"
        deadline = time.monotonic() + 400
        while not _ready(agent, settings.ENGINE_API_KEY):
            if replica.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not start; see {replica.log}")
            time.sleep(1)
        old_env = {**base_env, "PYTHONPATH": f"{legacy}:{legacy / 'platform'}", "TUNEPLEX_ENGINE_MODE": "attach",
                   "TUNEPLEX_ENGINE_URLS": engine.url, "TUNEPLEX_ENGINE_RECONCILE_SECONDS": "3600"}
        old, old_url = gateway(old_env, logs / "bench-legacy-gateway.log", cwd=legacy)
        stack.callback(old.stop)
        env = {**env, "TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": agent}
        one, url = gateway(env, logs / "bench-gateway-1.log")
        stack.callback(one.stop)
        two, url2 = gateway(env, logs / "bench-gateway-2.log", workers=2)
        stack.callback(two.stop)
        deploy_all(old_url, key, old_rows)
        deploy_all(url, key, new_rows)

        # 1. cold loads, before and after, alternated.
        cold_and_warm(old_url, key, [r.name for r in old_rows], 1)  # fills the slots
        cold_and_warm(url, key, [r.name for r in new_rows], 1)
        pairs: dict[str, tuple[list, list]] = {"before": ([], []), "after": ([], [])}
        for round_ in range(args.cold_rounds):
            print(f"cold loads, round {round_ + 1}: before, then after ...", flush=True)
            for name, target, rows in (("before", old_url, old_rows), ("after", url, new_rows)):
                cold, warm = cold_and_warm(target, key, [r.name for r in rows], 1)
                pairs[name][0].extend(cold)
                pairs[name][1].extend(warm)
        for name, (cold, warm) in pairs.items():
            results[name] = {"cold": summary(cold), "warm": summary(warm),
                             "load_cost": summary([c - w for c, w in zip(cold, warm)])}

        # 2. one gateway process against two, alternated: the base model through the engine,
        # and admission alone (a model that does not exist: key, rate limit, body, lookup, 404).
        common = dict(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens)
        asyncio.run(load(url, key, [base.name], requests=8, concurrency=4, max_tokens=4))
        asyncio.run(load(url2, key, [base.name], requests=8, concurrency=4, max_tokens=4))
        runs: dict[str, list] = {"one_process": [], "two_processes": []}
        admitted: dict[str, list] = {"one_process": [], "two_processes": []}
        for round_ in range(args.rounds):
            print(f"gateway processes, round {round_ + 1}: one, then two ...", flush=True)
            for name, target in (("one_process", url), ("two_processes", url2)):
                runs[name].append(asyncio.run(load(target, key, [base.name], **common)))
                admitted[name].append(asyncio.run(admissions(target, key, args.admissions, 32)))
        results["gateway_processes"] = {
            name: {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
                   "p50_ms": 1000 * percentile([x for r in rs for x in r["latencies"]], 0.5),
                   "admissions_per_s": statistics.mean(admitted[name])}
            for name, rs in runs.items()}
        results["gateway_processes"]["load"] = {**common, "admissions": args.admissions}

    print(f"\ncold load + one-token request, {args.adapters} adapters on {SLOTS} slots, sequential, "
          f"{args.cold_rounds} alternated rounds:")
    print(f"{'':30}{'cold p50':>10}{'cold p95':>10}{'warm p50':>10}{'load p50':>10}{'load p95':>10}")
    for label, name in (("before (per-process pool)", "before"), ("after (pool agent, leases)", "after")):
        r = results[name]
        print(f"{label:30}{r['cold']['p50_ms']:10.1f}{r['cold']['p95_ms']:10.1f}{r['warm']['p50_ms']:10.1f}"
              f"{r['load_cost']['p50_ms']:10.1f}{r['load_cost']['p95_ms']:10.1f}")
    g = results["gateway_processes"]
    print(f"base model, {args.requests} requests, {args.concurrency} concurrent, {args.max_tokens} tokens; "
          f"{args.admissions} admission-only requests, 32 concurrent:")
    for name in ("one_process", "two_processes"):
        print(f"  {name:14} {g[name]['tokens_per_s']:8.1f} tokens/s  p50 {g[name]['p50_ms']:8.1f} ms  "
              f"{g[name]['admissions_per_s']:8.1f} admissions/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
