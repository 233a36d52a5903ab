"""How fast activations could travel between a GPU and pinned host memory, while the GPU
computes: the measure that decides whether offloading activations can hide behind compute.

    python3 benchmarks/host_link.py [--gib 1] [--json-out FILE]

Times, on a side stream, copies of ``--gib`` of bf16 from the GPU to pinned host memory and back;
alone, and while the compute stream runs bf16 GEMMs of an 8B model's MLP shape (then also the
GEMMs' slowdown). Prints GB/s per direction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    n = int(args.gib * 2**30) // 2
    gpu = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    side = torch.cuda.Stream()
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)

    def d2h():
        with torch.cuda.stream(side):
            host.copy_(gpu, non_blocking=True)

    def h2d():
        with torch.cuda.stream(side):
            gpu.copy_(host, non_blocking=True)

    def gemms(count=40):
        for _ in range(count):
            a @ b

    for fn in (d2h, h2d, gemms):  # warm up
        _timed(fn)
    nbytes = n * 2
    result = {"bytes": nbytes, "device": torch.cuda.get_device_name()}
    result["d2h_gb_s"] = nbytes / min(_timed(d2h) for _ in range(3)) / 1e9
    result["h2d_gb_s"] = nbytes / min(_timed(h2d) for _ in range(3)) / 1e9
    alone = min(_timed(gemms) for _ in range(3))

    def both(copy):
        def run():
            copy()
            gemms()
        return run

    result["gemm_seconds_alone"] = alone
    for name, copy in (("d2h", d2h), ("h2d", h2d)):
        wall = min(_timed(both(copy)) for _ in range(3))
        result[f"gemm_seconds_with_{name}"] = wall
    result["gemm_tflops"] = 40 * 2 * 8192 * 4096 * 14336 / alone / 1e12
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
