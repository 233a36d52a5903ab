"""``ollama``: a tar of a Modelfile and the merged model's GGUF beside it, for

    tar -xf model.tar && cd model && ollama create my-model -f Modelfile && ollama run my-model

The Modelfile says ``FROM ./model.gguf``; its TEMPLATE is the model's chat template written in
Ollama's Go template syntax (ChatML templates, SmolLM2's and Qwen's among them: the check proves
the model's template is ChatML on probe conversations first; a model without a chat template
gets a plain ``{{ .Prompt }}``); SYSTEM is the template's default system prompt, if it has one;
PARAMETER stop names the end-of-turn tokens, and the sampling settings of the model's
generation_config.json carry over. The check parses the Modelfile back from the tar (Ollama's
grammar, ``parse_modelfile``), finds its FROM in the tar with the SHA-256 of the GGUF that
passed the gguf check (jobs.export.gguf_check), and finds every stop string a single special
token of that GGUF's own vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from jobs.export import CheckFailed, ExportRequest, InvalidInput, gguf, gguf_check

GGUF_NAME = "model.gguf"

# ChatML (<|im_start|>role\ncontent<|im_end|>\n) in Ollama's template language: the system
# prompt (Ollama's .System: the request's system messages, else the Modelfile's SYSTEM) once at
# the top, then every other message; a last assistant message stays open (Ollama continues it),
# otherwise the assistant's turn is opened.
CHATML_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""
PLAIN_TEMPLATE = "{{ .Prompt }}"
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")

# generation_config.json → Ollama's PARAMETER names (used when it samples)
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repeat_penalty"}


def chatml(system: str | None, messages: list[dict]) -> str:
    """What CHATML_TEMPLATE renders, in Python: the probe conversations' expected text."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
)


def export(request: ExportRequest, progress: Callable[[float, str], None], *,
           f16_gguf: Path | None = None) -> tuple[Path, dict]:
    merged = request.merged
    modelfile = build_modelfile(merged)  # refuses templates it cannot express before converting
    work = request.out / f".{request.name}-ollama"
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_gguf = work / GGUF_NAME
        f16 = gguf.write_model_gguf(merged, request.quantization, model_gguf, work, progress,
                                    f16_gguf=f16_gguf)
        progress(0.55, f"checking the {request.quantization} GGUF in llama.cpp against "
                       "transformers")
        gguf_figures = gguf_check.check_model(model_gguf, merged, request.quantization,
                                              f16_gguf=f16)
        special = special_tokens(model_gguf)
        digest = _sha256(model_gguf)
        progress(0.9, "writing the archive")
        artifact = request.out / f"{request.name}.tar"
        _write_tar(artifact, request.name, modelfile, model_gguf)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(0.95, "reading the Modelfile back from the archive")
    check = check_archive(artifact, request.name, gguf_sha256=digest, special_tokens=special,
                          gguf_check=gguf_figures)
    # build_modelfile wrote the ChatML TEMPLATE only after the model's own chat template
    # rendered every probe conversation as ChatML
    check["chat_template_probes_alike"] = len(PROBES) if CHATML_TEMPLATE in modelfile else None
    progress(1.0, "checked")
    return artifact, check


def build_modelfile(merged: Path | None) -> str:
    """The Modelfile for the merged model at ``merged`` (its tokenizer's chat template and its
    generation_config.json); InvalidInput for a chat template other than ChatML."""
    from transformers import AutoTokenizer

    if merged is None or not (merged / "config.json").is_file():
        raise InvalidInput(f"{merged} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    lines = [f"FROM ./{GGUF_NAME}"]
    if tokenizer.chat_template:
        system = chatml_default_system(tokenizer)
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in CHATML_STOPS]
    else:
        lines.append(f'TEMPLATE """{PLAIN_TEMPLATE}"""')
        if tokenizer.eos_token:
            lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    lines += [f"PARAMETER {name} {value}" for name, value in _sampling(merged).items()]
    return "\n".join(lines) + "\n"


def chatml_default_system(tokenizer) -> str | None:
    """The default system prompt of a ChatML chat template (None when it adds none), after
    proving the template renders the probe conversations exactly as ChatML."""
    alone = tokenizer.apply_chat_template(PROBES[0], tokenize=False, add_generation_prompt=True)
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", alone, re.S)
    default = found.group(1) if found else None
    for probe in PROBES:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        given = [m["content"] for m in probe if m["role"] == "system"]
        others = [m for m in probe if m["role"] != "system"]
        if rendered != chatml(given[0] if given else default, others):
            raise InvalidInput("the model's chat template is not ChatML (<|im_start|>role ... "
                               "<|im_end|>): its Ollama TEMPLATE cannot be written yet")
    if default is not None and ('"""' in default or default != default.strip()):
        raise InvalidInput("the chat template's default system prompt cannot be quoted in a "
                           "Modelfile")
    return default


