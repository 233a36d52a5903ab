"""Blobs written from streams in bounded memory: the parts of an upload, and the file assembled
from them. The same two operations on both backends:

- :func:`blob_put`: one blob from a readable stream of known size. Locally Django's storage
  (a spooled temporary file is renamed into place, not copied); on S3 one PutObject whose body
  is read from the stream while it is sent. (django-storages' ``save`` goes through boto3's
  managed transfer, which reads a seekable file into memory 8 MiB at a time, up to ten chunks
  at once: a 64 MiB part would be in memory whole.)
- :func:`blob_writer`: a blob written chunk by chunk that appears whole on :meth:`commit` or not
  at all (:meth:`abort`). Locally a scratch file renamed into place; on S3 a multipart upload
  of 8 MiB parts (one in memory at a time) completed by CompleteMultipartUpload.
  :func:`blob_writer_abandon` aborts what a writer whose process died left behind, from the
  two names it gave (``blob`` and ``token``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Protocol

from django.core.files import File as DjangoFile
from django.core.files.storage import Storage

from tuneplex.core.storage import artifact_storage

S3_PART = 8 * 2**20  # S3 wants at least 5 MiB in every part but the last


class BlobWriter(Protocol):
    blob: str  # the name the blob will have
    token: str  # what blob_writer_abandon needs besides the name: S3's upload id, or the scratch

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def blob_put(name: str, content: DjangoFile | BinaryIO, size: int) -> None:
    """Store ``content`` (``size`` bytes from its start; a request's uploaded file, or any
    binary stream) as blob ``name``, which must not exist yet."""
    storage = artifact_storage()
    content.seek(0)
    s3 = _s3(storage)
    if s3 is None:
        # An uploaded file spooled to disk keeps its temporary_file_path: moved, not copied.
        stored = storage.save(name, content if isinstance(content, DjangoFile)
                              else DjangoFile(content))
        if stored != name:  # the name is a fresh id: a second writer would be a bug
            storage.delete(stored)
            raise RuntimeError(f"artifact storage renamed {name} to {stored}")
        return
    client, bucket, key = s3
    body = content.file if isinstance(content, DjangoFile) else content
    client.put_object(Bucket=bucket, Key=key(name), Body=body, ContentLength=size)


def blob_writer(name: str, *, scratch: str) -> BlobWriter:
    """A writer of blob ``name``; ``scratch`` is where local storage writes it first (a name
    that its owner deletes with the rest of its folder)."""
    storage = artifact_storage()
    s3 = _s3(storage)
    if s3 is None:
        return _LocalWriter(storage, name, scratch)
    client, bucket, key = s3
    return _S3Writer(client, bucket, key(name), name)


def blob_writer_abandon(blob: str, token: str) -> None:
    """Undo what a writer of ``blob`` with ``token`` left: its S3 multipart upload, or its local
    scratch file. Nothing happens where there is nothing left."""
    storage = artifact_storage()
    s3 = _s3(storage)
    if s3 is None:
        storage.delete(token)
        return
    client, bucket, key = s3
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key(blob), UploadId=token)
    except client.exceptions.NoSuchUpload:
        pass


def _s3(storage: Storage):
    """(boto3 client, bucket, name → key) for S3 storage; None for local storage."""
    bucket = getattr(storage, "bucket_name", None)
    if bucket is None:
        return None
    from storages.utils import clean_name

    # The key as django-storages itself makes it (its location prefix, its normalisation).
    return (storage.connection.meta.client, bucket,
            lambda name: storage._normalize_name(clean_name(name)))


class _LocalWriter:
    def __init__(self, storage: Storage, name: str, scratch: str) -> None:
        self._storage = storage
        self.blob = name
        self.token = scratch
        self._target = Path(storage.path(name))
        path = Path(storage.path(scratch))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._handle = path.open("xb")

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def commit(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        mode = getattr(self._storage, "file_permissions_mode", None)
        if mode is not None:
            os.chmod(self._path, mode)
        self._target.parent.mkdir(parents=True, exist_ok=True)
        if self._target.exists():  # a fresh id: never, unless something else is very wrong
            raise FileExistsError(self._target)
        os.replace(self._path, self._target)

    def abort(self) -> None:
        self._handle.close()
        self._path.unlink(missing_ok=True)


class _S3Writer:
    def __init__(self, client, bucket: str, key: str, name: str) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self.blob = name
        self.token = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self._buffer = bytearray()
        self._parts: list[dict] = []

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= S3_PART:
            self._send(bytes(self._buffer[:S3_PART]))
            del self._buffer[:S3_PART]

    def _send(self, body: bytes) -> None:
        number = len(self._parts) + 1
        answer = self._client.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self.token,
                                          PartNumber=number, Body=body)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def commit(self) -> None:
        if self._buffer or not self._parts:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        self._client.complete_multipart_upload(Bucket=self._bucket, Key=self._key,
                                               UploadId=self.token,
                                               MultipartUpload={"Parts": self._parts})

    def abort(self) -> None:
        self._buffer.clear()
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key,
                                                UploadId=self.token)
        except self._client.exceptions.NoSuchUpload:
            pass
