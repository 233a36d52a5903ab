"""What the gateway reads from an engine's event stream: the tokens so far, and the answer.

The gateway always asks the engine for a stream, with ``stream_options.continuous_usage_stats``:
vLLM then puts the usage of its choice so far on every chunk, so that a request that ends early
(the client went away, the replica died) is settled with the tokens generated until then, not
with nothing. A caller that asked for a plain (non-streamed) answer gets one put together from
the chunks by :class:`Assembler`, in OpenAI's shape.

Plain functions and classes over parsed chunks (dicts): no I/O here.
"""

from __future__ import annotations

import json
from typing import Any

CHAT, COMPLETIONS = "chat/completions", "completions"
# For a plain (non-streamed) request the engine reports every this many tokens (vLLM's
# per-request stream_interval; its first and last chunks come at once): a plain request whose
# client goes away is charged what the engine had reported, at most this many less one short.
PLAIN_REPORT_TOKENS = 8


def engine_stream_options(body: dict) -> dict:
    """The stream options the engine gets: usage on every chunk and at the end, whatever the
    caller asked for (what the caller sees is cut back to what it asked by :func:`for_caller`)."""
    return {**(body.get("stream_options") or {}), "include_usage": True, "continuous_usage_stats": True}


def dumps(chunk: dict) -> str:
    """A chunk as the engine writes it (compact, UTF-8 kept)."""
    return json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)


class Meter:
    """The tokens of one request so far, from the usage on its chunks.

    vLLM's running usage is per choice (``completion_tokens`` of that choice, ``prompt_tokens`` of
    its prompt); the last chunk's usage (no choices) is the whole request's and replaces the sum.
    For completions with several prompts, choice ``i`` belongs to prompt ``i // n``.
    """

    def __init__(self, endpoint: str, body: dict) -> None:
        self.n = int(body.get("n") or 1)
        prompt = body.get("prompt")
        self.prompts = len(prompt) if endpoint == COMPLETIONS and isinstance(prompt, list) else 1
        self.per_prompt = endpoint == COMPLETIONS
        self._completion: dict[int, int] = {}
        self._prompt: dict[int, int] = {}
        self._final: tuple[int, int] | None = None

    def see(self, chunk: dict) -> None:
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        choices = chunk.get("choices")
        if not choices:
            self._final = (prompt, completion)
            return
        for choice in choices:
            index = int(choice.get("index") or 0)
            self._completion[index] = completion
            self._prompt[index // self.n if self.per_prompt else 0] = prompt

    @property
    def final(self) -> bool:
        return self._final is not None

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens counted so far."""
        if self._final is not None:
            return self._final
        return sum(self._prompt.values()), sum(self._completion.values())

    def unseen_prompts(self) -> list[int]:
        """The prompts (by index) whose token count no chunk has told yet."""
        if self._final is not None:
            return []
        return [index for index in range(self.prompts) if index not in self._prompt]


def for_caller(chunk: dict, *, wants_usage: bool, wants_continuous: bool) -> dict | None:
    """The chunk as the caller asked for it: running usage only if it asked for it, the closing
    usage chunk only if it asked for usage; None when nothing of it is for the caller."""
    if "usage" not in chunk or wants_continuous:
        return chunk
    if chunk.get("choices"):
        return {key: value for key, value in chunk.items() if key != "usage"}
    return chunk if wants_usage else None


class EngineStreamError(Exception):
    """The engine reported an error inside the stream (after its 200)."""

    def __init__(self, payload: dict) -> None:
        error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
        self.message = str(error.get("message") or "")
        code = error.get("code")
        self.status = code if isinstance(code, int) and 400 <= code < 600 else 500
        super().__init__(self.message)


class Assembler:
    """OpenAI's non-streamed answer, put together from the chunks of its stream."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict | None = None
        self.fingerprint: str | None = None

    def add(self, chunk: dict) -> None:
        if "error" in chunk and "choices" not in chunk:
            raise EngineStreamError(chunk)
        if not self.head:
            self.head = {key: chunk.get(key) for key in ("id", "created", "model")}
        if chunk.get("system_fingerprint"):
            self.fingerprint = chunk["system_fingerprint"]
        for piece in chunk.get("choices") or ():
            self._add_choice(piece)
        if not chunk.get("choices") and isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]

    def _add_choice(self, piece: dict) -> None:
        index = int(piece.get("index") or 0)
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = {"index": index, "text": [], "role": "assistant",
                                            "tool_calls": {}, "logprobs": None,
                                            "finish_reason": None, "stop_reason": None}
        if self.endpoint == CHAT:
            delta = piece.get("delta") or {}
            choice["role"] = delta.get("role") or choice["role"]
            if delta.get("content"):
                choice["text"].append(delta["content"])
            for call in delta.get("tool_calls") or ():
                self._add_tool_call(choice["tool_calls"], call)
        elif piece.get("text"):
            choice["text"].append(piece["text"])
        if piece.get("logprobs"):
            choice["logprobs"] = _merge_logprobs(choice["logprobs"], piece["logprobs"])
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]
        if piece.get("stop_reason") is not None:
            choice["stop_reason"] = piece["stop_reason"]

    @staticmethod
    def _add_tool_call(calls: dict[int, dict], delta: dict) -> None:
        index = int(delta.get("index") or 0)
        call = calls.setdefault(index, {"id": None, "type": "function",
                                        "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def answer(self) -> dict:
        """The answer in OpenAI's shape (``chat.completion`` or ``text_completion``)."""
        choices = [self._choice(self.choices[index]) for index in sorted(self.choices)]
        return {**self.head, "object": "chat.completion" if self.endpoint == CHAT else "text_completion",
                "choices": choices, "usage": self.usage, "system_fingerprint": self.fingerprint}

    def _choice(self, choice: dict) -> dict:
        text = "".join(choice["text"])
        common = {"logprobs": choice["logprobs"], "finish_reason": choice["finish_reason"],
                  "stop_reason": choice["stop_reason"]}
        if self.endpoint != CHAT:
            return {"index": choice["index"], "text": text, **common}
        message: dict[str, Any] = {"role": choice["role"], "content": text, "refusal": None}
        if choice["tool_calls"]:
            message["tool_calls"] = [choice["tool_calls"][i] for i in sorted(choice["tool_calls"])]
            message["content"] = text or None
        return {"index": choice["index"], "message": message, **common}


def _merge_logprobs(kept: dict | None, more: dict) -> dict:
    """Chat's ``{"content": [...]}`` or completions' parallel lists, appended."""
    if kept is None:
        return {key: list(value) if isinstance(value, list) else value for key, value in more.items()}
    for key, value in more.items():
        if isinstance(value, list):
            kept.setdefault(key, []).extend(value)
        elif key not in kept or kept[key] is None:
            kept[key] = value
    return kept
