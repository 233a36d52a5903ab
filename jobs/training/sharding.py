"""Sharded data parallelism (FSDP2) for a job on several GPUs whose base model does not fit one.

Data-parallel replicas (:mod:`jobs.training.distributed`) hold the whole model on every GPU.
Sharded, each of the N ranks holds 1/N of every decoder layer's weights, frozen base and LoRA
alike, and gathers one layer at a time for its forward and backward pass (PyTorch's
``fully_shard``: one group per decoder layer, the decoder stack as the root). What stays whole on
every rank: the input embedding (in host memory on a GPU, as with one GPU) and the output head,
which the fused loss reads outside any module's forward pass (:mod:`jobs.training.kernels`).

Loading never materialises the whole model in one process: it is built on the meta device,
wrapped with LoRA and sharded, then each rank allocates only its shards and reads its own rows of
each weight from the safetensors files. The LoRA matrices get :func:`init_lora`'s values, which
depend on the seed and the parameter's name only, so one process and N processes start from the
same adapter (the unsharded trainer uses the same initialisation).

What the rest of the trainer does differently when sharded (see :mod:`jobs.training.trainer`):

* every rank runs the same number of forward passes in a step and in evaluation, because each
  pass all-gathers every layer: a rank with fewer runs extra passes with zero weight;
* the loss is already divided by the step's global number of units, so the reduce-scatter sums
  the gradients (divide factor 1) instead of averaging them; it runs once per step, after the
  last pass;
* checkpoints and the final adapter are gathered into whole tensors (every rank takes part) and
  written by rank 0 in the one-process format, so they resume at any world size, sharded or not.

QLoRA is not sharded: a 4-bit 70B model (about 40 GB) fits one GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from pathlib import Path

import torch

from jobs.training import distributed

# Benchmarks only: build the base model's weights from a seeded normal distribution instead of
# reading them (a 70B shape's 141 GB of weights do not fit a lent machine's disk). The platform
# never sets it.
RANDOM_WEIGHTS_ENV = "TUNEPLEX_BENCHMARK_RANDOM_WEIGHTS"
ROOT = "_tuneplex_fsdp_root"  # set on the peft model: the sharded decoder stack


def is_sharded(model) -> bool:
    return getattr(model, ROOT, None) is not None


def parameter_count(model_dir: Path) -> int:
    """The base model's parameters, from config.json alone (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(model_dir))
    return sum(p.numel() for p in model.parameters())


