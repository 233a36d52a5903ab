"""Artifact storage, the only state shared between nodes besides PostgreSQL and Redis.

Datasets, checkpoints, adapters and merged exports live here (a local folder on the embedded
default, an S3-compatible bucket in production); every local folder a worker or an engine node
uses is a cache that can be wiped. This module is the one way blobs cross between artifact
storage and local disk: whole files, in 4 MiB chunks, with no partial file left behind; and
:func:`open_stream` the one way a blob is read as a stream (downloads, copies).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core.files import File as DjangoFile
from django.core.files.storage import Storage, storages

CHUNK = 4 * 2**20


def artifact_storage() -> Storage:
    return storages["artifacts"]


def upload_file(source: Path, name: str) -> int:
    """Store ``source`` under ``name``, replacing what is there; returns its size in bytes."""
    storage = artifact_storage()
    if storage.exists(name):
        storage.delete(name)
    with source.open("rb") as handle:
        stored = storage.save(name, DjangoFile(handle))
    if stored != name:  # a concurrent writer took the name between exists() and save()
        storage.delete(stored)
        raise RuntimeError(f"artifact storage renamed {name} to {stored}")
    return source.stat().st_size


def upload_directory(directory: Path, prefix: str, names: Iterable[str]) -> int:
    """Upload the named files of ``directory`` under ``prefix``/; all of them, or none.

    Names that do not exist in ``directory`` are skipped. Returns the bytes uploaded.
    """
    uploaded: list[str] = []
    total = 0
    try:
        for name in names:
            source = directory / name
            if source.is_file():
                total += upload_file(source, f"{prefix}/{name}")
                uploaded.append(f"{prefix}/{name}")
    except BaseException:
        delete_blobs(uploaded)
        raise
    return total


def open_stream(name: str, storage=None, *, offset: int = 0) -> BinaryIO:
    """Blob ``name`` opened for reading from its start (or from byte ``offset``, which must be
    within it; the bytes before it are never read), without a copy of it anywhere.

    django-storages' S3 file downloads the whole object into memory on its first read (its
    spooled file never rolls over to disk by default), so an S3 blob is read from the object's
    body stream instead (from ``offset``: a ranged GET). FileNotFoundError when there is no such
    blob, on both backends. ``storage``: another storage than the artifacts' (the pool agents'
    read-only one).
    """
    handle = (storage or artifact_storage()).open(name, "rb")
    s3_object = getattr(handle, "obj", None)  # the S3 file's boto3 Object; read nothing yet
    if s3_object is None:
        if offset:
            handle.seek(offset)
        return handle
    handle.close()
    body = s3_object.get(**({"Range": f"bytes={offset}-"} if offset else {}))["Body"]
    return io.BufferedReader(body, CHUNK)  # buffered: readline() in bulk


def download_file(name: str, target: Path) -> None:
    """Copy blob ``name`` to ``target`` (written beside it, then renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            with open_stream(name) as source:
                shutil.copyfileobj(source, out, CHUNK)
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
    Path(out.name).replace(target)


def download_directory(prefix: str, names: Iterable[str], directory: Path) -> None:
    """Copy ``prefix``/<name> for each name into ``directory`` (which must exist)."""
    for name in names:
        download_file(f"{prefix}/{name}", directory / name)


def delete_blobs(names: Iterable[str]) -> None:
    storage = artifact_storage()
    for name in names:
        storage.delete(name)


def list_prefix(prefix: str) -> list[str]:
    """Every blob under ``prefix``/ (recursively), as full names."""
    storage = artifact_storage()
    found: list[str] = []
    pending = [prefix.rstrip("/")]
    while pending:
        current = pending.pop()
        try:
            folders, files = storage.listdir(current)
        except FileNotFoundError:
            continue
        found.extend(f"{current}/{name}" for name in files)
        pending.extend(f"{current}/{name}" for name in folders)
    return sorted(found)


def delete_prefix(prefix: str) -> None:
    delete_blobs(list_prefix(prefix))


@contextmanager
def local_copy(blob_name: str, *, suffix: str = ".jsonl") -> Iterator[Path]:
    """A local path for a blob: the file itself on local storage, a temporary copy otherwise."""
    storage = artifact_storage()
    try:
        local = Path(storage.path(blob_name))
    except NotImplementedError:  # remote storage (S3) has no local path
        local = None
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(dir=settings.FILE_UPLOAD_TEMP_DIR) as folder:
        copy = Path(folder) / f"blob{suffix}"
        download_file(blob_name, copy)
        yield copy
