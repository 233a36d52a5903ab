"""The gguf, gguf-lora and ollama exports (jobs.export.gguf, jobs.export.ollama) on the embedded
model with a random LoRA: every type written by llama.cpp's own converter and quantizer and
checked in real llama.cpp (llama-cpp-python) against transformers, the LoRA GGUF applied by
llama.cpp over the base model's GGUF, the Ollama Modelfile read back, and each check failing
with its figures when the file is not the model it is compared against."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from jobs.export import CheckFailed, ExportRequest, InvalidInput, gguf, gguf_check, llamacpp, \
    ollama, protocol
from tests.training.conftest import REPO

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
QUANTIZED = ("q8_0", "q4_0", "q4_k_m")
FILE_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # GGUF general.file_type


def _adapter(base: Path, out: Path, *, seed: int, scale: float, merge: bool = True
             ) -> tuple[Path, Path]:
    """A random LoRA on every projection (B not zero, scaled so the model still answers but
    differently), saved by peft, and peft's merge of it saved as a merge is (bf16, tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR,
                                                  init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out / "adapter")
    if not merge:
        return out / "adapter", out / "merged"
    merged = peft_model.merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(out / "merged")
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, out / "merged" / name)
    return out / "adapter", out / "merged"


@pytest.fixture(scope="module")
def adapter(base_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    return _adapter(base_model_dir, tmp_path_factory.mktemp("lora"), seed=0, scale=0.1)


@pytest.fixture(scope="module")
def base_gguf(base_model_dir, tmp_path_factory) -> Path:
    return llamacpp.convert_model(base_model_dir, tmp_path_factory.mktemp("base") / "base.gguf")


def _run(*args: str) -> tuple[int, list]:
    done = subprocess.run([sys.executable, "-m", "jobs.export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    messages = [m for m in map(protocol.parse, done.stdout.splitlines()) if m is not None]
    assert messages, done.stderr[-3000:]
    return done.returncode, messages


@pytest.fixture(scope="module")
def f16_export(base_model_dir, adapter, tmp_path_factory):
    """The merged model exported as f16 GGUF through the real command line."""
    out = tmp_path_factory.mktemp("gguf-f16")
    code, messages = _run("--format", "gguf", "--quantization", "f16", "--base",
                          str(base_model_dir), "--merged", str(adapter[1]), "--out", str(out),
                          "--name", "smol")
    return code, messages


def _request(fmt: str, quantization: str, base: Path, adapter: tuple[Path, Path], out: Path):
    return ExportRequest(format=fmt, quantization=quantization, base=base,
                         merged=adapter[1] if fmt != "gguf-lora" else None, adapter=adapter[0],
                         out=out, name="smol")


def _metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")}


def test_f16_exports_through_the_command_line_and_matches_transformers_token_for_token(
        f16_export, base_model_dir):
    code, messages = f16_export
    assert code == protocol.EXIT_OK
    progress, end = messages[:-1], messages[-1]
    assert isinstance(end, protocol.Exported), end
    fractions = [m.fraction for m in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    check = end.check
    assert check["passed"] and check["kind"] == "greedy_tokens" and check["engine"] == "llama.cpp"
    assert check["prompts"] == len(gguf_check.PROMPTS)
    assert check["tokens"] == len(gguf_check.PROMPTS) * gguf_check.NEW_TOKENS
    assert check["matching_tokens"] == check["tokens"]  # no near tie on these prompts
    assert check["chat_template_embedded"] and check["tokenizer_matches"]
    path = Path(end.file)
    assert path.name == "smol.gguf" and [p.name for p in path.parent.iterdir()] == ["smol.gguf"]
    metadata = _metadata(path)
    assert metadata["general.file_type"] == FILE_TYPES["f16"]
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.chat_template"] == \
        (base_model_dir / "chat_template.jinja").read_text()


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_each_quantization_is_llama_cpps_own_and_agrees_with_transformers(
        quantization, f16_export, base_model_dir, adapter, tmp_path):
    f16 = Path(f16_export[1][-1].file)
    events = []
    path, check = gguf.export_model(
        _request("gguf", quantization, base_model_dir, adapter, tmp_path),
        lambda f, m: events.append(m), f16_gguf=f16)
    assert check["passed"] and check["quantization"] == quantization
    assert check["agreement"] >= gguf_check.AGREEMENT[quantization] == check["threshold"]
    # the f16 file it was quantized from passed the exact rule in the same check
    assert check["f16"]["passed"] and check["f16"]["matching_tokens"] == check["f16"]["tokens"]
    assert check["chat_template_embedded"] and check["tokenizer_matches"]
    assert _metadata(path)["general.file_type"] == FILE_TYPES[quantization]
    assert path.stat().st_size < 0.6 * f16.stat().st_size
    assert any("quantizing" in m for m in events)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol.gguf"]


def test_the_check_fails_with_figures_for_the_gguf_of_another_model(base_gguf, adapter):
    with pytest.raises(CheckFailed) as failed:
        gguf_check.check_model(base_gguf, adapter[1], "f16")
    check = failed.value.check
    assert check["passed"] is False
    assert check["matching_tokens"] < check["tokens"]
    # the base model's chains part from the merged model's only at near ties here (a small
    # adapter flips close calls first): its logits tell it apart
    assert check["max_abs_logit_diff"] > gguf_check.MAX_LOGIT_DIFF
    # a quantized type quantized from that f16 file fails too, on its f16 figures
    with pytest.raises(CheckFailed) as failed:
        gguf_check.check_model(base_gguf, adapter[1], "q8_0", f16_gguf=base_gguf)
    assert failed.value.check["f16"]["passed"] is False


def test_the_check_fails_with_figures_for_a_corrupted_gguf(f16_export, adapter, tmp_path):
    corrupted = tmp_path / "corrupted.gguf"
    shutil.copy(f16_export[1][-1].file, corrupted)
    size = corrupted.stat().st_size
    with corrupted.open("r+b") as handle:  # scramble a stretch of the tensors' data
        handle.seek(size // 2)
        handle.write(bytes(range(256)) * (size // 8 // 256))
    with pytest.raises(CheckFailed) as failed:
        gguf_check.check_model(corrupted, adapter[1], "f16")
    assert failed.value.check["matching_tokens"] < failed.value.check["tokens"]

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(corrupted.read_bytes()[: size // 3])
    with pytest.raises(CheckFailed) as failed:
        gguf_check.check_model(truncated, adapter[1], "f16")
    assert failed.value.check["passed"] is False and "truncated.gguf" in \
        failed.value.check["error"]


@pytest.fixture(scope="module")
def lora_export(base_model_dir, adapter, base_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-lora")
    return gguf.export_lora(_request("gguf-lora", "f16", base_model_dir, adapter, out),
                            lambda f, m: None, base_gguf=base_gguf)


def test_the_lora_gguf_over_the_base_gguf_answers_as_base_plus_adapter(lora_export):
    path, check = lora_export
    assert check["passed"] and check["kind"] == "lora_greedy_tokens"
    assert check["matching_tokens"] == check["tokens"]
    assert check["tokens_changed_by_adapter"] > 0  # the adapter visibly changes the answers
    assert check["effect_cosine"] >= gguf_check.EFFECT_COSINE
    assert 0.8 <= check["effect_norm_ratio"] <= 1.25
    metadata = _metadata(path)
    assert metadata["general.type"] == "adapter" and metadata["adapter.type"] == "lora"


def test_the_lora_check_fails_with_figures_for_another_adapters_gguf(
        lora_export, base_model_dir, base_gguf, adapter, tmp_path):
    other, _ = _adapter(base_model_dir, tmp_path, seed=1, scale=0.1, merge=False)
    other_gguf = llamacpp.convert_lora(other, base_model_dir, tmp_path / "other.gguf")
    with pytest.raises(CheckFailed) as failed:
        gguf_check.check_lora(other_gguf, base_gguf, base_model_dir, adapter[0])
    check = failed.value.check
    assert check["passed"] is False and check["effect_cosine"] < gguf_check.EFFECT_COSINE
    assert check["matching_tokens"] < check["tokens"]


def test_gguf_lora_through_the_command_line_converts_the_base_for_its_check(
        base_model_dir, adapter, tmp_path):
    code, messages = _run("--format", "gguf-lora", "--base", str(base_model_dir), "--adapter",
                          str(adapter[0]), "--out", str(tmp_path), "--name", "smol-lora")
    assert code == protocol.EXIT_OK, messages[-1]
    check = messages[-1].check
    assert check["passed"] and check["matching_tokens"] == check["tokens"]
    assert any("base model" in m.message for m in messages[:-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-lora.gguf"]


def test_a_merged_folder_without_a_tokenizer_is_invalid_input(adapter, base_model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(adapter[1], bare)
    (bare / "tokenizer.json").unlink()
    code, messages = _run("--format", "gguf", "--quantization", "q8_0", "--base",
                          str(base_model_dir), "--merged", str(bare), "--out", str(tmp_path / "o"))
    assert code == protocol.EXIT_ERROR
    assert messages[-1].code == "invalid_input" and "tokenizer" in messages[-1].message


# --- ollama ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ollama_export(base_model_dir, adapter, f16_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ollama")
    path, check = ollama.export(_request("ollama", "q8_0", base_model_dir, adapter, out),
                                lambda f, m: None, f16_gguf=Path(f16_export[1][-1].file))
    return out, path, check


def test_the_ollama_archive_holds_a_modelfile_over_the_checked_gguf(ollama_export):
    out, path, check = ollama_export
    assert check["passed"] and check["kind"] == "ollama"
    assert check["gguf"]["passed"] and check["gguf"]["quantization"] == "q8_0"
    assert check["from"] == "./model.gguf" and check["from_is_checked_gguf"]
    assert check["chat_template_probes_alike"] == len(ollama.PROBES)
    assert check["stops"] == ["<|im_start|>", "<|im_end|>"]
    assert check["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert sorted(p.name for p in out.iterdir()) == ["smol.tar"]
    with tarfile.open(path) as archive:
        assert sorted(archive.getnames()) == ["smol/Modelfile", "smol/model.gguf"]
        modelfile = archive.extractfile("smol/Modelfile").read().decode()
    commands = dict(ollama.parse_modelfile(modelfile))
    assert commands["template"] == ollama.CHATML_TEMPLATE


def test_the_template_is_chatml_as_the_models_own_template_renders_it(adapter):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter[1])
    default = ollama.chatml_default_system(tokenizer)
    for probe in ollama.PROBES:
        system = next((m["content"] for m in probe if m["role"] == "system"), default)
        assert ollama.chatml(system, [m for m in probe if m["role"] != "system"]) == \
            tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)


def test_ollama_renders_the_template_with_go_as_the_models_own_template(ollama_export, adapter):
    """The TEMPLATE rendered by Go's text/template with the values Ollama gives it for a chat
    (the Modelfile's SYSTEM prepended when the chat has no system message; .System the system
    messages' text) is the text the model's own chat template renders."""
    import json

    from transformers import AutoTokenizer

    assert shutil.which("go"), "Go is needed (deploy/setup.sh --with-tests installs golang-go)"
    _, path, _ = ollama_export
    with tarfile.open(path) as archive:
        commands = dict(ollama.parse_modelfile(
            archive.extractfile("smol/Modelfile").read().decode()))
    tokenizer = AutoTokenizer.from_pretrained(adapter[1])
    renderer = REPO / "tests" / "fixtures" / "ollama" / "render_template.go"
    for probe in ollama.PROBES:
        messages = list(probe)
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": commands["system"]})
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        done = subprocess.run(["go", "run", str(renderer)], capture_output=True, text=True,
                              timeout=300, check=True, input=json.dumps(
                                  {"template": commands["template"], "system": system,
                                   "messages": messages}))
        assert done.stdout == tokenizer.apply_chat_template(probe, tokenize=False,
                                                            add_generation_prompt=True)


def test_a_chat_template_other_than_chatml_is_refused_before_converting(adapter, tmp_path):
    other = tmp_path / "llama3"
    shutil.copytree(adapter[1], other)
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}")
    with pytest.raises(InvalidInput, match="not ChatML"):
        ollama.build_modelfile(other)


def test_the_ollama_check_fails_with_figures_when_the_modelfile_names_another_file(
        ollama_export, tmp_path):
    _, path, check = ollama_export
    broken = tmp_path / "smol.tar"
    with tarfile.open(path) as source, tarfile.open(broken, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith("Modelfile"):
                data = data.replace(b"FROM ./model.gguf", b"FROM ./other.gguf")
                member.size = len(data)
            target.addfile(member, __import__("io").BytesIO(data))
    with pytest.raises(CheckFailed) as failed:
        ollama.check_archive(broken, "smol", gguf_sha256="x", special_tokens={"<|im_end|>"},
                             gguf_check=check["gguf"])
    assert failed.value.check["from"] == "./other.gguf"
    assert failed.value.check["from_is_checked_gguf"] is False


def test_the_modelfile_parser_reads_ollamas_grammar():
    text = ('# a comment\nfrom ./m.gguf\nTEMPLATE """{{ .System }}\n  two "lines"\n"""\n'
            'PARAMETER stop "<|im_end|>"\nPARAMETER temperature 0.7\nSYSTEM plain words here\n')
    assert ollama.parse_modelfile(text) == [
        ("model", "./m.gguf"), ("template", '{{ .System }}\n  two "lines"\n'),
        ("stop", "<|im_end|>"), ("temperature", "0.7"), ("system", "plain words here")]
    with pytest.raises(ValueError, match="unclosed"):
        ollama.parse_modelfile('FROM x\nTEMPLATE """never closed\n')
    with pytest.raises(ValueError, match="no FROM"):
        ollama.parse_modelfile("SYSTEM hello\n")
    with pytest.raises(ValueError, match="not a Modelfile command"):
        ollama.parse_modelfile("FROM x\nSTOP now\n")
