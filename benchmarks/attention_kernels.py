"""The attention kernels a long example can take, timed alone on a CUDA GPU (forward + backward).

    python3 benchmarks/attention_kernels.py --tokens 32768 [--json-out FILE]

GPU run 7 found this trainer 11% slower than stock Trainer + Liger on one 32,768-token example
(benchmarks/RESULTS.md), where attention is about a third of the FLOPs. Packed rows take
PyTorch's varlen flash kernel (jobs.training.attention); the stock run's single unpadded row
takes `scaled_dot_product_attention`, which chooses its own backend. This times, on the
Llama-3.1-8B attention shape (32 query heads, 8 key/value heads, head dim 128, bf16, causal), the
varlen kernel on one example and sdpa restricted to each backend in turn (a backend that refuses
the inputs is reported as such; the math backend is never tried: it would build the score
matrix), with CUDA events, median of `--repeats` after a warm-up, and the rate in TFLOP/s
(causal: 2 x 2 x tokens^2 / 2 x heads x dim forward, 2.5 times that backward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from jobs.training.attention import _varlen_kernel, cu_seqlens

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def timed(step, repeats: int) -> float:
    """Median milliseconds of ``step()`` (forward and backward) over ``repeats`` after two."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    n, h, kv, d = args.tokens, args.heads, args.kv_heads, args.dim
    q, k, v = (torch.randn(n, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (h, kv, kv))
    grad = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 2 * n * n / 2 * h * d * 3.5  # forward, and backward at 2.5 times
    results = {}

    varlen_attn, causal = _varlen_kernel()
    bounds = cu_seqlens([n]).cuda()

    def varlen():
        out = varlen_attn(q, k, v, bounds, bounds, n, n, **causal)
        out.backward(grad)

    results["varlen"] = timed(varlen, args.repeats)
    qs, ks, vs = (t.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v))
    grad_s = grad.transpose(0, 1).unsqueeze(0)
    for name, backend in {"default": None, **BACKENDS}.items():
        def sdpa(backend=backend):
            # "default": sdpa's own choice, what the trainer's one-example rows and stock
            # transformers call.
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            out.backward(grad_s)
        try:
            results[f"sdpa-{name}"] = timed(sdpa, args.repeats)
        except RuntimeError as exc:
            results[f"sdpa-{name}"] = f"refused: {str(exc).splitlines()[0][:120]}"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {n} tokens, "
          f"{h}/{kv} heads of {d}")
    for name, value in results.items():
        shown = f"{value:9.2f} ms {flops / value / 1e9:7.1f} TFLOP/s" if isinstance(
            value, float) else value
        print(f"{name:16} {shown}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args), "results_ms": results},
                                            indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
