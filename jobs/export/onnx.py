"""``onnx``: the merged model for ONNX Runtime, with past key values, in fp32, fp16 or int8.

Three steps, each a function the tests and the benchmark call too:

1. :func:`build`: onnxruntime-genai's model builder (``python -m
   onnxruntime_genai.models.builder``, a maintained exporter: no hand-written graph) reads the
   merged Hugging Face folder and writes ``model.onnx`` in fp32 for the CPU (a decoder taking
   ``past_key_values.N.key/value`` and giving ``present.N.key/value``, so a caller generates token
   by token), its weights as external data (``model.onnx.data``), ``genai_config.json`` and the
   tokenizer. fp16 is that graph through onnxruntime's float16 converter; int8 is it through
   onnxruntime's dynamic quantization (``quantize_dynamic``: int8 weights, activations quantized
   as it runs; for serving on CPUs), but for the MatMuls :data:`INT8_KEEP_FLOAT` names.
2. :func:`check`: the model's logits in onnxruntime against transformers' on the merged model in
   fp32 for :data:`PROMPTS`: every position of the prompt (prefill) and :data:`DECODE_STEPS` steps
   after it through the past key values, both fed transformers' greedy tokens. fp32 and fp16 must
   stay within :data:`LOGIT_TOLERANCE` (max abs diff); int8's logits move more, so it must agree
   on the top-1 token at :data:`INT8_MIN_TOP1_AGREEMENT` of those positions. The figures are
   the check's.
3. :func:`jobs.export.write_tar`: the folder as an uncompressed tar, written file by file.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.export import CheckFailed, ExportRequest, InvalidInput, write_tar

BUILDER = "onnxruntime_genai.models.builder"
MODEL_FILE = "model.onnx"

# Fixed prompts: the chat template's shape a fine-tune answers in, and plain text and code.
PROMPTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three fruits that are red.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I "
    "boil an egg?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. Then the dog",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
)
DECODE_STEPS = 8

# Max abs diff of the logits against transformers' fp32 ones, over every compared position.
# Measured on SmolLM2-135M-Instruct with a random LoRA merged in (logits up to about 30):
# fp32 9e-5 (float32 rounding over 30 layers), fp16 0.18 (weights and activations in fp16).
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.5}

# int8: dynamic quantization scales each activation per tensor, so an outlier channel takes the
# resolution of all the others. Every MatMul quantized, SmolLM2 with a random LoRA merged in
# agrees with transformers on the top-1 token at 0.65 of the positions (logits off by up to 20):
# no more than the fp32 model of another random merge does (0.71), or the base model (0.79).
# Quantized one group at a time: the MLP down projections (inputs up to 160 times their RMS)
# cost the most, then the fused q/k/v projection (0.84 alone); o_proj (1.0), gate/up (0.94) and
# the LM head (0.94) little. So those two stay in fp32 (named as the builder names its MatMuls),
# the rest are int8 with a scale per output channel: 0.90 on that merge, against 0.72 for another
# merge and 0.79 for the base model, hence the threshold between.
INT8_KEEP_FLOAT = ("down_proj", "qkv_proj", "q_proj", "k_proj", "v_proj")
INT8_MIN_TOP1_AGREEMENT = 0.85


def export(request: ExportRequest, progress: Callable[[float, str], None]) -> tuple[Path, dict]:
    assert request.merged is not None, "onnx exports the merged model"
    work = request.out / f".{request.name}.onnx-build"
    try:
        model_dir = build(request.merged, work, request.quantization, progress=progress)
        progress(0.6, "checking the ONNX model's logits in onnxruntime against transformers'")
        result = check(model_dir, request.merged, request.quantization)
        progress(0.85, "writing the tar")
        path = write_tar(request.out / f"{request.name}.tar",
                         sorted(p for p in model_dir.iterdir() if p.is_file()), request.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(1.0, "exported")
    return path, result


# --- 1. build ------------------------------------------------------------------------------------


def build(merged: Path, work: Path, quantization: str, *,
          progress: Callable[[float, str], None] = lambda *_: None) -> Path:
    """The ONNX model of ``merged`` in ``quantization`` (fp32, fp16 or int8): a folder in
    ``work`` holding model.onnx, its external data, genai_config.json and the tokenizer."""
    if quantization not in ("fp32", "fp16", "int8"):
        raise InvalidInput(f"onnx has no quantization {quantization!r}")
    _require_supported(merged)
    progress(0.05, "building the ONNX model with onnxruntime-genai's model builder")
    built = work / "fp32"
    _run_builder(merged, built, cache=work / "cache")
    if quantization == "fp16":
        progress(0.4, "converting to fp16 (onnxruntime's float16 converter)")
        return convert_fp16(built, work / "fp16")
    if quantization == "int8":
        progress(0.4, "quantizing to int8 (onnxruntime's dynamic quantization)")
        return quantize_int8(built, work / "int8")
    return built


def _require_supported(merged: Path) -> None:
    try:
        config = json.loads((merged / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"the merged model has no readable config.json: {exc}") from exc
    if not (merged / "tokenizer.json").exists() and not (merged / "tokenizer.model").exists():
        raise InvalidInput("the merged model has no tokenizer: the ONNX export carries one")
    if not config.get("architectures"):
        raise InvalidInput("the merged model's config.json names no architecture")


def _run_builder(merged: Path, out: Path, *, cache: Path) -> None:
    """The builder's fp32 model for the CPU, in its own process: it prints freely (our stdout is
    the protocol's), and its memory is given back when it ends. Its output goes to our stderr,
    its tail into the error.

    Always fp32: for the CPU the builder makes its fused graph (GroupQueryAttention with the
    rotary embedding inside, one buffer for past and present) only in fp32. Its fp16 CPU graph
    (MultiHeadAttention, which it does not list as a valid target) fails in onnxruntime 1.32 on
    any prompt longer than one token ("Shape mismatch attempting to re-use buffer"), in
    onnxruntime-genai too; fp16 and int8 are made from the fp32 graph."""
    command = [sys.executable, "-m", BUILDER, "--input", str(merged), "--output", str(out),
               "--precision", "fp32", "--execution_provider", "cpu", "--cache_dir", str(cache),
               "--extra_options", "hf_token=false"]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    environ = {**os.environ, "TQDM_DISABLE": "1"}  # a bar line per tensor otherwise
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=environ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip())
    if process.returncode != 0:
        text = "\n".join(tail)
        if "is not currently supported" in text:
            raise InvalidInput(f"onnxruntime-genai's model builder does not support this model's "
                               f"architecture: {tail[-1] if tail else ''}")
        raise RuntimeError(f"onnxruntime-genai's model builder exited with {process.returncode}: "
                           f"{text[-2000:]}")
    if not (out / MODEL_FILE).exists() or not (out / "genai_config.json").exists():
        raise RuntimeError(f"onnxruntime-genai's model builder wrote no {MODEL_FILE} in {out}")


def convert_fp16(fp32_dir: Path, out: Path) -> Path:
    """``fp32_dir``'s model with fp16 weights, inputs and outputs (onnxruntime's float16
    converter; onnxruntime's CPU kernels of the fused ops take fp16), beside a copy of its other
    files. The model is held in memory twice while it converts: fp32 then fp16."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _copy_beside_model(fp32_dir, out)
    model = convert_float_to_float16(onnx.load(fp32_dir / MODEL_FILE), keep_io_types=False,
                                     disable_shape_infer=True)
    onnx.save_model(model, out / MODEL_FILE, save_as_external_data=True,
                    all_tensors_to_one_file=True, location=MODEL_FILE + ".data")
    return out


