"""Limits applied before any view runs, answered in the API's error shape."""

from __future__ import annotations

import re

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.deprecation import MiddlewareMixin

from tuneplex.core.errors import error_body, is_api_path

# Multipart framing around an uploaded file: boundaries, headers, the purpose field.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/v1/files",)
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# A part of an upload in parts: /v1/uploads/<id>/parts (ids as urls.ObjectIdConverter's).
UPLOAD_PART_PATH = re.compile(r"/v1/uploads/[A-Za-z0-9][A-Za-z0-9._-]{0,99}/parts")


def body_limit(path: str) -> tuple[int, str]:
    """(largest body accepted, what to tell a client that exceeds it) for an API path."""
    if path in UPLOAD_PATHS:
        limit = settings.FILE_UPLOAD_MAX_BYTES
        return limit + MULTIPART_OVERHEAD, f"the file size limit is {limit} bytes"
    if UPLOAD_PART_PATH.fullmatch(path):
        limit = settings.UPLOAD_PART_MAX_BYTES
        return (limit + MULTIPART_OVERHEAD,
                f"the part size limit is {limit} bytes (TUNEPLEX_UPLOAD_PART_MAX_BYTES)")
    if path in INFERENCE_PATHS:
        limit = settings.INFERENCE_MAX_BODY
        return limit, f"the inference request limit is {limit} bytes (TUNEPLEX_INFERENCE_MAX_BODY)"
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return limit, f"the request body limit is {limit} bytes"


def too_large(size: int, explanation: str) -> dict:
    return error_body("request_too_large", f"The request body is {size} bytes; {explanation}.")


class ApiErrorMiddleware(MiddlewareMixin):
    """Rejects NUL in URLs (400) and oversized API bodies (413) before any view runs.

    Sync and async capable (MiddlewareMixin), so async views run without a thread hop.
    """

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        # NUL can never be part of a valid id or parameter, and PostgreSQL refuses it in text.
        if "\x00" in request.path or "%00" in request.META.get("QUERY_STRING", ""):
            return JsonResponse(error_body("bad_request", "The URL contains a NUL character."),
                                status=400)
        if is_api_path(request):
            try:
                size = int(request.META.get("CONTENT_LENGTH") or "0")
            except ValueError:
                return JsonResponse(error_body("bad_request", "Content-Length is not a number.",
                                               "Content-Length"), status=400)
            limit, explanation = body_limit(request.path)
            if size > limit:
                return JsonResponse(too_large(size, explanation), status=413)
        return None