def _sampling(merged: Path) -> dict[str, float | int]:
    try:
        config = json.loads((merged / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not config.get("do_sample"):
        return {}
    return {ours: config[theirs] for theirs, ours in SAMPLING.items()
            if isinstance(config.get(theirs), (int, float))}


def _write_tar(artifact: Path, name: str, modelfile: str, model_gguf: Path) -> None:
    with tarfile.open(artifact, "w") as archive:
        data = modelfile.encode()
        info = tarfile.TarInfo(f"{name}/Modelfile")
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        archive.addfile(info, io.BytesIO(data))
        archive.add(model_gguf, arcname=f"{name}/{GGUF_NAME}")


def check_archive(artifact: Path, name: str, *, gguf_sha256: str, special_tokens: set[str],
                  gguf_check: dict) -> dict:
    """The archive's Modelfile parsed back: FROM the GGUF that passed ``gguf_check`` (the same
    SHA-256), a TEMPLATE, and stop strings that are special tokens of that GGUF's vocabulary."""
    with tarfile.open(artifact) as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        handle = archive.extractfile(members[f"{name}/Modelfile"])
        commands = parse_modelfile(handle.read().decode())
        source = _first(commands, "model") or ""
        member = members.get(f"{name}/{source.removeprefix('./')}")
        digest = _sha256_of(archive.extractfile(member)) if member else None
    stops = [args for command, args in commands if command == "stop"]
    check = {"kind": "ollama", "from": source, "from_is_checked_gguf": digest == gguf_sha256,
             "template": _first(commands, "template") is not None,
             "system": _first(commands, "system"), "stops": stops,
             "stops_are_special_tokens": bool(stops) and set(stops) <= special_tokens,
             "gguf": gguf_check}
    check = {"passed": all(check[k] for k in ("from_is_checked_gguf", "template",
                                              "stops_are_special_tokens"))
             and gguf_check["passed"], **check}
    if not check["passed"]:
        raise CheckFailed("the archive's Modelfile does not run the checked GGUF as the model "
                          "is prompted", check)
    return check


def special_tokens(model_gguf: Path) -> set[str]:
    """The GGUF's control and user-defined tokens (<|im_end|> and the like), read by gguf-py."""
    from gguf import GGUFReader

    reader = GGUFReader(model_gguf)
    tokens, types = (reader.get_field(f"tokenizer.ggml.{key}") for key in ("tokens", "token_type"))
    special = {3, 4}  # llama.cpp's token types CONTROL and USER_DEFINED
    return {tokens.contents(i) for i in range(len(tokens.data))
            if types.contents(i) in special}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs, read as Ollama's parser reads a Modelfile (parser/parser.go):
    a command word, blanks, then a value that ends at a line break where it is complete (bare, or
    closed \"...\" or \"\"\"...\"\"\"); ``#`` comments; FROM is ``model``; ``PARAMETER name
    value`` is ``(name, value)``. ValueError for what Ollama would refuse."""
    commands: list[tuple[str, str]] = []
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].lstrip(" \t")
        i += 1
        if not line or line.startswith("#"):
            continue
        found = re.match(r"([A-Za-z]+)[ \t]+(.*)", line)
        if not found or found.group(1).lower() not in _COMMANDS:
            raise ValueError(f"line {i}: not a Modelfile command: {line[:40]!r}")
        command, value = found.group(1).lower(), found.group(2)
        if command == "parameter":
            found = re.match(r"([A-Za-z0-9_]+)[ \t]+(.*)", value)
            if not found:
                raise ValueError(f"line {i}: PARAMETER needs a name and a value")
            command, value = found.group(1), found.group(2)
        while _unquote(value.strip()) is None:
            if i == len(lines):
                raise ValueError(f"an unclosed quote in the {command} value")
            value += "\n" + lines[i]
            i += 1
        commands.append(("model" if command == "from" else command, _unquote(value.strip())))
    if not any(command == "model" for command, _ in commands):
        raise ValueError("no FROM line")
    return commands


_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
             "parameter", "message", "requires"}


def _unquote(value: str) -> str | None:
    if value.startswith('"""'):
        return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value


def _first(commands: list[tuple[str, str]], name: str) -> str | None:
    return next((args for command, args in commands if command == name), None)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return _sha256_of(handle)


def _sha256_of(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()
