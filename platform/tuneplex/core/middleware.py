"""Limits applied before any view runs, answered in the API's error shape."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from tuneplex.core.errors import error_body, is_api_path

# Routes that stream large bodies to storage themselves (they enforce their own limit).
STREAMING_UPLOAD_PATHS: set[str] = set()


class ApiErrorMiddleware:
    """Rejects NUL in URLs (400) and oversized API bodies (413) before any view runs."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # NUL can never be part of a valid id or parameter, and PostgreSQL refuses it in text.
        if "\x00" in request.path or "%00" in request.META.get("QUERY_STRING", ""):
            return JsonResponse(error_body("bad_request", "The URL contains a NUL character."),
                                status=400)
        if is_api_path(request) and request.path not in STREAMING_UPLOAD_PATHS:
            length = request.META.get("CONTENT_LENGTH") or "0"
            try:
                size = int(length)
            except ValueError:
                return JsonResponse(error_body("bad_request", "Content-Length is not a number.",
                                               "Content-Length"), status=400)
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            if size > limit:
                return JsonResponse(
                    error_body("request_too_large",
                               f"The request body is {size} bytes; the limit is {limit} bytes."),
                    status=413,
                )
        return self.get_response(request)
