"""OpenAI's Responses API, its stateless subset: ``POST /v1/responses`` as a chat completion.

The gateway admits, limits, routes and settles a Responses request exactly as the chat
completion it becomes (tuneplex.inference.gateway): :func:`chat_body` checks the request, field
by field, and turns it into the chat completions body the engine gets; :func:`answer` turns the
chat completion the gateway put together into a Response object, and :class:`Events` turns the
engine's chat chunks into the Responses API's streaming events, in OpenAI's order.

Nothing is stored: ``store`` is accepted and answered ``false``, and what needs a stored
response (``previous_response_id``, ``conversation``, ``background``), tools and the other
OpenAI fields the served models cannot honour are refused with ``unsupported_parameter``
naming the field (null, OpenAI's "not given", is accepted for each). Pure functions and
classes over parsed JSON: no I/O here.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tuneplex.core.errors import ApiError
from tuneplex.inference.checks import _boolean, _is_number, _number, _string, check_model
from tuneplex.inference.checks import _stream_options as _checked_stream_options
from tuneplex.inference.streams import EngineStreamError

RESPONSES = "responses"
ROLES = ("user", "assistant", "system", "developer")
MESSAGE_KEYS = {"type", "role", "content", "id", "status"}
STREAM_OPTIONS = frozenset({"include_obfuscation"})
ITEM_STATUSES = ("in_progress", "completed", "incomplete")
# A text part of a message, as a client writes it (input_text) or hands back one of our
# answers' parts (output_text, whose annotations and logprobs describe that earlier answer).
TEXT_PARTS = {"input_text": {"type", "text"},
              "output_text": {"type", "text", "annotations", "logprobs"}}
NON_TEXT_PARTS = ("input_image", "input_file", "input_audio", "refusal")
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
FORMATS = ("text", "json_object", "json_schema")
JSON_SCHEMA_KEYS = {"type", "name", "schema", "strict", "description"}
MAX_SCHEMA_NAME = 64

_STATELESS = ("responses are not stored here (store is always false): send the whole "
              "conversation in input")
_NO_TOOLS = "tools are not supported by /v1/responses here; /v1/chat/completions takes them"
_CACHE = "the engine's prefix cache is automatic and kept apart per organization"
# OpenAI fields that Tuneplex does not honour, with the values that ask for nothing more than
# what is done anyway (null is always one): any other value is refused, never ignored.
REFUSED: dict[str, tuple[tuple, str]] = {
    "previous_response_id": ((), _STATELESS),
    "conversation": ((), _STATELESS),
    "background": ((False,), "responses are answered while the request lasts (stream a long one)"),
    "background_options": ((), "responses are answered while the request lasts"),
    "prompt": ((), "stored prompt templates do not exist here: send the text in input"),
    "reasoning": ((), "the served models have no separate reasoning"),
    "tools": (([],), _NO_TOOLS),
    "tool_choice": (("none", "auto"), _NO_TOOLS),
    "max_tool_calls": ((), _NO_TOOLS),
    "include": (([],), "there is nothing more to include"),
    "top_logprobs": ((), "log probabilities come from /v1/chat/completions (logprobs)"),
    "truncation": (("disabled",), "an input longer than the model's context is a 400"),
    "service_tier": (("auto", "default"), "there is one service tier"),
    "prompt_cache_key": ((), _CACHE),
    "prompt_cache_retention": ((), _CACHE),
    "prompt_cache_options": ((), _CACHE),
    "safety_identifier": ((), "no safety system here reads it"),
    "context_management": ((), "the input is sent as it is"),
    "moderation": ((), "no moderation model runs here"),
    "image": ((), "the served models read text only"),
    "access_programs": ((), "there are no access programs here"),
}
SUPPORTED = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
             "stream", "stream_options", "metadata", "store", "user", "text",
             "parallel_tool_calls"}
ALLOWED_FIELDS = SUPPORTED | set(REFUSED)


def _invalid(message: str, param: str, code: str = "invalid_type") -> ApiError:
    return ApiError(message, code=code, param=param)


@dataclass
class Request:
    """What a Response object repeats of its request, and the ids of what it makes."""

    model: str
    max_output_tokens: int
    echo: dict[str, Any]  # instructions, metadata, temperature, ...: as the request gave them
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict], usage: dict | None = None, *,
                 incomplete: str | None = None, error: dict | None = None) -> dict:
        """The Response object in OpenAI's shape."""
        ended = status in ("completed", "incomplete")
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": status, "background": False, "error": error,
                "incomplete_details": None if incomplete is None else {"reason": incomplete},
                "model": self.model, "output": output, "usage": usage,
                "max_output_tokens": self.max_output_tokens, "previous_response_id": None,
                "reasoning": None, "store": False, "tools": [], "truncation": "disabled",
                "service_tier": "default", "top_logprobs": None,
                "completed_at": int(time.time()) if ended else None, **self.echo}

    def message(self, text: str | None, status: str) -> dict:
        """Our one output item: an assistant message (no content yet while ``text`` is None)."""
        content = [] if text is None else [_text_part(text)]
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status,
                "content": content}


