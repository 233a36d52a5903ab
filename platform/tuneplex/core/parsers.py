"""The API's JSON parser: what Python's json accepts but nothing downstream can store is a 400."""

from __future__ import annotations

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from jobs.training.jsonl import loads_strict


class StrictJSONParser(JSONParser):
    """JSON bodies nested too deeply, or holding unpaired surrogate escapes (text that cannot be
    encoded as UTF-8), are refused with ``invalid_json`` instead of failing later with a 500."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", "utf-8")
        try:
            text = stream.read().decode(encoding)
        except UnicodeDecodeError:
            raise ParseError("The body is not valid UTF-8.") from None
        try:
            return loads_strict(text)
        except ValueError as exc:
            raise ParseError(str(exc)) from None
