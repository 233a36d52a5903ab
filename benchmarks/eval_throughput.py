"""Evaluation: an eval run through the serving pool against the same requests sent one by one,
and another organization's interactive latency while the run goes on.

    .venv/bin/python benchmarks/eval_throughput.py [--items 200] [--max-tokens 16] [--json PATH]

Starts everything it needs on this machine and stops it at the end, even on failure: a serving
replica of the embedded base model (`manage.py run_engine`: vLLM CPU with its pool agent, which
schedules by priority), the platform under uvicorn attached to it, and a Celery worker of the
`evals` queue (TUNEPLEX_EVAL_CONCURRENCY as configured, 8 by default), on a scratch data folder
(var/bench; DATABASE_URL and REDIS_URL are honoured). Two organizations: one evaluates, the
other chats. In one run:

1. one by one: the run's requests (each item's rendered chat, temperature 0, ``--max-tokens``)
   sent through /v1/chat/completions one after the other and graded with the same string
   grader in this process: items per second.
2. the other organization alone: ``--probes`` sequential chat completions (``--max-tokens``
   each, ``--think`` seconds apart, as a person reads each answer): p50 and p95 latency.
3. the eval run: an eval with that grader and a completions run of ``--items`` items through
   the API, timed from the run's creation until it is completed: items per second; meanwhile the
   other organization's probes again, as in 2, for as long as the run lasts.

Targets (issue 25): the run >= 3x the one-by-one rate; the other organization's p50 latency
during the run <= 1.5x its latency alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]

from benchmarks.inference_gateway import (  # noqa: E402
    Child,
    _free_port,
    _ready,
    _setup_django,
    bench_setup,
    bench_tenant,
    percentile,
    wait_http,
)

CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Lisbon", "Vienna", "Athens", "Dublin", "Oslo",
          "Warsaw"]
COUNTRIES = ["France", "Italy", "Spain", "Germany", "Portugal", "Austria", "Greece", "Ireland",
             "Norway", "Poland"]
TEMPLATE = [{"role": "user", "content": "What is the capital of {{item.country}}? (question "
                                        "{{item.n}})"}]
GRADER = {"type": "string_check", "name": "names the capital", "operation": "ilike",
          "input": "{{sample.output_text}}", "reference": "{{item.capital}}"}


def items(count: int) -> list[dict]:
    return [{"country": COUNTRIES[i % 10], "capital": CITIES[i % 10], "n": i} for i in range(count)]


async def send_one_by_one(url: str, key: str, bodies: list[dict],
                          endpoint: str = "chat/completions") -> tuple[float, list[dict]]:
    """Each request body sent to /v1/``endpoint`` after the previous one is answered: the
    seconds it took, and the answers."""
    import httpx

    answers = []
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for body in bodies:
            reply = await client.post(f"{url}/v1/{endpoint}", json=body)
            reply.raise_for_status()
            answers.append(reply.json())
    return time.perf_counter() - start, answers


def chat_bodies(model: str, entries: list[dict], max_tokens: int) -> list[dict]:
    """The run's requests: each item's rendered chat, as the run sends it."""
    import jobs.grading as grading

    return [{"model": model, "temperature": 0, "max_completion_tokens": max_tokens, "messages": [
        {"role": m["role"], "content": grading.render(m["content"], item=item, sample=None)}
        for m in TEMPLATE]} for item in entries]


async def one_by_one(url: str, key: str, model: str, entries: list[dict], max_tokens: int) -> dict:
    """The run's requests, one after the other, each graded here as the run grades it."""
    import jobs.grading as grading

    spec = grading.validate(GRADER)
    seconds, answers = await send_one_by_one(url, key, chat_bodies(model, entries, max_tokens))
    passed = sum(grading.grade(spec, item=item, sample=grading.sample_namespace(
        answer["choices"][0]["message"]["content"] or "")).passed
        for item, answer in zip(entries, answers))
    return {"items": len(entries), "seconds": seconds, "items_per_s": len(entries) / seconds,
            "passed": passed}


