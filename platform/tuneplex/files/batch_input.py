"""A batch's input file (purpose ``batch``), in OpenAI's line format:

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 16}}

:func:`request_line` checks one line's shape (what the upload checks, every problem with its line
number); what the body asks of the gateway and whether its model is the organization's are
checked when a batch uses the file (tuneplex.batches.validation), since models come and go.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from django.conf import settings

from jobs.training.jsonl import LineError, Problem, ValidationReport, iter_lines, parse_line

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID = 512
FORMAT = "batch_requests"
_FIELDS = {"custom_id", "method", "url", "body"}


def line_limit() -> int:
    """A line holds a request body of up to TUNEPLEX_INFERENCE_MAX_BODY and its envelope."""
    return settings.INFERENCE_MAX_BODY + 64 * 1024


@dataclass(frozen=True)
class RequestLine:
    number: int  # 1-based, as the file's lines are counted (blank lines too)
    custom_id: str
    url: str
    body: dict


def request_line(raw: bytes, number: int) -> RequestLine:
    """One line as a request, or LineError naming the field at fault."""
    record = parse_line(raw)
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise LineError("unknown_field", f"Unknown field {unknown[0]!r}; a request line has "
                        "custom_id, method, url and body.", unknown[0])
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise LineError("invalid_custom_id", f"custom_id must be a non-empty string of at most "
                        f"{MAX_CUSTOM_ID} characters.", "custom_id")
    if record.get("method") != "POST":
        raise LineError("invalid_method", "method must be 'POST'.", "method")
    url = record.get("url")
    if url not in ENDPOINTS:
        raise LineError("invalid_url", f"url must be one of {', '.join(ENDPOINTS)}.", "url")
    body = record.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_body", "body must be a JSON object: the request's body.", "body")
    return RequestLine(number, custom_id, url, body)


def request_lines(stream: IO[bytes], *, max_line_bytes: int
                  ) -> Iterator[tuple[int, RequestLine | None, Problem | None]]:
    """Each non-blank line of ``stream``: (number, request, None) or (number, None, problem),
    a custom_id seen before being a problem (``duplicate_custom_id``) of the later line."""
    seen: set[str] = set()
    for number, raw in iter_lines(stream, max_line_bytes=max_line_bytes):
        if raw is None:
            yield number, None, Problem("line_too_long",
                                        f"The line is longer than {max_line_bytes} bytes.", number)
            continue
        if not raw.strip():
            continue
        try:
            line = request_line(raw, number)
        except LineError as error:
            yield number, None, Problem(error.code, error.message, number, error.param)
            continue
        if line.custom_id in seen:
            yield number, None, Problem("duplicate_custom_id", f"custom_id {line.custom_id!r} is "
                                        "used by an earlier line; each must be unique.", number,
                                        "custom_id")
            continue
        seen.add(line.custom_id)
        yield number, line, None


def validate_batch_input(stream: IO[bytes]) -> ValidationReport:
    """An upload of purpose batch: every line a request of the shape above, custom_ids unique,
    at most TUNEPLEX_BATCH_MAX_REQUESTS of them in at most TUNEPLEX_BATCH_MAX_INPUT_BYTES."""
    max_requests, max_bytes = settings.BATCH_MAX_REQUESTS, settings.BATCH_MAX_INPUT_BYTES
    report = ValidationReport(format=FORMAT)
    counted = _Counted(stream)
    for number, line, problem in request_lines(counted, max_line_bytes=line_limit()):
        report.lines = number
        if counted.bytes > max_bytes:
            report.add(Problem("file_too_large", f"A batch's input file is at most {max_bytes} "
                               "bytes (TUNEPLEX_BATCH_MAX_INPUT_BYTES).", number))
            break
        if problem is not None:
            report.add(problem)
            continue
        report.examples += 1
        if report.examples == max_requests + 1:
            report.add(Problem("too_many_requests", f"A batch has at most {max_requests} requests "
                               "(TUNEPLEX_BATCH_MAX_REQUESTS).", number))
    if report.examples == 0 and report.ok:
        report.add(Problem("empty_file", "The file has no requests.", None))
    return report


class _Counted:
    """A stream's lines, and how many bytes were read (any stream: S3's cannot tell)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.bytes = stream, 0

    def readline(self, size: int = -1) -> bytes:
        data = self.stream.readline(size)
        self.bytes += len(data)
        return data
