"""The onnx export (jobs.export.onnx) on the embedded model with a random LoRA merged in: each
type through ``python -m jobs.export``, its real onnxruntime check passing with its figures, the
artifact usable by onnxruntime-genai, and the check failing with figures when the ONNX model is
not the merged model it is compared against."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from jobs.export import CheckFailed, onnx, protocol
from jobs.export.__main__ import main
from tests.training.conftest import REPO

TYPES = ("fp32", "fp16", "int8")


def _merge_random_adapter(base: Path, out: Path, seed: int) -> Path:
    """``base`` with a random LoRA (every projection, B not zero) merged in, saved as a merge is:
    bf16 safetensors and the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    merged = get_peft_model(model, config).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(base_model_dir, tmp_path_factory) -> Path:
    return _merge_random_adapter(base_model_dir, tmp_path_factory.mktemp("merged"), seed=0)


@pytest.fixture(scope="module")
def exports(base_model_dir, merged, tmp_path_factory) -> dict[str, dict]:
    """Each type exported once through the real command line: its messages and its artifact."""
    results = {}
    for quantization in TYPES:
        out = tmp_path_factory.mktemp(f"onnx-{quantization}")
        done = subprocess.run(
            [sys.executable, "-m", "jobs.export", "--format", "onnx", "--quantization",
             quantization, "--base", str(base_model_dir), "--merged", str(merged),
             "--out", str(out), "--name", f"smol-{quantization}"],
            cwd=REPO, capture_output=True, text=True, timeout=900)
        messages = [m for m in map(protocol.parse, done.stdout.splitlines()) if m is not None]
        results[quantization] = {"returncode": done.returncode, "messages": messages,
                                 "out": out, "stderr": done.stderr[-3000:]}
    return results


def _extract(tar_path: Path, into: Path) -> Path:
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    (folder,) = into.iterdir()
    return folder


@pytest.mark.parametrize("quantization", TYPES)
def test_each_type_exports_a_tar_that_passed_the_onnxruntime_check(exports, quantization):
    run = exports[quantization]
    assert run["returncode"] == 0, run["stderr"]
    *progress, end = run["messages"]
    assert isinstance(end, protocol.Exported), run["messages"]
    fractions = [m.fraction for m in progress]
    assert progress and fractions == sorted(fractions) and fractions[-1] == 1.0
    check = end.check
    assert check["passed"] is True and check["quantization"] == quantization
    assert check["engine"].startswith("onnxruntime ")
    assert check["prompts"] == len(onnx.PROMPTS) and check["decode_steps"] == onnx.DECODE_STEPS
    assert check["positions"] > 3 * onnx.DECODE_STEPS
    if quantization == "int8":
        assert check["kind"] == "top1_agreement"
        assert check["top1_agreement"] >= check["min_agreement"] == onnx.INT8_MIN_TOP1_AGREEMENT
    else:
        assert check["kind"] == "logits"
        assert 0 < check["max_abs_diff"] <= check["tolerance"] == onnx.LOGIT_TOLERANCE[quantization]
        assert check["decode_max_abs_diff"] <= check["max_abs_diff"]
    tar_path = Path(end.file)
    assert tar_path == run["out"] / f"smol-{quantization}.tar"
    assert sorted(p.name for p in run["out"].iterdir()) == [tar_path.name]  # no build left over
    with tarfile.open(tar_path) as tar:  # an uncompressed tar: "r:" refuses anything else
        names = set(tar.getnames())
    prefix = f"smol-{quantization}/"
    assert {prefix + f for f in ("model.onnx", "model.onnx.data", "genai_config.json",
                                 "tokenizer.json", "tokenizer_config.json")} <= names


def test_the_types_differ_as_their_precision_says(exports, tmp_path):
    """fp16 holds its weights in half the bytes of fp32; int8 multiplies in integers but for the
    MatMuls it keeps in fp32, and is smaller by what it quantized."""
    import onnx as onnx_lib

    sizes = {q: Path(exports[q]["messages"][-1].file).stat().st_size for q in TYPES}
    assert 0.45 < sizes["fp16"] / sizes["fp32"] < 0.55
    assert sizes["int8"] / sizes["fp32"] < 0.75
    graph = onnx_lib.load(_extract(Path(exports["int8"]["messages"][-1].file), tmp_path / "int8")
                          / "model.onnx", load_external_data=False).graph
    integer = [n.name for n in graph.node if n.op_type == "MatMulInteger"]
    floating = [n.name for n in graph.node if n.op_type == "MatMul"]
    assert any("lm_head" in name for name in integer) and any("up_proj" in name for name in integer)
    assert floating and all(any(p in name for p in onnx.INT8_KEEP_FLOAT) for name in floating)
    fp16_dir = _extract(Path(exports["fp16"]["messages"][-1].file), tmp_path / "fp16")
    assert onnx.OnnxDecoder(fp16_dir).cache_dtype == "float16"


