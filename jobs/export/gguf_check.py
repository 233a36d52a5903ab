"""The GGUF exports' checks: llama.cpp runs the exported file, transformers runs the model it came
from, and both must answer alike on fixed prompts before the export is offered.

The prompts are rendered with the model's own chat template (plain text when it has none) and
tokenized by its Hugging Face tokenizer; both engines then continue the same token ids for
``NEW_TOKENS`` tokens, each the argmax of the logits (greedy, no stop at end of turn). The rules:

- The GGUF must carry the model's chat template unchanged, and its own tokenizer must turn every
  rendered prompt into the same token ids as the Hugging Face tokenizer.
- ``f16``: llama.cpp's greedy tokens equal transformers' token for token. One allowance: a chain
  may part where transformers' own logits for the two tokens lie within ``NEAR_TIE`` of each
  other (f16 weights can flip such a tie); that prompt is compared up to there. And with
  transformers' continuations forced on both, no logit differs by more than ``MAX_LOGIT_DIFF``
  (a near tie alone cannot tell a weak adapter's flip from rounding; the logits can: the f16
  GGUF of the embedded model stays within 0.08 of transformers, its base model's GGUF is 3.7
  away from a merge of a small random adapter).
- Quantized types round the weights to 8 or 4 bits, so exact chains are not expected. With
  transformers' continuation forced on both (teacher forcing), llama.cpp's top token must agree
  with transformers' at no fewer than ``AGREEMENT[quantization]`` of the positions; and the f16
  GGUF they were quantized from must pass the f16 rule (figures under ``"f16"``).
- A LoRA GGUF applied by llama.cpp over the base model's f16 GGUF must give the greedy tokens of
  transformers' base + adapter (the f16 rule), and its effect on the logits (with the adapter
  minus without, in each engine) must point the same way as in transformers (cosine at least
  ``EFFECT_COSINE``) with the same size (norm ratio within ``EFFECT_RATIO``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.export import CheckFailed, llamacpp

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a neural network is.",
    "Give me three tips for a good night's sleep.",
)
NEW_TOKENS = 16
NEAR_TIE = 0.2  # logits: f16 weights move SmolLM2-135M's logits by up to 0.07
MAX_LOGIT_DIFF = 0.5  # f16: the largest difference allowed between the engines' logits
AGREEMENT = {"q8_0": 0.85, "q4_k_m": 0.75, "q4_0": 0.6}
EFFECT_COSINE = 0.95
EFFECT_RATIO = (0.8, 1.25)


@dataclass
class Chain:
    """One prompt's greedy continuation in transformers, and the logits behind each token."""

    prompt: list[int]
    tokens: list[int]
    logits: np.ndarray  # NEW_TOKENS x vocabulary: row i is what chose tokens[i]


@dataclass
class Reference:
    prompt_texts: list[str]
    chains: list[Chain]
    chat_template: str | None