async def probes(url: str, key: str, model: str, max_tokens: int, *, think: float,
                 count: int | None = None, until: asyncio.Event | None = None) -> list[float]:
    """Sequential chat completions of the other organization, ``think`` seconds apart (a person
    reading the answer, or 0: back to back): their latencies (s)."""
    import httpx

    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        while (count is None or len(latencies) < count) and not (until and until.is_set()):
            if latencies and think:  # the reading time, cut short when the run ends
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait() if until else asyncio.sleep(think), think)
                if until and until.is_set():
                    break
            start = time.perf_counter()
            reply = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "temperature": 0, "max_completion_tokens": max_tokens,
                "messages": [{"role": "user", "content": "Say hello to the team."}]})
            reply.raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


async def eval_run(url: str, key: str, model: str, entries: list[dict], max_tokens: int,
                   probe_key: str, think: float) -> tuple[dict, list[float]]:
    """The eval run, timed from its creation until it is completed, with the probes meanwhile."""
    import httpx

    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as api:
        made = (await api.post("/evals", json={
            "name": "capitals", "testing_criteria": [GRADER],
            "data_source_config": {"type": "custom", "item_schema": {"type": "object"}}})).json()
        done = asyncio.Event()
        probing = asyncio.create_task(probes(url, probe_key, model, max_tokens, think=think,
                                             until=done))
        start = time.perf_counter()
        created = await api.post(f"/evals/{made['id']}/runs", json={"data_source": {
            "type": "completions", "model": model,
            "input_messages": {"type": "template", "template": TEMPLATE},
            "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens},
            "source": {"type": "file_content", "content": [{"item": item} for item in entries]}}})
        created.raise_for_status()
        run = created.json()
        while run["status"] in ("queued", "in_progress"):
            await asyncio.sleep(0.5)
            run = (await api.get(f"/evals/{made['id']}/runs/{run['id']}")).json()
        seconds = time.perf_counter() - start
        done.set()
        latencies = await probing
    if run["status"] != "completed":
        raise RuntimeError(f"the run ended {run['status']}: {run['error']}")
    return ({"items": len(entries), "seconds": seconds, "items_per_s": len(entries) / seconds,
             "result_counts": run["result_counts"], "per_model_usage": run["per_model_usage"]},
            latencies)


