"""A batch's ``validating`` step, on its worker: every line of its input file checked as the
gateway would check the request, and copied into the batch's own requests blob.

A line passes when it has the shape of a request line (tuneplex.files.batch_input: JSON,
custom_id present and unique, method POST), names the batch's endpoint, its body passes the
gateway's own checks for that endpoint (:func:`tuneplex.inference.gateway.parse_body`: fields,
types, ranges, max_tokens), it does not ask for a stream, and its model is one the
organization may use now (a base model served, or its deployed adapter). One line that does not
pass fails the batch, with every such line's number (up to TUNEPLEX_BATCH_MAX_ERRORS) and
nothing run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from tuneplex.batches.models import Batch
from tuneplex.core.errors import ApiError
from tuneplex.core.storage import open_stream, upload_file
from tuneplex.files.batch_input import RequestLine, line_limit, request_lines
from tuneplex.files.models import File
from tuneplex.files.selectors import file_get
from tuneplex.inference.gateway import parse_body
from tuneplex.inference.selectors import ServableModel, servable_model
from tuneplex.inference.streams import CHAT, COMPLETIONS

ENGINE_ENDPOINT = {Batch.Endpoint.CHAT: CHAT, Batch.Endpoint.COMPLETIONS: COMPLETIONS}
ALIVE_EVERY = 2.0  # seconds between the checks that the batch is still this worker's


class ValidationStopped(Exception):
    """The batch was cancelled or taken over while its lines were being checked."""


@dataclass
class Checked:
    """What validation found: the requests (stored in ``blob`` when none failed), the models
    they name, and the problems ({code, message, param, line}) of the lines that failed."""

    requests: int = 0
    models: dict[str, ServableModel] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    refused: dict[str, ApiError] = field(default_factory=dict)  # models looked up in vain

    def fail(self, code: str, message: str, *, line: int | None, param: str | None = None) -> None:
        if len(self.errors) < settings.BATCH_MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})

    @property
    def full(self) -> bool:
        return len(self.errors) >= settings.BATCH_MAX_ERRORS


def check_batch(batch: Batch, blob: str, *, alive: Callable[[], bool]) -> Checked:
    """Check every line of the batch's input file and, if all pass, store them in ``blob``.
    ``alive()`` is asked every few seconds; False stops the check (ValidationStopped)."""
    checked = Checked()
    try:
        file = file_get(organization=batch.organization, file_id=batch.input_file_id)
    except ApiError:
        checked.fail("invalid_file", f"The input file {batch.input_file_id} was deleted before "
                     "the batch started.", line=None, param="input_file_id")
        return checked
    if file.purpose != File.Purpose.BATCH or file.status != File.Status.PROCESSED:
        checked.fail("invalid_file", f"File {file.id} is not a processed file of purpose "
                     "'batch'.", line=None, param="input_file_id")
        return checked
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=settings.DATA_DIR,
                                     encoding="utf-8") as out, open_stream(file.blob_name) as stream:
        checked_at = time.monotonic()
        for number, line, problem in request_lines(stream, max_line_bytes=line_limit()):
            if time.monotonic() - checked_at > ALIVE_EVERY:
                if not alive():
                    raise ValidationStopped
                checked_at = time.monotonic()
            if problem is not None:
                checked.fail(problem.code, problem.message, line=number, param=problem.param)
            else:
                _check_line(batch, line, checked)
            if checked.full:
                break
            if not checked.errors:
                out.write(json.dumps({"line": number, "custom_id": line.custom_id,
                                      "body": line.body}, ensure_ascii=False) + "\n")
        if not checked.errors and checked.requests == 0:
            checked.fail("empty_file", "The input file has no requests.", line=None,
                         param="input_file_id")
        if not checked.errors:
            out.flush()
            upload_file(Path(out.name), blob)
    return checked


def _check_line(batch: Batch, line: RequestLine, checked: Checked) -> None:
    checked.requests += 1
    if checked.requests == settings.BATCH_MAX_REQUESTS + 1:
        checked.fail("too_many_requests", f"A batch has at most {settings.BATCH_MAX_REQUESTS} "
                     "requests (TUNEPLEX_BATCH_MAX_REQUESTS).", line=line.number)
        return
    if line.url != batch.endpoint:
        checked.fail("invalid_url", f"url is {line.url}; every line of this batch must name its "
                     f"endpoint, {batch.endpoint}.", line=line.number, param="url")
        return
    if line.body.get("stream"):
        checked.fail("invalid_value", "A batch's requests are answered whole: body.stream must "
                     "be false or absent.", line=line.number, param="body.stream")
        return
    try:
        body = parse_body(json.dumps(line.body).encode(), ENGINE_ENDPOINT[batch.endpoint])
        _model(batch, body["model"], checked)
    except ApiError as exc:
        checked.fail(exc.code, exc.message, line=line.number,
                     param=f"body.{exc.param}" if exc.param else "body")


def _model(batch: Batch, model: str, checked: Checked) -> None:
    """The organization may use ``model`` now (each name looked up once per batch)."""
    if model in checked.models:
        return
    if model not in checked.refused:
        try:
            checked.models[model] = servable_model(organization=batch.organization, model=model)
            return
        except ApiError as exc:
            checked.refused[model] = exc
    raise checked.refused[model]
