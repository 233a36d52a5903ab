"""What a tenant may read of an internal failure: its first line, without paths or addresses.

The full text stays in the server's or worker's log; a client sees a message it can act on.
"""

from __future__ import annotations

import re

_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+-]+)+/?")
_HOST_PORT = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\blocalhost(?::\d+)?\b")


def client_message(text: str, *, limit: int = 500) -> str:
    """The first non-empty line of ``text`` with file paths and IP addresses replaced."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = _PATH.sub("<path>", line)
    line = _HOST_PORT.sub("<address>", line)
    return line[:limit]
