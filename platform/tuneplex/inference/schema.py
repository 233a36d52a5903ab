"""OpenAPI for the inference endpoints (plain async Django views, so described here by hand).

Registered as a drf-spectacular postprocessing hook; the request and response bodies are
OpenAI's, which the engine produces and the gateway passes through.
"""

from __future__ import annotations

from tuneplex.core.schema import ERROR_SCHEMA

_ERROR = {"$ref": "#/components/schemas/InferenceError"}
_ERRORS = {
    str(status): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
    for status, text in (
        (400, "Invalid request (code and param name the field)"),
        (401, "Missing or invalid API key"),
        (403, "The key lacks the infer scope"),
        (404, "No such model for this organization (model_not_found, model_not_deployed)"),
        (405, "Use POST (the Allow header says so)"),
        (413, "Body above TUNEPLEX_INFERENCE_MAX_BODY"),
        (429, "A limit was reached: the key's requests, the organization's tokens or requests in "
              "flight, or failed authentications from this address (Retry-After header)"),
        (502, "The engine failed on this request"),
        (503, "No engine replica can serve the model now, or the limits' store cannot be reached "
              "(limits_unavailable; Retry-After header)"),
    )
}
_NUMBER = {"type": "number"}
# Every field the gateway lets through, with the checks it makes (tuneplex.inference.checks):
# anything else is refused as unknown_parameter.
_COMMON_REQUEST = {
    "model": {"type": "string", "minLength": 1, "maxLength": 300,
              "description": "A base model name or one of your adapters' names."},
    "stream": {"type": "boolean", "default": False,
               "description": "Server-sent events, ending with `data: [DONE]`."},
    "stream_options": {"type": "object", "additionalProperties": False, "properties": {
        "include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}},
        "description": "Only with stream true."},
    "max_tokens": {"type": "integer", "minimum": 1,
                   "description": "At most TUNEPLEX_INFERENCE_MAX_TOKENS (also the default)."},
    "n": {"type": "integer", "minimum": 1, "description": "At most TUNEPLEX_INFERENCE_MAX_N."},
    "temperature": {**_NUMBER, "minimum": 0, "maximum": 2},
    "top_p": {**_NUMBER, "minimum": 0, "maximum": 1},
    "presence_penalty": {**_NUMBER, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUMBER, "minimum": -2, "maximum": 2},
    "stop": {"oneOf": [{"type": "string"},
                       {"type": "array", "maxItems": 4, "items": {"type": "string"}}]},
    "seed": {"type": "integer"},
    "user": {"type": "string", "maxLength": 512},
    "logit_bias": {"type": "object", "maxProperties": 300,
                   "additionalProperties": {**_NUMBER, "minimum": -100, "maximum": 100}},
}
_CHAT_REQUEST = {
    "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array"}], "nullable": True}}}},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                     "description": "Needs logprobs true."},
    "response_format": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object"}}},
    "tools": {"type": "array", "maxItems": 128, "items": {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"}}}}}},
    "tool_choice": {"oneOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"}}}}}]},
    "parallel_tool_calls": {"type": "boolean"},
}
_COMPLETION_REQUEST = {
    "prompt": {"oneOf": [{"type": "string"},
                         {"type": "array", "minItems": 1, "items": {"type": "string"}}]},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    "echo": {"type": "boolean"},
    "suffix": {"type": "string"},
}
# /v1/responses (tuneplex.inference.responses): every field it accepts; the OpenAI fields it
# does not honour are listed with null as their one value (anything else is a 400
# unsupported_parameter naming the field), so that the schema says which ones they are.
_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["input_text", "output_text"]}, "text": {"type": "string"},
    "annotations": {"type": "array", "nullable": True, "description": "output_text only"},
    "logprobs": {"type": "array", "nullable": True, "description": "output_text only"}}}
_INPUT_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "type": {"type": "string", "enum": ["message"], "nullable": True},
    "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
    "content": {"oneOf": [{"type": "string"},
                          {"type": "array", "minItems": 1, "items": _TEXT_PART}]},
    "id": {"type": "string", "nullable": True},
    "status": {"type": "string", "enum": ["in_progress", "completed", "incomplete"],
               "nullable": True}}}
