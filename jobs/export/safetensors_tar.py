"""The ``safetensors`` format: the merged model's directory (shards, index, config, tokenizer,
chat template, the merge's check) in one uncompressed tar, ``{name}/...`` inside.

The tar is written file by file (tarfile copies each in bounded chunks), so its size does not
matter. Its check re-reads every shard's header from the tar and compares the tensors' names,
shapes and dtypes and every member's size with the merged directory, and carries the merge's
logits check (``merge-check.json``, written by jobs.training.merge); a merged directory without
one is checked now against base + adapter (jobs.training.merge_check).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.export import CheckFailed, ExportRequest, InvalidInput, write_tar
from jobs.training.layout import sha256_of
from jobs.training.merge import CHECK_FILE, safetensors_header
from jobs.training.merge_check import check_merge, failure_line


def export(request: ExportRequest, progress: Callable[[float, str], None]) -> tuple[Path, dict]:
    merged = request.merged
    if merged is None or not merged.is_dir():
        raise InvalidInput(f"the merged model's directory {merged} does not exist")
    files = sorted(p for p in merged.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        raise InvalidInput(f"{merged} holds no safetensors weights")
    logits = _merge_check(request, progress)
    artifact = request.out / f"{request.name}.tar"
    write_tar(artifact, files, request.name, progress)
    progress(0.95, "checking the archive against the merged model")
    figures = compare_archive(artifact, merged, request.name)
    check = {**logits, **figures, "passed": logits["passed"] and figures["passed"]}
    if not figures["passed"]:
        raise CheckFailed("the archive does not hold the merged model's tensors", check)
    progress(1.0, "done")
    return artifact, check


def _merge_check(request: ExportRequest, progress: Callable[[float, str], None]) -> dict[str, Any]:
    """The merge's logits check: merge-check.json's, or run now when there is none."""
    assert request.merged is not None
    stored = request.merged / CHECK_FILE
    if stored.exists():
        check = json.loads(stored.read_text())
        if request.adapter is not None and check.get("adapter_sha256") not in (
                None, sha256_of(request.adapter)):
            raise InvalidInput(f"{request.merged} was merged from another adapter "
                               f"({CHECK_FILE} names adapter {check['adapter_sha256'][:12]})")
    elif request.adapter is not None:
        progress(0.0, "checking the merged model's logits against base + adapter")
        check = check_merge(request.base, request.adapter, request.merged)
    else:
        raise InvalidInput(f"{request.merged} holds no {CHECK_FILE} and no adapter was given to "
                           "check it against")
    if not check.get("passed"):
        try:
            message = failure_line(check)
        except (KeyError, TypeError, ValueError):  # a check file of another shape
            message = f"the merge check failed: {json.dumps(check)[:400]}"
        raise CheckFailed(message, check)
    return check


def compare_archive(artifact: Path, merged: Path, name: str) -> dict[str, Any]:
    """Every file of ``merged`` in the tar at its size, and every shard's tensors (names, shapes,
    dtypes) as in ``merged``: ``{"passed", "files", "shards", "tensors", "problems"}``."""
    problems: list[str] = []
    tensors = shards = 0
    expected = {f"{name}/{p.name}": p for p in merged.iterdir()
                if p.is_file() and not p.name.startswith(".")}
    with tarfile.open(artifact, "r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for arcname in sorted(set(members) - set(expected)):
            problems.append(f"{arcname} is not in the merged model")
        for arcname, source in sorted(expected.items()):
            member = members.get(arcname)
            if member is None or not member.isfile():
                problems.append(f"{arcname} is missing")
                continue
            if member.size != source.stat().st_size:
                problems.append(f"{arcname} holds {member.size} bytes, not {source.stat().st_size}")
                continue
            if source.suffix == ".safetensors":
                handle = tar.extractfile(member)
                assert handle is not None
                archived = _tensors(safetensors_header(handle))
                with source.open("rb") as original:
                    wanted = _tensors(safetensors_header(original))
                if archived != wanted:
                    differ = sorted(set(archived.items()) ^ set(wanted.items()))
                    problems.append(f"{arcname}: tensors differ ({differ[0][0]}, ...)")
                shards += 1
                tensors += len(archived)
    return {"passed": not problems, "files": len(expected), "shards": shards,
            "tensors": tensors, "problems": problems[:10]}


def _tensors(header: dict[str, dict[str, Any]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {key: (info["dtype"], tuple(info["shape"])) for key, info in header.items()}
