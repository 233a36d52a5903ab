"""ASGI entry point: ``uvicorn tuneplex.asgi:application``."""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tuneplex.settings")
application = get_asgi_application()

if settings.SERVE_STATIC:
    # The embedded default has no proxy in front; production serves /static/ from the proxy.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.core.exceptions import SuspiciousFileOperation
    from django.http import Http404

    class StaticFiles(ASGIStaticFilesHandler):
        """Django's static handler, but a path that tries to leave the static folders
        (``/static/../..``) is the 404 of any missing file, not an unhandled error (a 500)."""

        def serve(self, request):
            try:
                return super().serve(request)
            except SuspiciousFileOperation:
                raise Http404("No such file.") from None

    application = StaticFiles(application)

from tuneplex.core.asgi_limits import BodyLimitMiddleware  # noqa: E402 - needs settings loaded
from tuneplex.core.asgi_request_id import RequestIdAsgi  # noqa: E402
from tuneplex.inference.asgi import InferenceFastPath  # noqa: E402
from tuneplex.operations.asgi_metrics import MetricsEndpoint  # noqa: E402



class RefuseWebSockets:
    """No endpoint here speaks WebSocket (OpenAI's realtime API is not served): a handshake is
    refused (the server answers 403) rather than reaching Django's handler, which takes HTTP
    only and raised, a 500 and a logged traceback for every attempt."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})  # policy violation


application = RefuseWebSockets(
    RequestIdAsgi(MetricsEndpoint(BodyLimitMiddleware(InferenceFastPath(application)))))
