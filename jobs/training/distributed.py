"""Data-parallel training across processes started by torchrun: NCCL on GPUs, gloo on CPU.

Every rank holds the whole model and the same LoRA weights (each drawn from the job's seed and
its name, :func:`jobs.training.sharding.init_lora`, or read from the same file). Each optimizer
step takes exactly the examples one process would take (the same global batch, the same order);
they are split across the ranks by tokens, each rank runs forward and backward on its share with
the loss divided by the *global* number of target tokens, and one all-reduce sums the LoRA
gradients. The update is therefore the one-process
update up to the order of floating-point sums, whatever the world size, which is also why a
checkpoint written at one world size resumes at any other: the state (adapter, optimizer,
scheduler, data position) is the same on every rank and rank 0 writes it.

Why not ``DistributedDataParallel``: the trainer splits work into forward passes by a token
budget, so ranks run different numbers of passes per step (DDP needs the same number, with
``no_sync`` on all but the last); LoRA gradients are small (about 170 MB in fp32 for an 8B model
at r=16 on every linear layer), so one fused all-reduce per step costs about a millisecond over
NVLink against a step of seconds. Only rank 0 reports (events, metrics, checkpoints); a stop
request is agreed on at step boundaries, so no rank leaves a collective the others are in.

A model too large for one GPU is sharded across the ranks instead (:mod:`jobs.training.sharding`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """This process's place, from torchrun's environment (one process: rank 0 of 1)."""
    return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def die_with_launcher() -> None:
    """A rank is killed with its torchrun: a launcher killed outright (its job cancelled, its
    worker lost) must not leave ranks training on, holding GPUs (Linux only)."""
    import ctypes
    import signal

    launcher = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != launcher:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def init(world: World, device: torch.device) -> None:
    """Join the process group (once); a no-op in a single process."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], lengths: list[int], world: World) -> list[int]:
    """This rank's share of one step's examples: longest first to the least-loaded rank (ties:
    the lower rank), the same answer on every rank; the share keeps the step's order."""
    if not world.distributed:
        return list(indices)
    loads = [0] * world.size
    mine: set[int] = set()
    for position in sorted(range(len(indices)), key=lambda p: (-lengths[p], p)):
        rank = min(range(world.size), key=lambda r: (loads[r], r))
        loads[rank] += lengths[position]
        if rank == world.rank:
            mine.add(position)
    return [indices[p] for p in range(len(indices)) if p in mine]


def _reduce_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device(device))
    dist.all_reduce(tensor)
    return tensor.tolist()


def most_across(value: int, world: World, device: torch.device) -> int:
    """The largest of one count over the ranks (the forward passes every rank must run)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_reduce_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is true on any (a stop request, agreed at a step boundary)."""
    return bool(sum_across([float(flag)], world, device)[0]) if world.distributed else flag


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum every parameter's gradient over the ranks in one flat all-reduce (a rank that had no
    examples this step contributes zeros)."""
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    reduce_on = _reduce_device(flat.device)
    reduced = flat.to(reduce_on)
    dist.all_reduce(reduced)
    flat = reduced.to(flat.device)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        count = grad.numel()
        param.grad = flat[offset:offset + count].view_as(param).to(param.dtype)
        offset += count