def charged(organization) -> Counter:
    """The organization's prompt and completion tokens counted so far (all days, all models);
    the settlements of the requests answered are written before the run shows completed."""
    from django.db.models import Sum

    from tuneplex.inference import usage
    from tuneplex.inference.models import UsageDaily

    usage.flush()
    totals = UsageDaily.objects.filter(organization=organization).aggregate(
        prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    return Counter({name: value or 0 for name, value in totals.items()})


def latency(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": 1000 * percentile(values, 0.5),
            "p95_ms": 1000 * percentile(values, 0.95), "mean_ms": 1000 * statistics.mean(values)}


def start_stack(children: list[Child]) -> str:
    """A replica of the embedded base model (vLLM + pool agent, scheduling by priority), the
    platform under uvicorn attached to it and a worker of the `evals` queue (background
    inference: eval runs and batches), appended to ``children`` as they start (the caller stops
    them); the platform's URL."""
    from django.conf import settings

    logs = settings.DATA_DIR / "logs"
    agent_port = _free_port()
    agent_url = f"http://127.0.0.1:{agent_port}"
    serving = {"TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": agent_url,
               "PYTHONPATH": f"{REPO}:{REPO / 'platform'}", "TUNEPLEX_INFERENCE_RATE_LIMIT": "1000000"}
    print("starting a replica (vLLM + pool agent) ...", flush=True)
    replica = Child([sys.executable, "manage.py", "run_engine", "--port", str(agent_port),
                     "--timeout", "400"], {**os.environ, "PYTHONPATH": serving["PYTHONPATH"]},
                    logs / "bench-replica.log")
    children.append(replica)
    deadline = time.monotonic() + 400
    while not _ready(agent_url, settings.ENGINE_API_KEY):
        if replica.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the replica did not start; see {replica.log}")
        time.sleep(1)
    port = _free_port()
    gateway = Child([str(REPO / ".venv/bin/uvicorn"), "tuneplex.asgi:application", "--host",
                     "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
                    {**os.environ, **serving}, logs / "bench-gateway.log")
    children.append(gateway)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", 60, "the gateway", gateway)
    children.append(Child([str(REPO / ".venv/bin/celery"), "-A", "jobs.celery", "worker", "--queues",
                           "evals", "--concurrency", "1", "--hostname", f"bench-evals-{os.getpid()}@%h",
                           "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
                          {**os.environ, **serving}, logs / "bench-evals-worker.log"))
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=30, help="the other organization's requests alone")
    parser.add_argument("--think", type=float, default=1.0, help=(
        "seconds between the other organization's requests (a person reading each answer); "
        "0 sends them back to back"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    _setup_django()
    from django.conf import settings

    base, evaluator, key, _ = bench_setup(0)
    _, probe_key = bench_tenant()
    children: list[Child] = []
    entries = items(args.items)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                     "items": args.items, "max_tokens": args.max_tokens,
                     "eval_concurrency": settings.EVAL_CONCURRENCY,
                     "eval_concurrency_beside_interactive":
                         settings.EVAL_CONCURRENCY_BESIDE_INTERACTIVE,
                     "think_seconds": args.think,
                     "eval_preempt": settings.EVAL_PREEMPT,
                     "eval_priority": settings.EVAL_PRIORITY,
                     "priority_scheduling": settings.ENGINE_PRIORITY_SCHEDULING}
    try:
        url = start_stack(children)

        run = asyncio.run
        run(probes(url, probe_key, base.name, args.max_tokens, think=0, count=4))  # warm-up
        print(f"1. {args.items} requests one by one ...", flush=True)
        results["one_by_one"] = run(one_by_one(url, key, base.name, entries, args.max_tokens))
        print("2. the other organization alone ...", flush=True)
        results["interactive_alone"] = latency(run(probes(
            url, probe_key, base.name, args.max_tokens, think=args.think, count=args.probes)))
        print(f"3. the eval run of {args.items} items, the other organization meanwhile ...", flush=True)
        before = charged(evaluator)
        results["eval_run"], during = run(eval_run(url, key, base.name, entries, args.max_tokens,
                                                   probe_key, args.think))
        # What the organization was charged for the run against what its answers hold: the
        # difference is the tokens of requests stopped to make room (TUNEPLEX_EVAL_PREEMPT).
        results["eval_run"]["charged"] = charged(evaluator) - before
        results["interactive_during_run"] = latency(during)
    finally:
        for child in reversed(children):
            child.stop()

    results["run_vs_one_by_one"] = results["eval_run"]["items_per_s"] / results["one_by_one"]["items_per_s"]
    results["interactive_p50_during_vs_alone"] = (results["interactive_during_run"]["p50_ms"]
                                                  / results["interactive_alone"]["p50_ms"])
    one, ev = results["one_by_one"], results["eval_run"]
    alone, during = results["interactive_alone"], results["interactive_during_run"]
    print(f"\n{args.items} items, {args.max_tokens} tokens each, eval concurrency "
          f"{settings.EVAL_CONCURRENCY}, priority scheduling {settings.ENGINE_PRIORITY_SCHEDULING}")
    print(f"one by one:  {one['items_per_s']:.2f} items/s ({one['seconds']:.1f} s)")
    print(f"eval run:    {ev['items_per_s']:.2f} items/s ({ev['seconds']:.1f} s): "
          f"{results['run_vs_one_by_one']:.2f}x (target >= 3x)")
    print(f"other organization p50: {alone['p50_ms']:.0f} ms alone, {during['p50_ms']:.0f} ms during "
          f"the run ({during['n']} requests): {results['interactive_p50_during_vs_alone']:.2f}x "
          f"(target <= 1.5x); p95 {alone['p95_ms']:.0f} -> {during['p95_ms']:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
