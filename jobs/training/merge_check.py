"""The merge's proof: the merged model against base + adapter run through peft, in two ways.

- Logits: both models in float32 (on the GPU when there is one, else the CPU) over fixed prompts,
  one loaded at a time. The merged weights are stored rounded to the base's dtype (bf16 for the
  embedded model) while peft adds the adapter's output in float32, so the two differ by that
  rounding carried through every layer: measured on the embedded model (30 layers) with an
  adapter on every linear layer, up to 0.55 (0.05 on average) where the adapter itself moves the
  logits by up to 2; on a 1B-parameter shape, up to 0.06. LOGITS_TOLERANCE allows for it.
  ``adapter_effect`` (base alone against base + adapter) says how far a merge that lost the
  adapter would be.
- Weights: because the logits cannot see errors smaller than that rounding (a scale 1.5 times too
  large moves them by 0.8 on the embedded model), every tensor of the merged model is compared
  with peft's own: the base's, or the base's plus peft's ``get_delta_weight``, which the merged
  tensor must equal once rounded to its dtype (WEIGHT_TOLERANCE_ULPS units in the last place).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

LOGITS_TOLERANCE = 1.0  # largest |logit difference|, merged against base + adapter in float32
WEIGHT_TOLERANCE_ULPS = 1  # a merged weight against base + peft's delta rounded to its dtype

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the river, there lived",
    "Translate to German: The weather is nice today.",
)


def _chat_prompt(tokenizer) -> list[int] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids(model_dir: Path) -> list[list[int]]:
    """The fixed prompts as token ids (and one through the chat template, when there is one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    chat = _chat_prompt(tokenizer)
    return prompts + ([chat] if chat else [])


def _logits(model, prompts: list[list[int]], device) -> list:
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([ids], device=device)).logits[0].float().cpu()
                for ids in prompts]


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ordered_bits(tensor):
    """The tensor's bit patterns as integers in the order of the values they encode (IEEE floats
    are sign and magnitude), so that two values' difference counts the representable values
    between them: their distance in units in the last place."""
    import torch

    bits = tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])
    wide = bits.to(torch.int64)
    magnitude = wide & ((1 << (8 * tensor.element_size() - 1)) - 1)
    return torch.where(wide < 0, -magnitude, magnitude)


def _ulps_off(merged, expected) -> int:
    """How many units in the last place of ``merged``'s dtype it is from ``expected`` rounded to
    that dtype (0 when it is exactly that rounding)."""
    rounded = expected.to(merged.dtype)
    return int((_ordered_bits(merged) - _ordered_bits(rounded)).abs().max())


def weights_check(adapted, merged_dir: Path) -> dict[str, Any]:
    """Every merged tensor against peft's model ``adapted`` (base + adapter, unmerged): a LoRA
    layer's weight within WEIGHT_TOLERANCE_ULPS of base + peft's delta, any other tensor equal."""
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    model = adapted.get_base_model()
    modules = {name: module for name, module in model.named_modules()
               if isinstance(module, LoraLayer)}
    layers = {f"{name}.weight": module for name, module in modules.items()}
    params = dict(model.state_dict())
    for name, module in modules.items():  # a targeted layer's other tensors (its bias) by their name
        params.update({f"{name}.{key}": value
                       for key, value in module.get_base_layer().state_dict().items()})
    worst, worst_name, unequal, seen = 0, "", [], set()
    for path in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            names = list(handle.keys())
        for name in names:
            with safe_open(path, framework="pt") as handle:  # mapped pages let go per tensor
                tensor = handle.get_tensor(name)
            seen.add(name)
            layer = layers.get(name)
            if layer is None:
                reference = params.get(name)
                if reference is None or not torch.equal(
                        tensor.to(reference.device, reference.dtype), reference):
                    unequal.append(name)
                continue
            with torch.no_grad():
                base = layer.get_base_layer().weight
                expected = base.float() + layer.get_delta_weight(adapted.active_adapter).float()
            off = _ulps_off(tensor.to(base.device), expected)
            if off > worst:
                worst, worst_name = off, name
    missing = sorted(set(layers) - seen)
    return {"passed": worst <= WEIGHT_TOLERANCE_ULPS and not unequal and not missing,
            "tensors": len(seen), "lora_tensors": len(layers) - len(missing),
            "max_ulps": worst, "tolerance_ulps": WEIGHT_TOLERANCE_ULPS,
            "worst": worst_name, "unequal": unequal[:5], "missing": missing[:5]}


def check_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, *,
                device: str | None = None) -> dict[str, Any]:
    """``{"passed", "kind": "logits", "max_abs_diff", "tolerance", "prompts", "positions",
    "mean_abs_diff", "adapter_effect", "weights": {...}, "reference", "device", "dtype"}``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = {"dtype": torch.float32, "device_map": str(where) if where.type == "cuda" else None}
    prompts = prompt_ids(merged_dir)

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, **load),
                                        adapter_dir).eval()
    expected = _logits(adapted, prompts, where)
    with adapted.disable_adapter():
        base = _logits(adapted, prompts, where)
    weights = weights_check(adapted, merged_dir)
    del adapted
    _free(where)

    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, **load).eval()
    merged = _logits(merged_model, prompts, where)
    del merged_model
    _free(where)

    diffs = torch.cat([(m - e).abs().flatten() for m, e in zip(merged, expected)])
    effect = max(float((b - e).abs().max()) for b, e in zip(base, expected))
    max_abs_diff = float(diffs.max())
    return {"passed": max_abs_diff <= LOGITS_TOLERANCE and weights["passed"], "kind": "logits",
            "max_abs_diff": round(max_abs_diff, 6), "tolerance": LOGITS_TOLERANCE,
            "prompts": len(prompts), "positions": sum(len(ids) for ids in prompts),
            "mean_abs_diff": round(float(diffs.mean()), 6), "adapter_effect": round(effect, 6),
            "weights": weights, "reference": "base + adapter through peft",
            "device": where.type, "dtype": "float32"}


def failure_line(check: dict[str, Any]) -> str:
    """The figures of a failed check, on one line (the platform shows it as the merge's error)."""
    weights = check["weights"]
    where = f" at {weights['worst']}" if weights["worst"] else ""
    extra = "".join(f"; {label} {', '.join(weights[key])}" for key, label in
                    (("unequal", "changed tensors not targeted:"), ("missing", "missing:"))
                    if weights[key])
    return (f"the merge check failed: logits max_abs_diff={check['max_abs_diff']:.6g} "
            f"(tolerance={check['tolerance']:g}) over {check['prompts']} prompts "
            f"({check['positions']} positions, {check['device']} {check['dtype']}); weights up to "
            f"max_ulps={weights['max_ulps']:g} from base + peft's delta (tolerance="
            f"{weights['tolerance_ulps']:g}){where}{extra}")
