"""One error shape for the whole API: ``{"error": {"code", "message", "param"}, "request_id"}``.

Services raise :class:`ApiError` (or Django/DRF exceptions); the DRF exception handler and the
Django error handlers below turn every failure under /v1 into that shape with a proper status.
``request_id`` is the request's own (its ``X-Request-Id``, and the id on its log lines), so a
client quoting it leads to the log of what went wrong.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseServerError, JsonResponse
from django.shortcuts import render
from django.template import loader
from django.views.defaults import page_not_found
from rest_framework import exceptions as drf
from rest_framework.response import Response

from tuneplex.core.request_id import current as current_request_id


class ApiError(Exception):
    """A client error with a stable code, a message a person can act on, and the input at fault."""

    status = 400

    def __init__(self, message: str, *, code: str, param: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        if status is not None:
            self.status = status


class NotFound(ApiError):
    status = 404

    def __init__(self, message: str = "No such object.", *, param: str | None = None) -> None:
        super().__init__(message, code="not_found", param=param)


class Conflict(ApiError):
    status = 409


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param},
            "request_id": current_request_id.get()}


def server_error_body() -> dict[str, Any]:
    """An internal error's answer: the request id to quote, nothing of the internals (those are
    in the log line that carries the same id)."""
    return error_body("server_error", f"Internal error; it has been logged with request id "
                                      f"{current_request_id.get()}. Quote it when you report the "
                                      f"problem.")


def _first_validation_error(detail: Any, path: str = "") -> tuple[str | None, str, str]:
    """Walk DRF's nested error detail to the first leaf: (param path, message, code)."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if isinstance(key, int):  # an item of a list field
                child = f"{path}[{key}]"
            else:
                name = "" if key == "non_field_errors" else str(key)
                child = f"{path}.{name}" if path and name else (name or path)
            return _first_validation_error(value, child)
    if isinstance(detail, list):
        for index, value in enumerate(detail):
            if isinstance(value, (dict, list)) and value:
                return _first_validation_error(value, f"{path}[{index}]" if path else f"[{index}]")
            if not isinstance(value, (dict, list)):
                return _first_validation_error(value, path)
    code = getattr(detail, "code", None) or "invalid"
    return (path or None), str(detail), str(code)


_STATUS_CODES = {
    drf.NotAuthenticated: "unauthenticated",
    drf.AuthenticationFailed: "invalid_api_key",
    drf.PermissionDenied: "permission_denied",
    drf.NotFound: "not_found",
    drf.MethodNotAllowed: "method_not_allowed",
    drf.NotAcceptable: "not_acceptable",
    drf.UnsupportedMediaType: "unsupported_media_type",
    drf.ParseError: "invalid_json",
    drf.Throttled: "rate_limit_exceeded",
}


def api_exception_handler(exc: Exception, context: dict) -> Response | None:
    from rest_framework.views import set_rollback  # rest_framework.views imports our auth classes

    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        set_rollback()
        return Response(error_body(exc.code, exc.message, exc.param), status=exc.status)
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
    if not isinstance(exc, drf.APIException):
        return None  # a bug: Django's handler500 answers in the error shape
    set_rollback()
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))
    if isinstance(exc, drf.ValidationError):
        param, message, code = _first_validation_error(exc.detail)
        return Response(error_body(code, message, param), status=exc.status_code, headers=headers)
    code = next((c for cls, c in _STATUS_CODES.items() if isinstance(exc, cls)), None)
    detail = exc.detail
    if code is None:
        code = getattr(detail, "code", None) or "error"
    if isinstance(exc, drf.ParseError):
        message = f"The request body is not valid JSON: {detail}"
    else:
        message = str(detail)
    return Response(error_body(str(code), message), status=exc.status_code, headers=headers)


def is_api_path(request: HttpRequest) -> bool:
    return request.path.startswith("/v1/") or request.path == "/v1"


def handler400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = "The request could not be understood."
    if exception is not None and exception.__class__.__name__ == "RequestDataTooBig":
        return JsonResponse(error_body("request_too_large", str(exception)), status=413)
    return JsonResponse(error_body("bad_request", message), status=400)


def handler403(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = "You do not have permission to do this."
    if is_api_path(request) or getattr(request, "htmx", False):
        return JsonResponse(error_body("permission_denied", message), status=403)
    # A dashboard page: the reason, in the page.
    if exception is not None and str(exception):
        message = str(exception)
    return render(request, "error.html", {"status": 403, "message": message}, status=403)


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if is_api_path(request):
        return JsonResponse(error_body("not_found", f"Unknown route: {request.method} {request.path}"),
                            status=404)
    return page_not_found(request, exception, template_name="404.html")


def handler500(request: HttpRequest) -> HttpResponse:
    if is_api_path(request):
        return JsonResponse(server_error_body(), status=500)
    page = loader.get_template("500.html").render({"request_id": current_request_id.get()})
    return HttpResponseServerError(page)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    return JsonResponse(
        error_body("csrf_failed", f"CSRF verification failed: {reason}. Send the CSRF token, "
                   "or authenticate with an API key (Authorization: Bearer …)."),
        status=403,
    )
