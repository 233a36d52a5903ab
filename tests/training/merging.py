"""Helpers of the merge and export tests: an adapter with random non-zero weights and peft's own
merge of it, and a model directory's tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_adapter(model, directory: Path, *, seed: int = 0, reference: bool = True,
                 **lora) -> dict[str, torch.Tensor] | None:
    """An adapter with random non-zero A and B saved at ``directory``; returns peft's own merge
    of it (merge_and_unload in float32), cast to bfloat16 as the base is stored (with
    ``reference``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0,
                                                  **lora))
    with torch.no_grad():  # peft's non-zero init is large: keep the model answering sensibly
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    peft_model.save_pretrained(directory)
    if not reference:
        return None
    merged = peft_model.merge_and_unload()
    return {name: tensor.to(torch.bfloat16) for name, tensor in merged.state_dict().items()}


def read_shards(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a model directory, and which file holds it."""
    tensors, where = {}, {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
                where[name] = path.name
    return tensors, where


def save_tiny_llama(directory: Path, tokenizer_from: Path) -> Path:
    """A two-layer Llama with random bf16 weights and the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_from / name, directory / name)
    return directory
