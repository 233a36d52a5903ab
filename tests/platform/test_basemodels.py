from __future__ import annotations

import json
import struct
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import bearer
from tuneplex.basemodels.models import BaseModel

pytestmark = pytest.mark.django_db


def write_hf_dir(path: Path, *, shapes: dict[str, list[int]], chat_template: bool = True,
                 architectures=("LlamaForCausalLM",)) -> Path:
    """A minimal HF directory: config, tokenizer config and a safetensors file with real headers."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": list(architectures),
                                                  "max_position_embeddings": 4096}))
    tokenizer = {"chat_template": "{{ messages }}"} if chat_template else {}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def test_register_reads_parameters_length_and_template(tmp_path):
    directory = write_hf_dir(tmp_path / "tiny", shapes={"a": [10, 20], "b": [5]})
    out = StringIO()
    call_command("register_base_model", str(directory), "--name", "tiny-1", stdout=out)
    model = BaseModel.objects.get(name="tiny-1")
    assert (model.parameter_count, model.max_sequence_length, model.has_chat_template) == (205, 4096, True)
    assert model.methods_allowed == ["lora", "qlora"] and model.enabled
    assert "Registered tiny-1" in out.getvalue()
    out = StringIO()
    call_command("register_base_model", str(directory), "--name", "tiny-1", stdout=out)
    assert "Unchanged" in out.getvalue() and BaseModel.objects.count() == 1


@pytest.mark.parametrize("problem,expected", [
    ("missing", "is not a directory"),
    ("no_weights", "no .safetensors"),
    ("not_causal", "not a causal language model"),
    ("bad_name", "must be 1-100 characters"),
])
def test_register_refuses_bad_directories(tmp_path, problem, expected):
    directory = tmp_path / "m"
    name = "ok-name"
    if problem == "no_weights":
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (directory / "pytorch_model.bin").write_bytes(b"pickle!")
    elif problem == "not_causal":
        write_hf_dir(directory, shapes={"a": [1]}, architectures=("BertModel",))
    elif problem == "bad_name":
        write_hf_dir(directory, shapes={"a": [1]})
        name = "../etc"
    with pytest.raises(CommandError, match=expected):
        call_command("register_base_model", str(directory), "--name", name)
    assert not BaseModel.objects.exists()


def test_base_models_are_listed_without_their_paths(org_a, tmp_path):
    directory = write_hf_dir(tmp_path / "tiny", shapes={"a": [4, 4]}, chat_template=False)
    call_command("register_base_model", str(directory), "--name", "tiny", "--methods", "lora")
    body = bearer(org_a.owner_key).get("/v1/base_models").json()
    assert body["data"][0]["id"] == "tiny" and body["data"][0]["methods_allowed"] == ["lora"]
    assert str(tmp_path) not in json.dumps(body)
    assert bearer(org_a.owner_key).get("/v1/base_models/tiny").json()["parameter_count"] == 16
    missing = bearer(org_a.owner_key).get("/v1/base_models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_base_models_are_listed_in_pages_like_every_list(org_a, default_model, tmp_path):

    BaseModel.objects.create(name="second", directory=str(tmp_path), parameter_count=1,
                             max_sequence_length=8, has_chat_template=False)
    client = bearer(org_a.owner_key)
    first = client.get("/v1/base_models?limit=1").json()
    assert len(first["data"]) == 1 and first["has_more"] is True
    rest = client.get(f"/v1/base_models?limit=1&after={first['last_id']}").json()
    assert rest["data"][0]["id"] != first["data"][0]["id"]
    assert client.get("/v1/base_models?limit=101").status_code == 400  # the documented bound
