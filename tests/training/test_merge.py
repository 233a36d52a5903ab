"""The streaming merge (jobs.training.merge) against peft's merge_and_unload, its logits check,
and what it refuses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.training import merge as merge_module
from jobs.training.merge import INDEX_FILE, merge
from jobs.training.merge_check import LOGITS_TOLERANCE, WEIGHT_TOLERANCE_ULPS
from tests.training.conftest import REPO
from tests.training.merging import (
    ALL_LINEAR,
    TOKENIZER_FILES,
    make_adapter,
    read_shards,
    save_tiny_llama,
)


def assert_same_within_bf16_rounding(ours: torch.Tensor, reference: torch.Tensor, name: str):
    assert ours.dtype == reference.dtype == torch.bfloat16, name
    # both round the same float32 sum once: at most one unit in the last place apart
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2**-7, atol=1e-30, msg=name)


@pytest.fixture(scope="module")
def sharded_base(base_model_dir, tmp_path_factory) -> Path:
    """The embedded model saved in several safetensors shards, with its index."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("sharded-base")
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="70MB")
    for name in TOKENIZER_FILES:
        shutil.copyfile(base_model_dir / name, directory / name)
    assert len(list(directory.glob("*.safetensors"))) > 2
    return directory


@pytest.mark.parametrize("layout", ["one file", "the base's shards", "split at 100MB"])
def test_the_streaming_merge_equals_peft_merge_tensor_for_tensor(
        layout, base_model_dir, sharded_base, lora_adapter, merged_model, tmp_path):
    adapter_dir, reference = lora_adapter
    if layout == "one file":
        base, (out, summary) = base_model_dir, merged_model
    elif layout == "the base's shards":
        base, out = sharded_base, tmp_path / "merged"
        summary = merge(base, adapter_dir, out)
    else:
        base, out = base_model_dir, tmp_path / "merged"
        summary = merge(base, adapter_dir, out, max_shard_bytes=100 * 1000**2, check=False)

    ours, where = read_shards(out)
    original, _ = read_shards(base)
    assert sorted(ours) == sorted(original)  # tied lm_head stays tied: not written
    changed = [name for name in ours if not torch.equal(ours[name], original[name])]
    assert len(changed) == 30 * len(ALL_LINEAR) == summary["merged_tensors"]
    assert all(name.endswith(tuple(f"{m}.weight" for m in ALL_LINEAR)) for name in changed)
    for name, tensor in ours.items():
        assert_same_within_bf16_rounding(tensor, reference[name], name)

    shard_files = sorted(set(where.values()))
    if layout == "one file":
        assert shard_files == ["model.safetensors"] and not (out / INDEX_FILE).exists()
    else:
        base_files = len(list(base.glob("*.safetensors")))
        expected = base_files if layout == "the base's shards" else 3
        assert len(shard_files) == summary["shards"] == expected > 1
        assert shard_files[0] == f"model-00001-of-{expected:05d}.safetensors"
        index = json.loads((out / INDEX_FILE).read_text())
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == summary["model_bytes"] == sum(
            t.numel() * t.element_size() for t in ours.values())
        sizes = [(out / f).stat().st_size for f in shard_files]
        assert layout != "split at 100MB" or max(sizes) < 100 * 1000**2 + 1_000_000
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name

    if layout == "split at 100MB":  # the two others check the model
        assert summary["check"] is None and not (out / "merge-check.json").exists()
        return
    check = summary["check"]
    assert check["passed"] and check["kind"] == "logits" and check["prompts"] == 5
    assert check["max_abs_diff"] <= check["tolerance"] == LOGITS_TOLERANCE
    # the adapter moves the logits further than the tolerance: a merge without it fails
    assert check["adapter_effect"] > LOGITS_TOLERANCE
    weights = check["weights"]
    assert weights["passed"] and weights["max_ulps"] <= WEIGHT_TOLERANCE_ULPS
    assert weights["tensors"] == len(ours) and weights["lora_tensors"] == len(changed)
    assert json.loads((out / "merge-check.json").read_text()) == check
    assert summary["peak_rss_bytes"] > 0 and summary["model_bytes"] > 200 * 1000**2


