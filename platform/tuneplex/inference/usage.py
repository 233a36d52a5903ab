"""Token usage of the inference endpoints: counted in memory, written to the database each second.

One write per organization, model and day each interval instead of one per request keeps the
database off the request path. A failed write is kept and retried; what is pending is also
written when the process exits normally.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import threading
from collections import defaultdict

from django.db import close_old_connections

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0

_pending: defaultdict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
_lock = threading.Lock()
_writer: threading.Thread | None = None


def count(*, organization_id: str, model: str, adapter_id: str | None, prompt_tokens: int,
          completion_tokens: int) -> None:
    """Add one request (cheap; never touches the database)."""
    global _writer
    day = datetime.datetime.now(datetime.UTC).date()
    with _lock:
        totals = _pending[(organization_id, model, adapter_id, day)]
        totals[0] += 1
        totals[1] += prompt_tokens
        totals[2] += completion_tokens
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, name="usage-writer", daemon=True)
            _writer.start()


def flush() -> None:
    """Write what is pending; on failure keep it for the next attempt."""
    from tuneplex.inference.services import usage_record

    with _lock:
        batch = dict(_pending)
        _pending.clear()
    for key, (requests, prompt, completion) in batch.items():
        organization_id, model, adapter_id, day = key
        try:
            usage_record(organization_id=organization_id, model=model, adapter_id=adapter_id, day=day,
                         requests=requests, prompt_tokens=prompt, completion_tokens=completion)
        except Exception:
            log.exception("writing usage of %s failed; retrying", model)
            with _lock:
                totals = _pending[key]
                totals[0] += requests
                totals[1] += prompt
                totals[2] += completion


def _write_forever() -> None:
    stop = threading.Event()
    while not stop.wait(FLUSH_SECONDS):
        try:
            flush()
        finally:
            close_old_connections()


atexit.register(flush)