def quantize_int8(fp32_dir: Path, out: Path) -> Path:
    """``fp32_dir``'s model with int8 weights (onnxruntime's dynamic quantization: activations
    are quantized per tensor as it runs), per output channel, but for the MatMuls in
    :data:`INT8_KEEP_FLOAT`, beside a copy of its other files."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _copy_beside_model(fp32_dir, out)
    graph = onnx.load(fp32_dir / MODEL_FILE, load_external_data=False).graph
    keep = [node.name for node in graph.node
            if node.op_type == "MatMul" and any(part in node.name for part in INT8_KEEP_FLOAT)]
    # External data always: a model over 2 GB cannot be one protobuf.
    quantize_dynamic(fp32_dir / MODEL_FILE, out / MODEL_FILE, weight_type=QuantType.QInt8,
                     per_channel=True, nodes_to_exclude=keep, use_external_data_format=True)
    return out


def _copy_beside_model(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith(MODEL_FILE):
            shutil.copy2(item, out / item.name)


# --- 2. check ------------------------------------------------------------------------------------


@dataclass
class _Reference:
    prompt_ids: list[int]
    tokens: list[int]  # the greedy tokens, fed back one by one
    logits: Any  # numpy float32 [prompt positions + decode steps, vocab]


def check(model_dir: Path, merged: Path, quantization: str,
          prompts: Sequence[str] = PROMPTS, decode_steps: int = DECODE_STEPS) -> dict[str, Any]:
    """The check's figures when the ONNX model in ``model_dir`` answers like transformers on
    ``merged``; CheckFailed with them when it does not."""
    import onnxruntime

    references = reference_logits(merged, prompts, decode_steps)
    decoder = OnnxDecoder(model_dir)
    runs = [decoder.logits(ref.prompt_ids, ref.tokens) for ref in references]
    figures = {"engine": f"onnxruntime {onnxruntime.__version__}", "quantization": quantization,
               "prompts": len(prompts), "decode_steps": decode_steps,
               **compare(references, runs)}
    if quantization == "int8":
        figures.update(kind="top1_agreement", min_agreement=INT8_MIN_TOP1_AGREEMENT)
        passed = figures["top1_agreement"] >= INT8_MIN_TOP1_AGREEMENT
        failure = (f"the int8 ONNX model agrees with transformers on the top-1 token at "
                   f"{figures['top1_matching']} of {figures['positions']} positions "
                   f"({figures['top1_agreement']:.2%}; {INT8_MIN_TOP1_AGREEMENT:.0%} needed)")
    else:
        tolerance = LOGIT_TOLERANCE[quantization]
        figures.update(kind="logits", tolerance=tolerance)
        passed = figures["max_abs_diff"] <= tolerance
        failure = (f"the {quantization} ONNX model's logits differ from transformers' by up to "
                   f"{figures['max_abs_diff']} (tolerance {tolerance})")
    figures = {"passed": passed, **figures}
    if not passed:
        raise CheckFailed(failure, figures)
    return figures


def compare(references: Sequence[_Reference], runs: Sequence[Any]) -> dict[str, Any]:
    """The largest logit differences (over the prompts' positions, over the decode steps, over
    both) and how often the top-1 tokens agree, over every compared position."""
    import numpy as np

    prefill, decode, matching, positions = 0.0, 0.0, 0, 0
    for ref, logits in zip(references, runs, strict=True):
        diff = np.abs(logits - ref.logits).max(axis=-1)
        n = len(ref.prompt_ids)
        prefill, decode = max(prefill, float(diff[:n].max())), max(decode, float(diff[n:].max()))
        matching += int((logits.argmax(-1) == ref.logits.argmax(-1)).sum())
        positions += len(diff)
    return {"positions": positions, "prefill_max_abs_diff": _round(prefill),
            "decode_max_abs_diff": _round(decode), "max_abs_diff": _round(max(prefill, decode)),
            "top1_matching": matching, "top1_agreement": round(matching / positions, 4)}


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def reference_logits(merged: Path, prompts: Sequence[str], decode_steps: int) -> list[_Reference]:
    """transformers' logits on the merged model in fp32: each prompt at once, then greedy decode
    steps through its cache. The model is freed before onnxruntime loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    model.eval()
    references = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            output = model(torch.tensor([ids]), use_cache=True)
            rows = [output.logits[0].float()]
            past, tokens = output.past_key_values, []
            for _ in range(decode_steps):
                token = int(rows[-1][-1].argmax())
                tokens.append(token)
                output = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = output.past_key_values
                rows.append(output.logits[0].float())
            references.append(_Reference(ids, tokens, torch.cat(rows).numpy()))
    del model
    gc.collect()
    return references


