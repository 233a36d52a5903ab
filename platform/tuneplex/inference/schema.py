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
        (413, "Body above TUNEPLEX_INFERENCE_MAX_BODY"),
        (429, "Per-key rate limit reached (Retry-After header)"),
        (503, "No engine replica can serve the model now"),
    )
}
_COMMON_REQUEST = {
    "model": {"type": "string", "description": "A base model name or one of your adapters' names."},
    "stream": {"type": "boolean", "default": False,
               "description": "Server-sent events, ending with `data: [DONE]`."},
    "max_tokens": {"type": "integer", "minimum": 1,
                   "description": "At most TUNEPLEX_INFERENCE_MAX_TOKENS (also the default)."},
    "n": {"type": "integer", "minimum": 1, "description": "At most TUNEPLEX_INFERENCE_MAX_N."},
    "temperature": {"type": "number"},
    "top_p": {"type": "number"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "seed": {"type": "integer"},
}
_MODEL = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
    "created": {"type": "integer"}, "owned_by": {"type": "string"},
    "root": {"type": "string"}, "parent": {"type": "string", "nullable": True}}}


def _completion_path(summary: str, required: list[str], extra: dict) -> dict:
    return {"post": {
        "operationId": summary.lower().replace(" ", "_"),
        "summary": summary,
        "tags": ["inference"],
        "security": [{"ApiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": required, "additionalProperties": True,
            "properties": {**_COMMON_REQUEST, **extra}}}}},
        "responses": {
            "200": {"description": "OpenAI's completion object, or its chunks as server-sent events",
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
    paths["/v1/chat/completions"] = _completion_path(
        "Create chat completion", ["model", "messages"],
        {"messages": {"type": "array", "minItems": 1, "items": {"type": "object"}},
         "max_completion_tokens": {"type": "integer", "minimum": 1},
         "stream_options": {"type": "object"}})
    paths["/v1/completions"] = _completion_path(
        "Create completion", ["model", "prompt"],
        {"prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}})
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
