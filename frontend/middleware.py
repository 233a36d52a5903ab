"""Turns a service's ApiError escaping a dashboard view into a page with the error's own status
(for htmx requests, the API's JSON error, which the page shows): a 4xx with its message, never
a 500. Sync and async capable (MiddlewareMixin), so async views keep running without a thread hop."""

from __future__ import annotations

from django.http import JsonResponse
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin

from tuneplex.core.errors import ApiError, error_body, is_api_path


class ApiErrorPageMiddleware(MiddlewareMixin):
    def process_exception(self, request, exception):
        if not isinstance(exception, ApiError) or is_api_path(request):
            return None
        if getattr(request, "htmx", False):
            return JsonResponse(error_body(exception.code, exception.message, exception.param),
                                status=exception.status)
        return render(request, "error.html", {"status": exception.status,
                                              "message": exception.message}, status=exception.status)
