"""``python -m jobs.export --format safetensors``: the merged model in a tar, checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile

import torch

from jobs.export import ExportRequest, protocol
from jobs.export.safetensors_tar import compare_archive, export
from jobs.training.merge import CHECK_FILE, merge, safetensors_header
from tests.training.conftest import REPO
from tests.training.merging import make_adapter, save_tiny_llama


def run_export(*args: str):
    result = subprocess.run([sys.executable, "-m", "jobs.export", "--format", "safetensors",
                             *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    messages = [protocol.parse(line) for line in result.stdout.splitlines()]
    return result, [m for m in messages if m is not None]


def test_the_merged_model_exports_as_a_tar_with_its_check(base_model_dir, lora_adapter,
                                                          merged_model, tmp_path):
    merged_dir, summary = merged_model
    result, messages = run_export("--base", str(base_model_dir), "--merged", str(merged_dir),
                                  "--adapter", str(lora_adapter[0]), "--out", str(tmp_path / "out"),
                                  "--name", "smollm2-pirate")

    assert result.returncode == protocol.EXIT_OK, result.stderr[-3000:]
    end = messages[-1]
    assert isinstance(end, protocol.Exported), messages
    assert end.file == str(tmp_path / "out" / "smollm2-pirate.tar")
    progress = [m.fraction for m in messages if isinstance(m, protocol.Progress)]
    assert progress == sorted(progress) and progress[-1] == 1.0
    check = end.check
    assert check["passed"] and check["kind"] == "logits"
    assert check["max_abs_diff"] == summary["check"]["max_abs_diff"] <= check["tolerance"]
    assert check["shards"] == 1 and check["tensors"] == summary["tensors"] == 272
    assert check["problems"] == []

    with tarfile.open(end.file) as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == sorted(
            f"smollm2-pirate/{p.name}" for p in merged_dir.iterdir())
        weights = tar.extractfile("smollm2-pirate/model.safetensors")
        assert weights.read() == (merged_dir / "model.safetensors").read_bytes()
    assert not list((tmp_path / "out").glob(".*"))  # no partial file left


def test_the_archive_check_catches_a_tar_of_other_tensors(base_model_dir, merged_model, tmp_path):
    merged_dir, _ = merged_model
    other = tmp_path / "other"
    shutil.copytree(merged_dir, other)
    with (merged_dir / "model.safetensors").open("rb") as handle:
        header = safetensors_header(handle)
    dropped = sorted(header)[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(other / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    with tarfile.open(tmp_path / "other.tar", "w") as tar:
        for path in sorted(other.iterdir()):
            tar.add(path, arcname=f"m/{path.name}")

    figures = compare_archive(tmp_path / "other.tar", merged_dir, "m")

    assert figures["passed"] is False
    assert any(p.startswith("m/model.safetensors") for p in figures["problems"]), figures
    assert compare_archive(tmp_path / "other.tar", other, "m")["passed"] is True


def test_a_merged_model_without_its_check_is_checked_against_the_adapter(base_model_dir,
                                                                          tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base", base_model_dir)
    make_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                 tmp_path / "adapter", reference=False, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    merge(base, tmp_path / "adapter", tmp_path / "merged", check=False)
    assert not (tmp_path / "merged" / CHECK_FILE).exists()
    steps = []
    request = ExportRequest(format="safetensors", quantization="", base=base,
                            merged=tmp_path / "merged", adapter=tmp_path / "adapter",
                            out=tmp_path / "out", name="tiny")
    (tmp_path / "out").mkdir()

    artifact, check = export(request, lambda fraction, message: steps.append(message))

    assert artifact == tmp_path / "out" / "tiny.tar" and artifact.exists()
    assert steps[0] == "checking the merged model's logits against base + adapter"
    assert check["passed"] and check["kind"] == "logits" and check["max_abs_diff"] < 1e-2
    assert check["weights"]["lora_tensors"] == 6 and check["weights"]["max_ulps"] <= 1


def test_a_merge_whose_check_failed_is_not_exported(base_model_dir, merged_model, tmp_path):
    merged_dir, summary = merged_model
    failed = tmp_path / "failed"
    shutil.copytree(merged_dir, failed)
    check = {**summary["check"], "passed": False, "max_abs_diff": 0.9}
    (failed / "merge-check.json").write_text(json.dumps(check))

    result, messages = run_export("--base", str(base_model_dir), "--merged", str(failed),
                                  "--out", str(tmp_path / "out"))

    assert result.returncode == protocol.EXIT_ERROR
    end = messages[-1]
    assert isinstance(end, protocol.ExportError) and end.code == "check_failed", messages
    assert end.check["max_abs_diff"] == 0.9 and end.check["tolerance"] == check["tolerance"]
    assert not list((tmp_path / "out").glob("*.tar"))
