"""A random-initialised Llama built straight into NF4 on the GPU, one decoder layer at a time.

Llama-3.1-70B's shape in bf16 is 141 GB: more than one GPU holds and more than the lent
machines' 64 GiB of disk, so the usual path (a bf16 checkpoint on disk, quantised by
``from_pretrained`` while loading) cannot be taken for random weights. Here each decoder layer
is drawn in bf16 on the GPU (1.7 GB for a 70B layer), quantised to bitsandbytes' NF4 with double
quantisation (the QLoRA recipe, :func:`jobs.training.quantization.four_bit_config`), and its bf16
copy freed before the next: the model never holds more than one layer in bf16.

A folder made by :func:`write_folder` holds only config.json, the tokenizer and a marker file;
:func:`loading_random_nf4` makes ``AutoModelForCausalLM.from_pretrained`` of such a folder
return the built model (the same weights for the same seed in every process), so that this
trainer and the stock ``Trainer`` load it through their own unchanged code.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

MARKER = "random_nf4.json"
STD = 0.02  # LlamaConfig's initializer_range


def write_folder(config_kwargs: dict, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """config.json, the tokenizer and the marker; no weights."""
    from transformers import AutoTokenizer, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**config_kwargs).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"seed": seed}))
    return out


def is_random_nf4(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MARKER).exists()


@contextlib.contextmanager
def loading_random_nf4():
    """``AutoModelForCausalLM.from_pretrained`` of a :func:`write_folder` folder builds it."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def from_pretrained(model_dir, *args, **kwargs):
        if not is_random_nf4(model_dir):
            return original(model_dir, *args, **kwargs)
        seed = json.loads((Path(model_dir) / MARKER).read_text())["seed"]
        return build(Path(model_dir), attention=kwargs.get("attn_implementation", "sdpa"),
                     seed=seed)

    AutoModelForCausalLM.from_pretrained = from_pretrained
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = original


def build(model_dir: Path, *, attention: str = "sdpa", seed: int = 0):
    """The model of ``model_dir``'s config on the current GPU: decoder layers' linear weights in
    NF4, everything else in bf16, drawn from ``seed`` layer by layer."""
    from jobs.training.sharding import build_skeleton

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_skeleton(model_dir, torch.bfloat16, attention)
    generator = torch.Generator(device=device)
    decoder = model.model
    for index, layer in enumerate(decoder.layers):
        generator.manual_seed(seed * 1000 + index)
        _quantise_linears(layer, device, generator)
        _materialise(layer, device, generator)
    generator.manual_seed(seed * 1000 + 999)
    _materialise(model, device, generator)  # embedding, final norm, head; buffers
    # what from_pretrained marks on a bitsandbytes model: peft's LoRA layers and kbit preparation
    # and the Trainer's device placement read them
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = _config_dict()
    model.eval()
    return model


def _quantise_linears(layer: torch.nn.Module, device: torch.device,
                      generator: torch.Generator) -> None:
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = torch.empty(child.out_features, child.in_features, dtype=torch.bfloat16,
                                 device=device).normal_(0.0, STD, generator=generator)
            quantised = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True, device="meta")
            quantised.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to(device)
            del weight
            setattr(parent, name, quantised)


def _materialise(module: torch.nn.Module, device: torch.device,
                 generator: torch.Generator) -> None:
    """Whatever is still on the meta device: norms at one, other weights drawn at :data:`STD`."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
            if "norm" in type(sub).__name__.lower():
                value.fill_(1.0)
            else:
                value.normal_(0.0, STD, generator=generator)
            setattr(sub, name, torch.nn.Parameter(value, requires_grad=False))
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                sub.register_buffer(name, buffer.to(device),
                                    persistent=name in sub._buffers and
                                    name not in sub._non_persistent_buffers_set)


def _config_dict() -> dict:
    from jobs.training.quantization import four_bit_config

    return four_bit_config().to_dict()