def _hf_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialisation) and
    their buffers (RoPE's frequencies) real, as ``accelerate.init_empty_weights`` does."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"),
                                            requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_skeleton(model_dir: Path, dtype: torch.dtype, attention: str):
    """The base model's modules with meta parameters (real buffers)."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(_hf_config(model_dir), dtype=dtype,
                                                attn_implementation=attention)


def shard(model, layers: list[torch.nn.Module], device: torch.device, world: distributed.World,
          *, bf16: bool) -> None:
    """fully_shard each decoder layer and the decoder stack (the input embedding left whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    # Adapters are fp32 next to a bf16 base: gather both in bf16 (what autocast computes in), and
    # reduce the adapters' gradients in fp32.
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    decoder = model.get_base_model().model
    embedding = decoder.get_input_embeddings()
    fully_shard(decoder, mesh=mesh, mp_policy=policy,
                ignored_params=set(embedding.parameters()))
    for module in decoder.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the loss is already a global mean
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # a plain sum, which gloo
                module.set_force_sum_reduction_for_comms(True)  # needs (NCCL scales in place)
    # In the instance's dict, not as a submodule: the decoder is already one, deeper down.
    object.__setattr__(model, ROOT, decoder)


def materialise(model, model_dir: Path, device: torch.device, world: distributed.World,
                *, seed: int, host_embedding: bool) -> None:
    """Allocate this rank's shards on ``device`` and fill them: base weights from the files
    (this rank's rows only), LoRA from :func:`init_lora`."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    base = model.get_base_model()
    names = {_checkpoint_key(name): param for name, param in model.named_parameters()
             if "lora_" not in name}
    with torch.no_grad():
        if os.environ.get(RANDOM_WEIGHTS_ENV):
            _random_weights(names, world, seed)
        else:
            _read_weights(names, model_dir, world, tied=bool(base.config.tie_word_embeddings))
    if base.config.tie_word_embeddings:
        base.tie_weights()
    if host_embedding:
        from jobs.training.offload import embedding_to_host

        embedding_to_host(base, device)
    init_lora(model, seed)


def _checkpoint_key(name: str) -> str:
    """A parameter's name in the base model's files, from its name in the peft model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _read_weights(params: dict[str, torch.nn.Parameter], model_dir: Path,
                  world: distributed.World, *, tied: bool) -> None:
    from safetensors import safe_open

    missing = set(params)
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as stream:
            for key in stream.keys():
                if key not in params:
                    continue
                param = params[key]
                rows = _local_rows(param, world)
                source = stream.get_slice(key)
                part = source[rows.start:rows.stop] if rows is not None else source[:]
                _local(param).copy_(part)
                missing.discard(key)
    if tied:  # the head is the embedding, written once
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"the base model's files lack {sorted(missing)[:3]}")


def _random_weights(params: dict[str, torch.nn.Parameter], world: distributed.World,
                    seed: int) -> None:
    """Benchmarks: normal(0, 0.02) weights, norms at one; each rank draws only its rows."""
    for key, param in params.items():
        local = _local(param)
        if key.endswith("norm.weight"):
            local.fill_(1.0)
            continue
        # A shard's rows differ by rank; a whole tensor must be the same on every rank.
        rank = world.rank if hasattr(param, "to_local") else 0
        generator = torch.Generator(device=local.device).manual_seed(_seed_for(seed, key) + rank)
        local.normal_(0.0, 0.02, generator=generator)


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank holds (a shard's, for a sharded parameter)."""
    return _local(param).numel()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _local_rows(param: torch.Tensor, world: distributed.World) -> range | None:
    """The rows of dim 0 this rank holds of a sharded parameter (FSDP2 splits like torch.chunk);
    None for a whole one."""
    if not hasattr(param, "to_local"):
        return None
    rows = param.shape[0]
    chunk = math.ceil(rows / world.size)
    start = min(rows, chunk * world.rank)
    return range(start, min(rows, start + chunk))


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_lora(model, seed: int) -> None:
    """Initialise the trained adapter as peft does (A: Kaiming-uniform, B: zeros), from a
    generator seeded by the job's seed and the parameter's name: the same values whatever the
    world size and whether the model is sharded."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name and param.requires_grad:
                _local(param).zero_()
            elif ".lora_A." in name and param.requires_grad:
                full = torch.empty(param.shape, dtype=torch.float32)
                generator = torch.Generator().manual_seed(_seed_for(seed, name))
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
                copy_full(param, full)


def copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of it."""
    with torch.no_grad():
        local = _local(param)
        if hasattr(param, "to_local"):
            rows = _local_rows(param, distributed.current())
            full = full[rows.start:rows.stop]
        local.copy_(full.to(local.device, local.dtype))


def gathered(tensor):
    """The whole tensor of a shard (a collective: every rank calls it, in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sharded_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (an optimizer moment read from a checkpoint) split as ``param`` is."""
    if not hasattr(param, "to_local"):
        return full
    from torch.distributed.tensor import DTensor

    rows = _local_rows(param, distributed.current())
    local = full[rows.start:rows.stop].to(param.device)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def set_gradient_sync(model, enabled: bool) -> None:
    """Reduce-scatter after the next backward pass (the last of a step) or not."""
    root = getattr(model, ROOT, None)
    if root is not None:
        root.set_requires_gradient_sync(enabled)
