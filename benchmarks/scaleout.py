"""Scale-out, in one run: what issue 12 asks the benchmarks to report together.

    DATABASE_URL=postgres://... REDIS_URL=redis://... .venv/bin/python benchmarks/scaleout.py \
        [--json benchmarks/results/scaleout-cpu.json]

1. ``failover.py``: a GPU node killed mid-job; the time until the job's next step on another
   node (kill -> re-queued -> claimed -> resumed step), against a fresh start in the same run.
2. ``serving_scaleout.py``: gateway throughput with two processes vs one, and cold-load latency
   p50/p95 with the pool agents vs the previous in-process pools, in alternated rounds.

Each part starts and stops what it needs (see their docstrings); this script runs them one after
the other, so they do not share the CPU, and writes one JSON with both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_part(script: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        subprocess.run([sys.executable, str(HERE / script), "--json", str(out), *extra],
                       check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--heartbeat-timeout", type=int, default=5)
    args = parser.parse_args()
    result = {
        "failover": run_part("failover.py", ["--heartbeat-timeout", str(args.heartbeat_timeout)]),
        "serving": run_part("serving_scaleout.py", []),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
