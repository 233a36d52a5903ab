"""What the pool refuses to load, checked without torch on hand-written safetensors files."""

from __future__ import annotations

import json
import struct

import pytest

from serving.adapters import AdapterInvalid, validate_adapter

BASE = {"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.0.self_attn.v_proj": (16, 32)}
KEY = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"


def write_adapter(directory, *, r=4, shapes=None, config=None, truncate=0, dtype="F32"):
    directory.mkdir(parents=True, exist_ok=True)
    shapes = shapes or {KEY.format("q_proj", "A"): [r, 32], KEY.format("q_proj", "B"): [64, r],
                        KEY.format("v_proj", "A"): [r, 32], KEY.format("v_proj", "B"): [16, r]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1] * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    (directory / "adapter_model.safetensors").write_bytes(blob[:len(blob) - truncate])
    (directory / "adapter_config.json").write_text(json.dumps(config or {
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    return directory


def check(directory, root, max_rank=16):
    return validate_adapter(directory, root=root, max_rank=max_rank, base_shapes=BASE)


def code_of(directory, root, **kwargs) -> str:
    with pytest.raises(AdapterInvalid) as refused:
        check(directory, root, **kwargs)
    return refused.value.code


def test_a_well_formed_adapter_passes(tmp_path):
    info = check(write_adapter(tmp_path / "ok"), tmp_path)
    assert info.rank == 4 and info.tensors == 4 and info.target_modules == ("q_proj", "v_proj")


def test_refusals_have_precise_codes(tmp_path):
    assert code_of(write_adapter(tmp_path / "big", r=32), tmp_path) == "adapter_rank_too_high"
    assert code_of(write_adapter(tmp_path / "cut", truncate=10), tmp_path) == "adapter_corrupt"
    assert code_of(write_adapter(tmp_path / "int", dtype="I8"), tmp_path) == "adapter_corrupt"
    other_base = write_adapter(tmp_path / "other", shapes={KEY.format("q_proj", "A"): [4, 48],
                                                            KEY.format("q_proj", "B"): [64, 4]})
    assert code_of(other_base, tmp_path) == "adapter_base_mismatch"
    unknown = write_adapter(tmp_path / "unknown", shapes={KEY.format("k_proj", "A"): [4, 32]})
    assert code_of(unknown, tmp_path) == "adapter_base_mismatch"
    dora = write_adapter(tmp_path / "dora", config={"peft_type": "LORA", "r": 4, "use_dora": True,
                                                    "target_modules": ["q_proj"]})
    assert code_of(dora, tmp_path) == "adapter_unsupported"
    not_lora = write_adapter(tmp_path / "ia3", config={"peft_type": "IA3", "target_modules": ["q"]})
    assert code_of(not_lora, tmp_path) == "adapter_config_invalid"
    broken = write_adapter(tmp_path / "json")
    (broken / "adapter_config.json").write_text("{oops")
    assert code_of(broken, tmp_path) == "adapter_config_invalid"


def test_pickle_and_stray_files_are_refused(tmp_path):
    pickled = write_adapter(tmp_path / "pickled")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    assert code_of(pickled, tmp_path) == "adapter_unexpected_files"
    missing = write_adapter(tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    assert code_of(missing, tmp_path) == "adapter_incomplete"


def test_paths_outside_the_root_and_symlinks_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = write_adapter(tmp_path / "outside")
    assert code_of(outside, root) == "adapter_path_refused"
    assert code_of(root / ".." / "outside", root) == "adapter_path_refused"
    (root / "link").symlink_to(outside)
    assert code_of(root / "link", root) == "adapter_path_refused"
    inside = write_adapter(root / "inside")
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    assert code_of(inside, root) == "adapter_path_refused"
