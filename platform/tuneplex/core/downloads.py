"""Downloads of artifacts: a zip of storage blobs, streamed (adapters, merged models, training
curves)."""

from __future__ import annotations

import zipfile

from django.http import StreamingHttpResponse

from tuneplex.core.storage import artifact_storage


def zip_stream(names: list[tuple[str, str]]):
    """Stream a zip of storage blobs without holding them in memory."""
    import io

    class Sink(io.RawIOBase):
        def __init__(self):
            self.chunks: list[bytes] = []

        def writable(self):
            return True

        def write(self, data):
            self.chunks.append(bytes(data))
            return len(data)

    sink = Sink()
    storage = artifact_storage()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for blob, arcname in names:
            with storage.open(blob, "rb") as source, archive.open(arcname, "w", force_zip64=True) as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
                    yield from sink.chunks
                    sink.chunks.clear()
    yield from sink.chunks


def zip_response(names: list[tuple[str, str]], filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(zip_stream(names), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
