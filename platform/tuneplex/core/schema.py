"""OpenAPI descriptions of our authentication schemes (loaded from CoreConfig.ready)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "tuneplex.apikeys.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "An organization API key: `Authorization: Bearer tpx_…`."}


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "tuneplex.tenancy.authentication.OrganizationSessionAuthentication"
    name = "Session"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": "sessionid",
                "description": "A signed-in browser session (writes also need the CSRF token)."}


# --- what every operation may answer, and the list envelope --------------------------------------

ERROR_SCHEMA = {
    "type": "object", "required": ["error", "request_id"],
    "properties": {
        "error": {
            "type": "object", "required": ["code", "message", "param"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "param": {"type": "string", "nullable": True}}},
        "request_id": {"type": "string", "description": "This request's id, as in its "
                       "X-Request-Id header and the server's log lines: quote it when you "
                       "report a problem"}},
}
_ERROR_TEXT = {
    "400": "Invalid input: `code` says what, `param` names the field",
    "401": "Missing or invalid credentials",
    "403": "The key's scopes or the member's role do not allow this",
    "404": "No such object in this organization",
    "409": "The object's state does not allow this now",
    "413": "The request body is too large",
    "416": "The range asked for (Range header) is not within the content; Content-Range: "
           "bytes */size says its size",
    "429": "The organization's request rate was reached (Retry-After says when to retry)",
}
_WRITES = {"post", "put", "patch", "delete"}


def _envelope(items: dict) -> dict:
    return {"type": "object", "required": ["object", "data", "has_more"], "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": items},
        "has_more": {"type": "boolean"},
        "first_id": {"type": "string", "nullable": True},
        "last_id": {"type": "string", "nullable": True}}}


def _constrain_list_parameters(operation: dict) -> None:
    """The list pages' query parameters, as the server checks them (core.pagination)."""
    from tuneplex.core.pagination import MAX_LIMIT

    for parameter in operation.get("parameters", []):
        if parameter.get("in") != "query":
            continue
        if parameter.get("name") == "limit":
            parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
        elif parameter.get("name") == "after":
            parameter["schema"] = {"type": "string", "maxLength": 100}


def _answers_conflicts(operation: dict) -> bool:
    """Reads that answer 409 until their object is ready (a merged model, training curves):
    their 200 is a download."""
    ok = operation["responses"].get("200", {}).get("content", {})
    return "application/zip" in ok


def _answers_ranges(operation: dict) -> bool:
    """Blob downloads, which answer a Range request 206 (and 416 when it is past the end)."""
    return "206" in operation["responses"]


def document_lists_and_errors(result, generator, request, public):
    """drf-spectacular postprocessing hook: list operations answer OpenAI's list envelope (not a
    bare array), and every operation documents the errors it can answer, in our one shape."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            ok = responses.get("200", {}).get("content", {}).get("application/json", {})
            if ok.get("schema", {}).get("type") == "array":
                ok["schema"] = _envelope(ok["schema"]["items"])
                named = {p.get("name") for p in operation.setdefault("parameters", [])}
                operation["parameters"] += [{"name": name, "in": "query", "required": False}
                                            for name in ("after", "limit") if name not in named]
            _constrain_list_parameters(operation)
            wanted = ["400", "401", "403", "429"]
            if "{" in path or method in _WRITES:  # a write may name an object (an eval, a model)
                wanted.append("404")
            if method in _WRITES or _answers_conflicts(operation):
                wanted.append("409")
            if method in _WRITES:
                wanted.append("413")
            if _answers_ranges(operation):
                wanted.append("416")
            for status in wanted:
                responses.setdefault(status, {
                    "description": _ERROR_TEXT[status],
                    "content": {"application/json": {"schema": error_ref}}})
            for status, response in responses.items():  # errors an operation names itself
                if status.startswith(("4", "5")) and "content" not in response:
                    response["content"] = {"application/json": {"schema": error_ref}}
    return result
