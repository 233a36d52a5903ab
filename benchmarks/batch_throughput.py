"""Batches: a batch through the serving pool against the same requests sent one by one, and an
interactive client's latency while the batch runs.

    .venv/bin/python benchmarks/batch_throughput.py [--requests 500] [--max-tokens 16] [--json PATH]

Starts everything it needs on this machine and stops it at the end, even on failure, as
benchmarks/eval_throughput.py does (its start_stack: a replica of the embedded base model that
schedules by priority, the platform under uvicorn, a worker of the `evals` queue, the queue of
background inference), on a scratch data folder (var/bench; DATABASE_URL and REDIS_URL are
honoured). In one run:

1. one by one: the batch's requests (chat completions, temperature 0, ``--max-tokens``) sent
   through /v1/chat/completions one after the other: requests per second.
2. the interactive client alone: ``--probes`` sequential chat completions (``--think`` seconds
   apart, as a person reads each answer): p50 and p95 latency.
3. the batch: its input file uploaded (purpose batch) and the batch created through the API,
   timed from its creation until it is completed: requests per second; meanwhile the interactive
   client's probes again, as in 2, for as long as the batch lasts.

The interactive client is the batch's own organization (``--probe-org same``, the default: its
requests share its limits with the batch) or another (``other``). Targets (issue 29): the
interactive p95 during the batch <= 1.5x its p95 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]

from benchmarks.eval_throughput import (  # noqa: E402
    chat_bodies,
    items,
    latency,
    probes,
    send_one_by_one,
    start_stack,
)
from benchmarks.inference_gateway import Child, _setup_django, bench_setup, bench_tenant  # noqa: E402


async def batch_run(url: str, key: str, bodies: list[dict], probe_key: str, model: str,
                    max_tokens: int, think: float) -> tuple[dict, list[float]]:
    """The batch, timed from its creation until it ends, with the probes meanwhile."""
    import httpx

    lines = "".join(json.dumps({"custom_id": f"request-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n"
                    for i, body in enumerate(bodies))
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as api:
        uploaded = await api.post("/files", data={"purpose": "batch"},
                                  files={"file": ("batch.jsonl", lines.encode())})
        uploaded.raise_for_status()
        done = asyncio.Event()
        probing = asyncio.create_task(probes(url, probe_key, model, max_tokens, think=think,
                                             until=done))
        start = time.perf_counter()
        created = await api.post("/batches", json={
            "input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        created.raise_for_status()
        batch = created.json()
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.5)
            batch = (await api.get(f"/batches/{batch['id']}")).json()
        seconds = time.perf_counter() - start
        done.set()
        latencies = await probing
        output = (await api.get(f"/files/{batch['output_file_id']}/content")).text \
            if batch["output_file_id"] else ""
    if batch["status"] != "completed":
        raise RuntimeError(f"the batch ended {batch['status']}: {batch['errors']}")
    return ({"requests": len(bodies), "seconds": seconds, "requests_per_s": len(bodies) / seconds,
             "request_counts": batch["request_counts"], "usage": batch["usage"],
             "output_lines": len(output.splitlines())}, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=30, help="the interactive client's requests alone")
    parser.add_argument("--think", type=float, default=1.0, help=(
        "seconds between the interactive client's requests (a person reading each answer); "
        "0 sends them back to back"))
    parser.add_argument("--probe-org", choices=["same", "other"], default="same",
                        help="the interactive client: the batch's organization, or another")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    _setup_django()
    from django.conf import settings

    base, _, key, _ = bench_setup(0)
    probe_key = key if args.probe_org == "same" else bench_tenant()[1]
    bodies = chat_bodies(base.name, items(args.requests), args.max_tokens)
    children: list[Child] = []
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                     "requests": args.requests, "max_tokens": args.max_tokens,
                     "probe_org": args.probe_org, "think_seconds": args.think,
                     "batch_concurrency": settings.BATCH_CONCURRENCY,
                     "batch_concurrency_beside_interactive":
                         settings.BATCH_CONCURRENCY_BESIDE_INTERACTIVE,
                     "batch_priority": settings.BATCH_PRIORITY,
                     "priority_scheduling": settings.ENGINE_PRIORITY_SCHEDULING}
    try:
        url = start_stack(children)
        run = asyncio.run
        run(probes(url, probe_key, base.name, args.max_tokens, think=0, count=4))  # warm-up
        print(f"1. {args.requests} requests one by one ...", flush=True)
        seconds, _ = run(send_one_by_one(url, key, bodies))
        results["one_by_one"] = {"requests": len(bodies), "seconds": seconds,
                                 "requests_per_s": len(bodies) / seconds}
        print("2. the interactive client alone ...", flush=True)
        results["interactive_alone"] = latency(run(probes(
            url, probe_key, base.name, args.max_tokens, think=args.think, count=args.probes)))
        print(f"3. the batch of {args.requests} requests, the interactive client meanwhile ...",
              flush=True)
        results["batch"], during = run(batch_run(url, key, bodies, probe_key, base.name,
                                                 args.max_tokens, args.think))
        results["interactive_during_batch"] = latency(during)
    finally:
        for child in reversed(children):
            child.stop()

    one, batch = results["one_by_one"], results["batch"]
    alone, during = results["interactive_alone"], results["interactive_during_batch"]
    results["batch_vs_one_by_one"] = batch["requests_per_s"] / one["requests_per_s"]
    results["interactive_p95_during_vs_alone"] = during["p95_ms"] / alone["p95_ms"]
    results["interactive_p50_during_vs_alone"] = during["p50_ms"] / alone["p50_ms"]
    print(f"\n{args.requests} requests, {args.max_tokens} tokens each, batch concurrency "
          f"{settings.BATCH_CONCURRENCY} ({settings.BATCH_CONCURRENCY_BESIDE_INTERACTIVE} beside "
          f"interactive), priority scheduling {settings.ENGINE_PRIORITY_SCHEDULING}")
    print(f"one by one:  {one['requests_per_s']:.2f} requests/s ({one['seconds']:.1f} s)")
    print(f"batch:       {batch['requests_per_s']:.2f} requests/s ({batch['seconds']:.1f} s, "
          f"{batch['output_lines']} output lines): {results['batch_vs_one_by_one']:.2f}x")
    print(f"interactive ({args.probe_org} organization) p95: {alone['p95_ms']:.0f} ms alone, "
          f"{during['p95_ms']:.0f} ms during the batch ({during['n']} requests): "
          f"{results['interactive_p95_during_vs_alone']:.2f}x (target <= 1.5x); p50 "
          f"{alone['p50_ms']:.0f} -> {during['p50_ms']:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