def _greedy_with_onnxruntime_genai(model, ids: list[int], tokens: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generated = []
    while not generator.is_done():
        generator.generate_next_token()
        generated.append(int(generator.get_next_tokens()[0]))
    return generated


def _greedy_with_the_checks_decoder(model_dir: Path, ids: list[int], tokens: int) -> list[int]:
    decoder = onnx.OnnxDecoder(model_dir)
    logits, past = decoder.step(ids, decoder.empty_cache(), 0)
    generated = [int(logits[-1].argmax())]
    while len(generated) < tokens:
        logits, past = decoder.step(generated[-1:], past, len(ids) + len(generated) - 1)
        generated.append(int(logits[-1].argmax()))
    return generated


@pytest.mark.parametrize("quantization", TYPES)
def test_onnxruntime_genai_serves_the_artifact_as_the_check_ran_it(exports, merged, tmp_path,
                                                                  quantization):
    """The tar is what onnxruntime-genai serves: it loads the folder (genai_config.json, the
    tokenizer) and its greedy tokens are those of the check's own decoding loop over the same
    model, and for fp32 transformers' on the merged model."""
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _extract(Path(exports[quantization]["messages"][-1].file), tmp_path)
    prompt, tokens = onnx.PROMPTS[1], 12
    ids = AutoTokenizer.from_pretrained(merged)(prompt, add_special_tokens=False)["input_ids"]
    model = og.Model(str(model_dir))
    assert list(og.Tokenizer(model).encode(prompt)) == ids
    served = _greedy_with_onnxruntime_genai(model, ids, tokens)
    assert len(served) == tokens  # no end of text this early: the poem goes on
    assert served == _greedy_with_the_checks_decoder(model_dir, ids, tokens)
    if quantization == "fp32":
        reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).generate(
            torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert served == reference[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def other_merged(base_model_dir, tmp_path_factory) -> Path:
    return _merge_random_adapter(base_model_dir, tmp_path_factory.mktemp("other"), seed=1)


def test_the_check_fails_with_figures_when_the_onnx_model_is_another_merge(
        exports, other_merged, tmp_path, monkeypatch, capsys):
    """Through the command line: an ONNX model built from another merge than --merged (the
    build patched to hand back the first merge's export) is an export_error check_failed line
    with the figures, exit 1, and no artifact."""
    built = _extract(Path(exports["fp32"]["messages"][-1].file), tmp_path / "built")
    monkeypatch.setattr(onnx, "build", lambda *args, **kwargs: built)
    out = tmp_path / "out"
    code = main(["--format", "onnx", "--quantization", "fp32", "--base", str(other_merged),
                 "--merged", str(other_merged), "--out", str(out)])
    messages = [protocol.parse(line) for line in capsys.readouterr().out.splitlines()]
    assert code == protocol.EXIT_ERROR
    end = messages[-1]
    assert isinstance(end, protocol.ExportError) and end.code == "check_failed"
    assert end.check["passed"] is False and end.check["kind"] == "logits"
    assert end.check["max_abs_diff"] > end.check["tolerance"] == onnx.LOGIT_TOLERANCE["fp32"]
    assert str(end.check["max_abs_diff"]) in end.message
    assert not (out / "model.tar").exists()


def test_the_int8_check_fails_when_the_top1_tokens_are_another_merges(exports, other_merged,
                                                                      tmp_path):
    built = _extract(Path(exports["int8"]["messages"][-1].file), tmp_path)
    with pytest.raises(CheckFailed) as failed:
        onnx.check(built, other_merged, "int8")
    figures = failed.value.check
    assert figures["passed"] is False and figures["kind"] == "top1_agreement"
    assert figures["top1_agreement"] < onnx.INT8_MIN_TOP1_AGREEMENT
    assert figures["top1_matching"] < figures["positions"]
    json.dumps(figures)  # as it travels in the export_error line


def test_a_merged_folder_without_a_tokenizer_is_invalid_input(merged, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    (folder / "config.json").write_bytes((merged / "config.json").read_bytes())
    code = main(["--format", "onnx", "--base", str(merged), "--merged", str(folder),
                 "--out", str(tmp_path / "out")])
    end = protocol.parse(capsys.readouterr().out.splitlines()[-1])
    assert code == protocol.EXIT_ERROR
    assert isinstance(end, protocol.ExportError) and end.code == "invalid_input"
    assert "tokenizer" in end.message


def test_an_architecture_the_builder_does_not_know_is_invalid_input(merged, tmp_path, capsys):
    """A real Hugging Face model the builder has no graph for (GPT-2) is refused as the model's
    fault (invalid_input), not an export error."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64,
                               vocab_size=49152)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(merged).save_pretrained(folder)
    code = main(["--format", "onnx", "--base", str(folder), "--merged", str(folder),
                 "--out", str(tmp_path / "out")])
    end = protocol.parse(capsys.readouterr().out.splitlines()[-1])
    assert code == protocol.EXIT_ERROR
    assert isinstance(end, protocol.ExportError) and end.code == "invalid_input", end
    assert "does not support this model's architecture" in end.message
