"""The type and range of every optional field of a completion request, as OpenAI documents them.

The gateway checks each field it lets through before the engine sees it, so that a value of the
wrong type is a 400 naming the field (``param``), never an error deeper down. Pure functions.
"""

from __future__ import annotations

from tuneplex.core.errors import ApiError
from tuneplex.inference.streams import CHAT

MAX_MODEL_NAME = 300
MAX_STOP = 4
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128
MAX_USER = 512
STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
RESPONSE_FORMATS = {"text", "json_object", "json_schema"}
TOOL_CHOICES = {"none", "auto", "required"}


def _invalid(message: str, param: str, code: str = "invalid_type") -> ApiError:
    return ApiError(message, code=code, param=param)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise _invalid(f"{name} must be a number.", name)
    if not low <= value <= high:
        raise _invalid(f"{name} must be between {low:g} and {high:g}.", name, f"{name}_out_of_range")


def _boolean(body: dict, name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], bool):
        raise _invalid(f"{name} must be true or false.", name)


def _string(body: dict, name: str, most: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string.", name)
    if len(value) > most:
        raise _invalid(f"{name} is at most {most} characters long.", name, "string_too_long")


def _integer(body: dict, name: str, low: int, high: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(f"{name} must be an integer.", name)
    if not low <= value <= high:
        raise _invalid(f"{name} must be between {low} and {high}.", name, f"{name}_out_of_range")


def check_model(body: dict) -> None:
    """``model``: the name of a base model or of one of the caller's adapters."""
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
        raise _invalid("model is required: the name of a base model or of one of your adapters.",
                       "model", "missing_model" if model is None else "invalid_type")
    if "\x00" in model:  # no name has one, and the database refuses to look it up (was a 500)
        raise _invalid("A model name contains no NUL character.", "model", "invalid_value")


def check_options(body: dict, endpoint: str) -> None:
    """Raise an ApiError for the first optional field of ``body`` of the wrong type or range."""
    _boolean(body, "stream")
    _stream_options(body)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    _string(body, "user", MAX_USER)
    _stop(body)
    _logit_bias(body)
    if endpoint == CHAT:
        _boolean(body, "logprobs")
        _integer(body, "top_logprobs", 0, 20)
        if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
            raise _invalid("top_logprobs needs logprobs set to true.", "top_logprobs", "invalid_value")
        _boolean(body, "parallel_tool_calls")
        _response_format(body)
        _tools(body)
        _message_contents(body)
    else:
        _integer(body, "logprobs", 0, 5)
        _boolean(body, "echo")
        _string(body, "suffix", 2**20)


def _stream_options(body: dict, allowed: frozenset[str] = STREAM_OPTIONS) -> None:
    """``stream_options``: an object of ``allowed`` options, each true or false, with stream."""
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise _invalid("stream_options must be an object.", "stream_options")
    if body.get("stream") is not True:
        raise _invalid("stream_options is only allowed when stream is true.", "stream_options",
                       "invalid_value")
    for key, value in options.items():
        if key not in allowed:
            raise _invalid(f"Unrecognized stream option: {key}; the options are "
                           f"{', '.join(sorted(allowed))}.", f"stream_options.{key}",
                           "unknown_parameter")
        if value is not None and not isinstance(value, bool):
            raise _invalid(f"stream_options.{key} must be true or false.", f"stream_options.{key}")


def _stop(body: dict) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop must be a string or a list of strings.", "stop")
    if len(stop) > MAX_STOP:
        raise _invalid(f"stop has at most {MAX_STOP} sequences.", "stop", "too_many_stop_sequences")


def _logit_bias(body: dict) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise _invalid("logit_bias must be an object of token ids to numbers.", "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise _invalid(f"logit_bias has at most {MAX_LOGIT_BIAS} tokens.", "logit_bias",
                       "too_many_logit_biases")
    for token, value in bias.items():
        if not token.isdigit() or not _is_number(value) or not -100 <= value <= 100:
            raise _invalid("logit_bias maps token ids (strings of digits) to numbers between "
                           "-100 and 100.", f"logit_bias.{token}", "invalid_value")


def _response_format(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
        raise _invalid(f"response_format must be an object whose type is one of "
                       f"{', '.join(sorted(RESPONSE_FORMATS))}.", "response_format")
    if fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise _invalid("response_format of type json_schema needs a json_schema object.",
                       "response_format.json_schema")


def _tools(body: dict) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise _invalid(f"tools must be a list of at most {MAX_TOOLS} tools.", "tools")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise _invalid("Each tool needs type 'function'.", f"tools[{index}].type")
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _invalid("Each tool needs a function with a name.", f"tools[{index}].function")
    choice = body.get("tool_choice")
    if choice is None or (isinstance(choice, str) and choice in TOOL_CHOICES):
        return
    named = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(named, dict) and choice.get("type") == "function"
            and isinstance(named.get("name"), str)):
        raise _invalid("tool_choice must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}.", "tool_choice")
    if named["name"] not in {tool["function"]["name"] for tool in tools or ()}:
        raise _invalid("tool_choice names a function that is not in tools.",
                       "tool_choice.function.name", "invalid_value")


def _message_contents(body: dict) -> None:
    for index, message in enumerate(body["messages"]):
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _invalid("A message's content must be a string or a list of parts.",
                           f"messages[{index}].content")
