"""Turning an :class:`~jobs.training.jsonl.Example` into token ids and a loss mask.

Used by the trainer and by dataset statistics, so both count the same tokens.

chat examples go through the model's chat template. Each message's span is found by rendering the
conversation prefix by prefix (templates are prefix-stable); an assistant message's header
(``<|im_start|>assistant\\n`` and the like) is never trained, its content and end-of-turn are,
when its weight is 1. raw examples are their segments' tokens followed by the end-of-sequence token,
trained where the segment says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.training.jsonl import Example


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def tokenize_example(tokenizer, example: Example) -> TokenizedExample:
    ids: list[int] = []
    mask: list[int] = []

    def add(text: str, train: bool) -> None:
        tokens = _encode(tokenizer, text)
        ids.extend(tokens)
        mask.extend([1 if train else 0] * len(tokens))

    if example.kind == "chat":
        rendered = ""
        messages = list(example.messages)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                header_end = _render(tokenizer, messages[:index], generation_prompt=True)
                add(header_end[len(rendered):], False)
                full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
                add(full[len(header_end):], bool(message["weight"]))
            else:
                full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
                add(full[len(rendered):], False)
            rendered = full
    else:
        for segment in example.segments:
            add(segment.text, segment.train)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            mask.append(1)
    return TokenizedExample(input_ids=ids, loss_mask=mask)