class ChatBody(dict):
    """The chat completions body the engine gets (sent as JSON, as any dict), with the
    Responses ``request`` it was made from, which the engine never sees."""

    __slots__ = ("request",)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# --- the request ----------------------------------------------------------------------------------

def chat_body(body: dict, *, max_tokens: int) -> ChatBody:
    """The chat completion that answers the Responses request ``body`` (a parsed JSON object),
    or an ApiError naming the first field at fault. ``max_tokens``: the installation's cap on
    generated tokens (TUNEPLEX_INFERENCE_MAX_TOKENS), also the default."""
    _check_fields(body)
    check_model(body)
    messages = _instructions(body) + _input_messages(body.get("input"))
    _boolean(body, "stream")
    _stream_options(body)
    _boolean(body, "store")
    _boolean(body, "parallel_tool_calls")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _string(body, "user", 512)
    _metadata(body.get("metadata"))
    most = _max_output_tokens(body.get("max_output_tokens"), max_tokens)
    chat = ChatBody(model=body["model"], messages=messages, max_tokens=most)
    for name in ("temperature", "top_p", "user", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    text = body.get("text")
    response_format = _response_format(text)
    if response_format is not None:
        chat["response_format"] = response_format
    chat.request = Request(model=body["model"], max_output_tokens=most, echo={
        "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "user": body.get("user"), "text": text or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False})
    return chat


def _check_fields(body: dict) -> None:
    for name in body:
        if name in SUPPORTED:
            continue
        if name not in REFUSED:
            raise _invalid(f"Unrecognized request argument: {name}. The fields /v1/responses "
                           f"accepts are: {', '.join(sorted(SUPPORTED))}.", name, "unknown_parameter")
        value, (accepted, why) = body[name], REFUSED[name]
        if value is None or any(type(value) is type(a) and value == a for a in accepted):
            continue
        besides = f" (accepted: null or {' or '.join(json.dumps(a) for a in accepted)})" \
            if accepted else ""
        raise _invalid(f"{name} is not supported: {why}{besides}.", name, "unsupported_parameter")


def _instructions(body: dict) -> list[dict]:
    _string(body, "instructions", 2**31)
    instructions = body.get("instructions")
    return [] if instructions is None else [{"role": "system", "content": instructions}]


def _input_messages(given) -> list[dict]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise _invalid("input is required: a string, or a non-empty list of messages.", "input",
                       "invalid_input")
    return [_message(item, f"input[{index}]") for index, item in enumerate(given)]


def _message(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise _invalid("Each input item must be a message object.", where, "invalid_input")
    kind = item.get("type")
    if kind is not None and kind != "message":
        raise _invalid(f"Input items of type {kind!r} are not supported: only messages (no tool "
                       "calls, reasoning or item references).", f"{where}.type",
                       "unsupported_value" if isinstance(kind, str) else "invalid_type")
    for key in item:
        if key not in MESSAGE_KEYS:
            raise _invalid(f"Unrecognized field of a message: {key}; a message has "
                           f"{', '.join(sorted(MESSAGE_KEYS))}.", f"{where}.{key}", "unknown_parameter")
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _invalid(f"A message needs a role, one of {', '.join(ROLES)}.", f"{where}.role",
                       "invalid_input")
    if item.get("id") is not None and not isinstance(item["id"], str):
        raise _invalid("A message's id must be a string.", f"{where}.id")
    if item.get("status") is not None and item["status"] not in ITEM_STATUSES:
        raise _invalid(f"A message's status is one of {', '.join(ITEM_STATUSES)}.", f"{where}.status",
                       "invalid_value")
    return {"role": role, "content": _content(item.get("content"), f"{where}.content")}


def _content(content, where: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _invalid("A message's content must be a string or a non-empty list of text parts.",
                       where, "invalid_input")
    return [{"type": "text", "text": _text(part, f"{where}[{index}]")}
            for index, part in enumerate(content)]


def _text(part, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in NON_TEXT_PARTS:
        raise _invalid(f"Content parts of type {kind} are not supported: the served models read "
                       "text (input_text, or output_text handed back).", f"{where}.type",
                       "unsupported_value")
    if not isinstance(kind, str) or kind not in TEXT_PARTS:
        raise _invalid("A content part needs a type, input_text or output_text.", f"{where}.type",
                       "invalid_input")
    for key in part:
        if key not in TEXT_PARTS[kind]:
            raise _invalid(f"Unrecognized field of an {kind} part: {key}.", f"{where}.{key}",
                           "unknown_parameter")
    if not isinstance(part.get("text"), str):
        raise _invalid(f"An {kind} part needs its text, a string.", f"{where}.text")
    for key in ("annotations", "logprobs"):
        if part.get(key) is not None and not isinstance(part[key], list):
            raise _invalid(f"{key} must be a list.", f"{where}.{key}")
    return part["text"]


def _stream_options(body: dict) -> None:
    _checked_stream_options(body, STREAM_OPTIONS)
    if (body.get("stream_options") or {}).get("include_obfuscation") is True:
        raise _invalid("Stream obfuscation is not supported: delta events carry no "
                       "obfuscation field (accepted: false or null).",
                       "stream_options.include_obfuscation", "unsupported_parameter")


def _metadata(metadata) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _invalid("metadata must be an object of strings.", "metadata")
    if len(metadata) > MAX_METADATA:
        raise _invalid(f"metadata has at most {MAX_METADATA} keys.", "metadata", "too_many_metadata_keys")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise _invalid(f"A metadata key is at most {MAX_METADATA_KEY} characters long.",
                           f"metadata.{key[:MAX_METADATA_KEY]}", "string_too_long")
        if not isinstance(value, str):
            raise _invalid("A metadata value must be a string.", f"metadata.{key}")
        if len(value) > MAX_METADATA_VALUE:
            raise _invalid(f"A metadata value is at most {MAX_METADATA_VALUE} characters long.",
                           f"metadata.{key}", "string_too_long")


def _max_output_tokens(value, cap: int) -> int:
    if value is None:
        return cap
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid("max_output_tokens must be an integer.", "max_output_tokens")
    if not 1 <= value <= cap:
        raise _invalid(f"max_output_tokens must be between 1 and {cap} "
                       "(TUNEPLEX_INFERENCE_MAX_TOKENS).", "max_output_tokens",
                       "max_output_tokens_out_of_range")
    return value


def _response_format(text) -> dict | None:
    """Chat's ``response_format`` for the request's ``text`` configuration (None: plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _invalid("text must be an object.", "text")
    for key in text:
        if key == "verbosity":
            if text[key] is not None:
                raise _invalid("text.verbosity is not supported: the served models have no "
                               "verbosity setting.", "text.verbosity", "unsupported_parameter")
        elif key != "format":
            raise _invalid(f"Unrecognized field of text: {key}.", f"text.{key}", "unknown_parameter")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if not isinstance(kind, str) or kind not in FORMATS:
        raise _invalid(f"text.format must be an object whose type is one of {', '.join(FORMATS)}.",
                       "text.format.type", "invalid_value")
    allowed = JSON_SCHEMA_KEYS if kind == "json_schema" else {"type"}
    for key in fmt:
        if key not in allowed:
            raise _invalid(f"Unrecognized field of a {kind} format: {key}.", f"text.format.{key}",
                           "unknown_parameter")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": _json_schema(fmt)}


def _json_schema(fmt: dict) -> dict:
    name = fmt.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_SCHEMA_NAME or not all(
            c.isascii() and (c.isalnum() or c in "_-") for c in name):
        raise _invalid(f"text.format.name is required: up to {MAX_SCHEMA_NAME} letters, digits, "
                       "underscores or dashes.", "text.format.name", "invalid_value")
    if not isinstance(fmt.get("schema"), dict):
        raise _invalid("text.format.schema must be a JSON schema (an object).", "text.format.schema")
    if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
        raise _invalid("text.format.strict must be true or false.", "text.format.strict")
    if fmt.get("description") is not None and not isinstance(fmt["description"], str):
        raise _invalid("text.format.description must be a string.", "text.format.description")
    return {key: fmt[key] for key in ("name", "schema", "strict", "description")
            if fmt.get(key) is not None}


# --- the answer -----------------------------------------------------------------------------------

def _outcome(finish_reason) -> tuple[str, str | None]:
    """The Response's status and incomplete reason for a chat choice's finish reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


def usage(chat_usage) -> dict | None:
    """The Responses usage of a chat completion's usage."""
    if not isinstance(chat_usage, dict):
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    details = chat_usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached if _is_number(cached) else 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def answer(chat: dict, *, request: Request) -> dict:
    """The Response object of a (non-streamed) chat completion that answered ``request``."""
    choice = (chat.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    status, incomplete = _outcome(choice.get("finish_reason"))
    return request.response(status, [request.message(text, status)], usage(chat.get("usage")),
                            incomplete=incomplete)


class Events:
    """The Responses API's server-sent events for one streamed request, made from the chat
    chunks of the engine's stream, numbered in order (``sequence_number``):

    response.created, response.in_progress, response.output_item.added,
    response.content_part.added (:meth:`opening`); a response.output_text.delta for each piece
    of text (:meth:`add`); response.output_text.done, response.content_part.done,
    response.output_item.done, and response.completed, or response.incomplete when the answer
    reached max_output_tokens (:meth:`closing`, at the engine's ``[DONE]``). An engine that
    fails or breaks off ends the stream with response.failed (:meth:`failed`) instead.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sequence = 0
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.ended = False

    def _event(self, kind: str, **payload) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"

    def _where(self) -> dict:
        return {"item_id": self.request.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> bytes:
        started = self.request.response("in_progress", [])
        return (self._event("response.created", response=started)
                + self._event("response.in_progress", response=started)
                + self._event("response.output_item.added", output_index=0,
                              item=self.request.message(None, "in_progress"))
                + self._event("response.content_part.added", **self._where(),
                              part=_text_part(""))).encode()

    def add(self, chunk: dict) -> bytes:
        """The events of one engine chunk (often none: the usage-only chunks)."""
        if self.ended:
            return b""
        if "error" in chunk and not chunk.get("choices"):  # as the gateway answers a plain one
            error = EngineStreamError(chunk)
            return self.failed(error.message if error.status < 500 and error.message
                               else "The engine failed on this request.")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        shown = []
        for choice in chunk.get("choices") or ():
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                self.text.append(delta)
                shown.append(self._event("response.output_text.delta", **self._where(),
                                         delta=delta, logprobs=[]))
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        return "".join(shown).encode()

    def closing(self) -> bytes:
        """The closing events, once the engine's stream has ended as it should."""
        if self.ended:
            return b""
        self.ended = True
        text = "".join(self.text)
        status, incomplete = _outcome(self.finish_reason)
        item = self.request.message(text, status)
        return (self._event("response.output_text.done", **self._where(), text=text, logprobs=[])
                + self._event("response.content_part.done", **self._where(), part=_text_part(text))
                + self._event("response.output_item.done", output_index=0, item=item)
                + self._event(f"response.{status}", response=self.request.response(
                    status, [item], usage(self.usage), incomplete=incomplete))).encode()

    def failed(self, message: str) -> bytes:
        """The last event of a stream the engine failed or broke off."""
        if self.ended:
            return b""
        self.ended = True
        item = self.request.message("".join(self.text), "incomplete")
        return self._event("response.failed", response=self.request.response(
            "failed", [item], usage(self.usage),
            error={"code": "server_error", "message": message})).encode()
