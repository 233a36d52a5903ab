"""Downloads: every artifact the API hands out (a dataset, an adapter, a merged model, training
curves) leaves the web process here, in bounded chunks, or as a redirect to the bucket.

Under ASGI, Django turns a response's synchronous iterator into a list before it sends the first
byte (a 10 GB merged model would be 10 GB of memory), so the chunks are read from storage by an
asynchronous iterator, one chunk at a time, each read in a thread of its own download. Under
WSGI (and Django's test client) the synchronous iterator itself streams. Either way at most one
chunk of a download is in memory at a time, and the server's flow control keeps a slow client
from piling chunks up.

- :func:`blob_response`: one blob. With S3 storage and ``TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS``,
  a 302 to a presigned URL of the object instead: the web process never carries the bytes.
  Range requests (RFC 9110): one range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) is answered
  206 with those bytes only, read from that offset (the bytes before it are never read); a
  range past the end 416; several ranges, or a header we do not understand, the whole (200).
  ``Accept-Ranges: bytes`` says so on every blob download, so a client can resume one.
- :func:`zip_response`: several blobs as one zip, built while it is sent (never on disk).

Callers authorize first: they are handed blob names of the caller's organization only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import re
import zipfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import (
    HttpRequest,
    HttpResponseBase,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.utils.http import content_disposition_header

from tuneplex.core.errors import error_body
from tuneplex.core.storage import artifact_storage, open_stream

CHUNK = 2**20


def blob_response(request: HttpRequest, name: str, *, filename: str,
                  content_type: str) -> HttpResponseBase:
    """Blob ``name`` as an attachment called ``filename``."""
    disposition = content_disposition_header(as_attachment=True, filename=filename)
    storage = artifact_storage()
    if settings.DOWNLOAD_REDIRECT_SECONDS and _is_s3(storage):
        url = storage.url(name, expire=settings.DOWNLOAD_REDIRECT_SECONDS, parameters={
            "ResponseContentDisposition": disposition, "ResponseContentType": content_type})
        response = HttpResponseRedirect(url)
        response["Cache-Control"] = "no-store"  # the URL is a credential while it lasts
        return response
    size = storage.size(name)
    try:
        wanted = byte_range(request.META.get("HTTP_RANGE", ""), size)
    except RangeNotSatisfiable:
        response = JsonResponse(error_body(
            "range_not_satisfiable", f"The range asked for is not within the {size} bytes of "
            "the content.", "Range"), status=416)
        response["Content-Range"] = f"bytes */{size}"
        response["Accept-Ranges"] = "bytes"
        return response
    start, end = wanted or (0, size - 1)
    chunks = _blob_chunks(name, start, end - start + 1)
    response = StreamingHttpResponse(_served(request, chunks), content_type=content_type,
                                     status=206 if wanted else 200)
    response["Content-Length"] = str(end - start + 1)
    if wanted:
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
    response["Content-Disposition"] = disposition
    response["Accept-Ranges"] = "bytes"
    return response


class RangeNotSatisfiable(Exception):
    pass


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The one range ``header`` asks of ``size`` bytes, as (first, last) byte; None for the
    whole (no header, one we do not understand, several ranges). RangeNotSatisfiable for a
    range that starts past the end, or a suffix of no bytes."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last n bytes
        if not int(last) or not size:
            raise RangeNotSatisfiable(header)
        return max(0, size - int(last)), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, as RFC 9110 says
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, min(int(last), size - 1) if last else size - 1


def zip_response(request: HttpRequest, names: list[tuple[str, str]],
                 filename: str) -> StreamingHttpResponse:
    """A zip of blobs: ``names`` holds (blob name, name in the archive) pairs."""
    response = StreamingHttpResponse(_served(request, zip_stream(names)),
                                     content_type="application/zip")
    response["Content-Disposition"] = content_disposition_header(as_attachment=True,
                                                                 filename=filename)
    return response


def _blob_chunks(name: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
    """The blob's bytes from ``offset``, ``length`` of them (all to its end when None)."""
    if length == 0:
        return
    with open_stream(name, offset=offset) as source:
        left = length
        while chunk := source.read(CHUNK if left is None else min(CHUNK, left)):
            yield chunk
            if left is not None:
                left -= len(chunk)
                if left <= 0:
                    return


def zip_stream(names: list[tuple[str, str]]) -> Iterator[bytes]:
    """A zip of storage blobs (stored, not compressed: weights do not compress), as it is written."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for blob, arcname in names:
            with open_stream(blob) as source, archive.open(arcname, "w", force_zip64=True) as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
                    yield from sink.take()
    yield from sink.take()


class _Sink(io.RawIOBase):
    """Where the zip writer puts its bytes until they are taken (an unseekable stream)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def take(self) -> list[bytes]:
        taken, self.chunks = self.chunks, []
        return taken


def _served(request, chunks: Iterator[bytes]):
    """``chunks`` in the form the server streams: asynchronous under ASGI, as they are otherwise."""
    django_request = getattr(request, "_request", request)  # DRF's Request wraps Django's
    return _read_in_a_thread(chunks) if isinstance(django_request, ASGIRequest) else chunks


async def _read_in_a_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Each chunk read (in a thread: storage reads block) only when the server asks for it.

    One thread per download, so that closing the reader (the client went away) waits for a read
    in progress instead of racing it.
    """
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="download")
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # the request's (its id on any log line of a read)
    read = functools.partial(loop.run_in_executor, reader, context.run, next, chunks, None)
    try:
        while (chunk := await read()) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            reader.submit(context.run, close)  # after a read still running; closes the blob
        reader.shutdown(wait=False)


def _is_s3(storage) -> bool:
    from storages.backends.s3 import S3Storage

    return isinstance(storage, S3Storage)