class OnnxDecoder:
    """The exported decoder in an onnxruntime session on the CPU, fed as onnxruntime-genai feeds
    it: input_ids, attention_mask (and position_ids where the graph takes them), and the past
    key values of every layer, empty at first."""

    def __init__(self, model_dir: Path, threads: int = 0) -> None:
        import onnxruntime

        config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.layers = int(config["num_hidden_layers"])
        self.kv_heads = int(config["num_key_value_heads"])
        self.head_size = int(config["head_size"])
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(model_dir / MODEL_FILE), options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = {meta.name: meta.type for meta in self.session.get_inputs()}
        self.outputs = [meta.name for meta in self.session.get_outputs()]
        cache_type = self.inputs["past_key_values.0.key"]
        self.cache_dtype = "float16" if "float16" in cache_type else "float32"

    def empty_cache(self) -> dict[str, Any]:
        import numpy as np

        shape = (1, self.kv_heads, 0, self.head_size)
        return {f"past_key_values.{i}.{kind}": np.zeros(shape, dtype=self.cache_dtype)
                for i in range(self.layers) for kind in ("key", "value")}

    def step(self, ids: Sequence[int], past: dict[str, Any], seen: int) -> tuple[Any, dict]:
        """The logits of ``ids`` [len(ids), vocab] after ``seen`` tokens held in ``past``, and
        the cache after them."""
        import numpy as np

        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, seen + len(ids)), dtype=np.int64), **past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(seen, seen + len(ids), dtype=np.int64)[None, :]
        values = dict(zip(self.outputs, self.session.run(self.outputs, feed), strict=True))
        present = {name.replace("present.", "past_key_values.", 1): value
                   for name, value in values.items() if name.startswith("present.")}
        return values["logits"][0].astype(np.float32), present

    def logits(self, prompt_ids: Sequence[int], tokens: Sequence[int]) -> Any:
        """The prompt's logits at once, then one row per token of ``tokens`` fed back through
        the past key values: [len(prompt_ids) + len(tokens), vocab]."""
        import numpy as np

        rows = list(self._rows(prompt_ids, tokens))
        return np.concatenate(rows)

    def _rows(self, prompt_ids: Sequence[int], tokens: Sequence[int]) -> Iterator[Any]:
        logits, past = self.step(prompt_ids, self.empty_cache(), 0)
        yield logits
        seen = len(prompt_ids)
        for token in tokens:
            logits, past = self.step([token], past, seen)
            seen += 1
            yield logits


# --- 3. the artifact -----------------------------------------------------------------------------