_RESPONSES_REQUEST = {
    "model": _COMMON_REQUEST["model"],
    "input": {"oneOf": [{"type": "string"},
                        {"type": "array", "minItems": 1, "items": _INPUT_MESSAGE}],
              "description": "Text (a user message) or messages; text content only."},
    "instructions": {"type": "string", "nullable": True,
                     "description": "A system message put before the input."},
    "max_output_tokens": {"type": "integer", "minimum": 1, "nullable": True,
                          "description": "At most TUNEPLEX_INFERENCE_MAX_TOKENS (also the default)."},
    "temperature": {**_COMMON_REQUEST["temperature"], "nullable": True},
    "top_p": {**_COMMON_REQUEST["top_p"], "nullable": True},
    "stream": {"type": "boolean", "nullable": True, "default": False,
               "description": "OpenAI's Responses events (response.created ... response.completed)."},
    "stream_options": {"type": "object", "nullable": True, "additionalProperties": False,
                       "properties": {"include_obfuscation": {"type": "boolean", "enum": [False],
                                                              "nullable": True}},
                       "description": "Only with stream true; no obfuscation is sent."},
    "metadata": {"type": "object", "nullable": True, "maxProperties": 16,
                 "additionalProperties": {"type": "string", "maxLength": 512},
                 "description": "Up to 16 keys of at most 64 characters; repeated in the answer."},
    "store": {"type": "boolean", "nullable": True,
              "description": "Accepted, never honoured: nothing is stored (answered false)."},
    "user": {**_COMMON_REQUEST["user"], "nullable": True},
    "text": {"type": "object", "nullable": True, "additionalProperties": False, "properties": {
        "format": {"type": "object", "nullable": True, "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
            "name": {"type": "string", "description": "json_schema: required"},
            "schema": {"type": "object", "description": "json_schema: required"},
            "strict": {"type": "boolean", "nullable": True},
            "description": {"type": "string", "nullable": True}}},
        "verbosity": {"nullable": True, "enum": [None]}}},
    "parallel_tool_calls": {"type": "boolean", "nullable": True},
    "tools": {"type": "array", "nullable": True, "maxItems": 0, "description": "No tools."},
    "tool_choice": {"type": "string", "nullable": True, "enum": ["none", "auto"]},
    "include": {"type": "array", "nullable": True, "maxItems": 0},
    "truncation": {"type": "string", "nullable": True, "enum": ["disabled"]},
    "service_tier": {"type": "string", "nullable": True, "enum": ["auto", "default"]},
    "background": {"type": "boolean", "nullable": True, "enum": [False]},
    **{name: {"nullable": True, "enum": [None], "description": "Not supported (only null)."}
       for name in ("previous_response_id", "conversation", "background_options", "prompt",
                    "reasoning", "max_tool_calls", "top_logprobs", "prompt_cache_key",
                    "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
                    "context_management", "moderation", "image", "access_programs")},
}
_MODEL = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
    "created": {"type": "integer"}, "owned_by": {"type": "string"},
    "root": {"type": "string"}, "parent": {"type": "string", "nullable": True}}}


def _limited(properties: dict) -> dict:
    """The properties with this installation's caps as their maxima."""
    from django.conf import settings

    caps = {"max_tokens": settings.INFERENCE_MAX_TOKENS, "max_completion_tokens":
            settings.INFERENCE_MAX_TOKENS, "max_output_tokens": settings.INFERENCE_MAX_TOKENS,
            "n": settings.INFERENCE_MAX_N}
    return {name: {**schema, "maximum": caps[name]} if name in caps else schema
            for name, schema in properties.items()}


def _completion_path(summary: str, required: list[str], properties: dict,
                     answer: str = "OpenAI's completion object, or its chunks as server-sent "
                                   "events") -> dict:
    return {"post": {
        "operationId": summary.lower().replace(" ", "_"),
        "summary": summary,
        "tags": ["inference"],
        "security": [{"ApiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": required, "additionalProperties": False,
            "properties": _limited(properties)}}}},
        "responses": {
            "200": {"description": answer,
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_ERRORS,
        },
    }}


def add_inference_paths(result, generator, request, public):
    # The gateway answers errors in the API's one shape (request_id included).
    result.setdefault("components", {}).setdefault("schemas", {})["InferenceError"] = ERROR_SCHEMA
    result["components"]["schemas"]["Model"] = _MODEL
    paths = result.setdefault("paths", {})
    paths["/v1/chat/completions"] = _completion_path("Create chat completion", ["model", "messages"],
                                                     {**_COMMON_REQUEST, **_CHAT_REQUEST})
    paths["/v1/completions"] = _completion_path("Create completion", ["model", "prompt"],
                                                 {**_COMMON_REQUEST, **_COMPLETION_REQUEST})
    paths["/v1/responses"] = _completion_path(
        "Create response", ["model", "input"], _RESPONSES_REQUEST,
        "OpenAI's Response object (stateless: store is always false), or its events "
        "(response.created ... response.completed) as server-sent events")
    paths["/v1/models"] = {"get": {
        "operationId": "list_models", "summary": "Models you can call: served base models and your "
                                                 "deployed adapters",
        "tags": ["inference"], "security": [{"ApiKey": []}],
        "responses": {"200": {"description": "A list", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"object": {"type": "string"}, "data": {
                "type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}}}},
            "401": _ERRORS["401"], "403": _ERRORS["403"]}}}
    paths["/v1/models/{model}"] = {"get": {
        "operationId": "retrieve_model", "summary": "Retrieve a model you can call",
        "tags": ["inference"], "security": [{"ApiKey": []}],
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The model", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Model"}}}},
            "401": _ERRORS["401"], "403": _ERRORS["403"], "404": _ERRORS["404"]}}}
    return result