def render_prompts(tokenizer) -> tuple[list[str], list[list[int]]]:
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in PROMPTS]
    else:
        texts = list(PROMPTS)
    return texts, [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def load_hf(model_dir: Path, adapter_dir: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), tokenizer


@torch.no_grad()
def greedy_chain(model, prompt: list[int]) -> Chain:
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    rows, tokens = [], []
    for _ in range(NEW_TOKENS):
        row = out.logits[0, -1].float()
        token = int(row.argmax())
        rows.append(row.numpy())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return Chain(prompt, tokens, np.stack(rows))


@torch.no_grad()
def forced_logits(model, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """The logits that predict each token of ``continuation`` after ``prompt``, in one pass."""
    ids = torch.tensor([prompt + continuation[:-1]])
    return model(input_ids=ids).logits[0, len(prompt) - 1:].float().numpy()


def reference(model, tokenizer) -> Reference:
    texts, prompts = render_prompts(tokenizer)
    return Reference(texts, [greedy_chain(model, p) for p in prompts], tokenizer.chat_template)


def compare_chains(engine: llamacpp.Model, chains: list[Chain],
                   forced_logits_out: list | None = None) -> dict:
    """llama.cpp's greedy chains and teacher-forced logits against transformers' chains (the
    latter appended to ``forced_logits_out`` when given)."""
    matching = whole = near_ties = agreeing = 0
    worst_diff = 0.0
    for chain in chains:
        theirs, their_logits = engine.greedy(chain.prompt, NEW_TOKENS)
        prefix = next((i for i, (a, b) in enumerate(zip(chain.tokens, theirs)) if a != b),
                      NEW_TOKENS)
        matching += prefix
        if prefix == NEW_TOKENS:
            whole += 1
        elif chain.logits[prefix][chain.tokens[prefix]] - chain.logits[prefix][theirs[prefix]] \
                < NEAR_TIE:
            near_ties += 1
        forced = their_logits if prefix == NEW_TOKENS else \
            engine.logits(chain.prompt + chain.tokens[:-1])[len(chain.prompt) - 1:]
        if forced_logits_out is not None:
            forced_logits_out.append(forced)
        agreeing += int((forced.argmax(-1) == np.array(chain.tokens)).sum())
        worst_diff = max(worst_diff, float(np.abs(forced - chain.logits).max()))
    total = NEW_TOKENS * len(chains)
    return {"prompts": len(chains), "tokens": total, "matching_tokens": matching,
            "whole_chains": whole, "parted_at_near_ties": near_ties,
            "agreement": round(agreeing / total, 4), "max_abs_logit_diff": round(worst_diff, 4)}


def _exact(figures: dict) -> bool:
    return (figures["whole_chains"] + figures["parted_at_near_ties"] == figures["prompts"]
            and figures["max_abs_logit_diff"] <= MAX_LOGIT_DIFF)


def check_model(gguf: Path, model_dir: Path, quantization: str, *,
                f16_gguf: Path | None = None) -> dict:
    """The merged model's GGUF against the merged model in transformers (the module's rules).

    A quantized GGUF is checked with the f16 GGUF it was quantized from (``f16_gguf``, required
    then): the f16 file by the exact rule (it proves the conversion: on a small model the 4-bit
    types' noise is as large as an adapter's effect, so their agreement alone could not tell the
    merged model from its base), the quantized file by its agreement threshold."""
    if quantization != "f16" and f16_gguf is None:
        raise ValueError("a quantized GGUF is checked with the f16 GGUF it was quantized from")
    ref = cached_reference(model_dir)
    check: dict = {"passed": False, "kind": "greedy_tokens", "engine": "llama.cpp",
                   "llama_cpp_python": llamacpp.version(), "quantization": quantization}
    if f16_gguf is not None and quantization != "f16":
        check["f16"] = _compare_file(f16_gguf, ref, "f16")
    check.update(_compare_file(gguf, ref, quantization))
    check["passed"] = check["passed"] and check.get("f16", {"passed": True})["passed"]
    if not check["passed"]:
        raise CheckFailed(f"the {quantization} GGUF does not answer like the model in llama.cpp",
                          check)
    return check


def _compare_file(gguf: Path, ref: Reference, quantization: str) -> dict:
    """One GGUF's figures and verdict; the f16 file behind several quantized types of one model
    is compared once a process."""
    if not gguf.is_file():
        return {"passed": False, "error": f"{gguf} does not exist"}
    stat = gguf.stat()
    key = (str(gguf.resolve()), stat.st_mtime_ns, stat.st_size, quantization,
           tuple(tuple(c.prompt + c.tokens) for c in ref.chains))
    if key not in _compared:
        if len(_compared) >= 4:
            _compared.pop(next(iter(_compared)))
        _compared[key] = _compare_file_now(gguf, ref, quantization)
    return dict(_compared[key])


_compared: dict[tuple, dict] = {}


def _compare_file_now(gguf: Path, ref: Reference, quantization: str) -> dict:
    figures: dict = {}
    try:
        with llamacpp.Model(gguf) as engine:
            figures.update(_embedded(engine, ref))
            figures.update(compare_chains(engine, ref.chains))
    except llamacpp.LoadFailed as exc:
        return {"passed": False, "error": str(exc)}
    figures["passed"], figures["rule"] = _judge(figures, quantization)
    return figures


_references: dict[tuple, tuple] = {}


def cached_reference(model_dir: Path) -> Reference:
    """transformers' chains for ``model_dir``, computed once a process for its current files
    (several types of one merged model are checked against the same reference)."""
    return _cached((model_dir,), lambda: reference(*load_hf(model_dir)))


def _lora_reference(base_dir: Path, adapter_dir: Path) -> tuple[Reference, list[np.ndarray]]:
    """transformers' chains for base + adapter, and the base model's logits (adapter disabled)
    on those same chains."""
    def compute():
        model, tokenizer = load_hf(base_dir, adapter_dir)
        ref = reference(model, tokenizer)
        with model.disable_adapter():
            return ref, [forced_logits(model, c.prompt, c.tokens) for c in ref.chains]
    return _cached((base_dir, adapter_dir), compute)


def _cached(directories: tuple[Path, ...], compute):
    key = tuple((str(d.resolve()), tuple((p.name, p.stat().st_mtime_ns)
                                         for p in sorted(d.iterdir()))) for d in directories)
    if key not in _references:
        _references.clear()  # one model's reference at a time
        _references[key] = compute()
    return _references[key]


def _embedded(engine: llamacpp.Model, ref: Reference) -> dict:
    template = engine.metadata.get("tokenizer.chat_template")
    tokenized = [engine.tokenize(text) for text in ref.prompt_texts]
    return {"chat_template_embedded": template == ref.chat_template if ref.chat_template
            else template is None,
            "tokenizer_matches": all(ours == chain.prompt
                                     for ours, chain in zip(tokenized, ref.chains))}


def _judge(check: dict, quantization: str) -> tuple[bool, str]:
    embedded = check["chat_template_embedded"] and check["tokenizer_matches"]
    if quantization == "f16":
        rule = (f"chat template and tokenizer embedded; greedy tokens equal for {NEW_TOKENS} "
                f"tokens a prompt, parting only at near ties (< {NEAR_TIE} logits); logits "
                f"within {MAX_LOGIT_DIFF} of transformers' on its continuations")
        return embedded and _exact(check), rule
    threshold = AGREEMENT[quantization]
    check["threshold"] = threshold
    rule = (f"chat template and tokenizer embedded; top token agreeing with transformers' at "
            f">= {threshold:.0%} of the teacher-forced positions")
    return embedded and check["agreement"] >= threshold, rule


def check_lora(lora_gguf: Path, base_gguf: Path, base_dir: Path, adapter_dir: Path) -> dict:
    """The adapter's LoRA GGUF over the base model's f16 GGUF in llama.cpp against base + adapter
    in transformers (peft, unmerged): the same greedy tokens, and the same effect on the logits."""
    ref, base_forced = _lora_reference(base_dir, adapter_dir)
    check: dict = {"passed": False, "kind": "lora_greedy_tokens", "engine": "llama.cpp",
                   "llama_cpp_python": llamacpp.version(), "base": "f16 GGUF of the base model"}
    try:
        with llamacpp.Model(base_gguf, lora=lora_gguf) as engine:
            with_lora: list[np.ndarray] = []
            check.update(compare_chains(engine, ref.chains, with_lora))
        with llamacpp.Model(base_gguf) as engine:
            without = [engine.logits(c.prompt + c.tokens[:-1])[len(c.prompt) - 1:]
                       for c in ref.chains]
            base_tokens = [engine.greedy(c.prompt, NEW_TOKENS)[0] for c in ref.chains]
    except llamacpp.LoadFailed as exc:
        check["error"] = str(exc)
        raise CheckFailed(str(exc), check) from exc
    theirs = np.concatenate(with_lora) - np.concatenate(without)
    ours = np.concatenate([c.logits for c in ref.chains]) - np.concatenate(base_forced)
    check.update(_effect(theirs, ours))
    # greedy tokens the LoRA changes in llama.cpp: it gives transformers' base + adapter
    # chains, so these are the adapter's changes too
    check["tokens_changed_by_adapter"] = _changed([c.tokens for c in ref.chains], base_tokens)
    low, high = EFFECT_RATIO
    check["rule"] = (f"greedy tokens of base + adapter equal for {NEW_TOKENS} tokens a prompt "
                     f"(parting only at near ties < {NEAR_TIE}), logits within "
                     f"{MAX_LOGIT_DIFF}; the adapter's effect on the "
                     f"logits: cosine >= {EFFECT_COSINE}, norm ratio in [{low}, {high}]")
    check["passed"] = _exact(check) and _effect_matches(check)
    if not check["passed"]:
        raise CheckFailed("the LoRA GGUF over the base GGUF does not answer like base + adapter "
                          "in llama.cpp", check)
    return check


def _effect(theirs: np.ndarray, ours: np.ndarray) -> dict:
    """How the adapter moves llama.cpp's logits (``theirs``) against how it moves transformers'."""
    a, b = theirs.ravel().astype(np.float64), ours.ravel().astype(np.float64)
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(a @ b / (norm_a * norm_b)) if norm_a and norm_b else 0.0
    return {"effect_cosine": round(cosine, 4),
            "effect_norm_ratio": round(norm_a / norm_b, 4) if norm_b > 1e-6 else None,
            "effect_rms_logits": round(norm_b / np.sqrt(b.size), 4),
            "effect_rms_logits_llama_cpp": round(norm_a / np.sqrt(a.size), 4)}


def _effect_matches(check: dict) -> bool:
    if check["effect_norm_ratio"] is None:  # an adapter that changes nothing (B still zero)
        return check["effect_rms_logits_llama_cpp"] < NEAR_TIE / 10
    low, high = EFFECT_RATIO
    return check["effect_cosine"] >= EFFECT_COSINE and low <= check["effect_norm_ratio"] <= high


def _changed(with_adapter: list[list[int]], without: list[list[int]]) -> int:
    return sum(a != b for x, y in zip(with_adapter, without) for a, b in zip(x, y))