def test_the_merge_holds_one_output_shard_at_a_time_not_the_model(base_model_dir, lora_adapter,
                                                                  tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.training.merge", "--base", str(base_model_dir), "--adapter",
         str(lora_adapter[0]), "--out", str(tmp_path / "merged"), "--max-shard-size", "40MB",
         "--skip-check"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["check"] is None and summary["shards"] == 7
    grown = summary["peak_rss_bytes"] - summary["rss_before_bytes"]
    # the shard being written, the tensor being read (the embedding: 57 MB, alone in its shard),
    # the adapter (10 MB): 104 MB measured, of a 269 MB model (one shard: 397 MB); measured in a
    # child of this test process, which has loaded models: getrusage would report their size
    assert 0 < grown < summary["model_bytes"] / 2, {k: v for k, v in summary.items() if k != "files"}


def test_a_broken_merge_fails_its_check_and_reports_the_numbers(
        base_model_dir, lora_adapter, tmp_path, monkeypatch, capsys):
    scale_of = merge_module.scale_of
    monkeypatch.setattr(merge_module, "scale_of", lambda *args: 1.5 * scale_of(*args))
    out = tmp_path / "merged"

    code = merge_module.main(["--base", str(base_model_dir), "--adapter", str(lora_adapter[0]),
                              "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 1
    last = captured.err.strip().splitlines()[-1]
    figures = re.search(r"logits max_abs_diff=([0-9.e+-]+) \(tolerance=([0-9.e+-]+)\) over 5 "
                        r"prompts .*; weights up to max_ulps=([0-9.e+-]+) from base \+ peft's delta "
                        r"\(tolerance=([0-9.e+-]+)\) at model\.layers\.", last)
    assert figures, last
    assert float(figures[2]) == LOGITS_TOLERANCE and float(figures[4]) == WEIGHT_TOLERANCE_ULPS
    assert float(figures[3]) > 10 * WEIGHT_TOLERANCE_ULPS
    summary = json.loads(captured.out.strip().splitlines()[-1])
    check = summary["check"]
    assert check["passed"] is False and check["weights"]["passed"] is False
    assert check["max_abs_diff"] == pytest.approx(float(figures[1]), rel=1e-5)
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))


def test_a_merge_that_loses_the_adapter_fails_on_the_logits_too(
        base_model_dir, lora_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_module, "scale_of", lambda *args: 0.0)
    with pytest.raises(merge_module.MergeCheckFailed) as failed:
        merge(base_model_dir, lora_adapter[0], tmp_path / "merged")
    check = failed.value.check
    assert check["max_abs_diff"] > check["tolerance"] == LOGITS_TOLERANCE
    assert check["max_abs_diff"] == pytest.approx(check["adapter_effect"], rel=1e-3)


@pytest.fixture(scope="module")
def tiny_llama(base_model_dir, tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), base_model_dir)


def test_rslora_patterns_and_fan_in_fan_out_merge_as_peft_does(base_model_dir, tmp_path):
    """GPT-2's Conv1D weights are stored transposed (fan_in_fan_out); rsLoRA scales by
    alpha / sqrt(r); alpha_pattern gives one module its own alpha."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=256)
                    ).to(torch.bfloat16).save_pretrained(base)
    for name in TOKENIZER_FILES:
        shutil.copyfile(base_model_dir / name, base / name)
    from transformers import AutoModelForCausalLM

    reference = make_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                             tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=False,
                             target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"c_attn": 32})
    summary = merge(base, tmp_path / "adapter", tmp_path / "merged")
    ours, _ = read_shards(tmp_path / "merged")
    assert summary["merged_tensors"] == 4 and summary["check"]["passed"], summary
    for name, tensor in ours.items():
        assert_same_within_bf16_rounding(tensor, reference[name], name)

    rs_reference = make_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                tmp_path / "rs-adapter", r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["c_attn"], fan_in_fan_out=True)
    merge(base, tmp_path / "rs-adapter", tmp_path / "rs-merged")
    ours, _ = read_shards(tmp_path / "rs-merged")
    for name, tensor in ours.items():
        assert_same_within_bf16_rounding(tensor, rs_reference[name], name)


@pytest.mark.parametrize(("lora", "reason"), [
    ({"use_dora": True}, "uses DoRA"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
])
def test_what_it_cannot_merge_is_refused_with_the_reason(lora, reason, tiny_llama, tmp_path,
                                                         capsys):
    from transformers import AutoModelForCausalLM

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    make_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                 tmp_path / "adapter", reference=False, **settings)

    code = merge_module.main(["--base", str(tiny_llama), "--adapter", str(tmp_path / "adapter"),
                              "--out", str(tmp_path / "merged")])

    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cannot merge: ") and reason in last, last
    assert not (tmp_path / "merged").exists()


def test_an_adapter_whose_weights_its_config_does_not_target_is_refused(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    make_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                 tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["q_proj"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(merge_module.CannotMerge, match="v_proj, which its adapter_config.json "
                                                       "does not target"):
        merge(tiny_llama, tmp_path / "adapter", tmp_path / "merged", check=False)
