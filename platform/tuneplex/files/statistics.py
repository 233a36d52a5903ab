"""Dataset statistics: run in a Celery worker, computed by the trainer environment's tokenizer."""

from __future__ import annotations

import json
import logging
import time

from django.conf import settings

from tuneplex.basemodels.models import BaseModel
from tuneplex.core import metrics
from tuneplex.core.redact import client_message
from tuneplex.core.storage import local_copy
from tuneplex.core.trainer_env import last_error_line, run_trainer_module
from tuneplex.files.services import file_statistics_claim, file_statistics_finish

log = logging.getLogger(__name__)


def statistics_model() -> BaseModel | None:
    return BaseModel.objects.filter(name=settings.DEFAULT_BASE_MODEL, enabled=True).first()


def compute_statistics(file_id: str) -> None:
    file = file_statistics_claim(file_id=file_id)
    if file is None:
        log.info("statistics for %s already taken or done", file_id)
        return
    started = time.monotonic()
    outcome = "failed"
    try:
        outcome = _compute(file)
    finally:
        metrics.STATISTICS_DURATION.labels(outcome).observe(time.monotonic() - started)


def _compute(file) -> str:
    """Compute and record the claimed file's statistics; 'succeeded' or 'failed'."""
    model = statistics_model()
    if model is None:
        file_statistics_finish(file=file, statistics=None,
                               error=f"The base model {settings.DEFAULT_BASE_MODEL} is not registered.")
        return "failed"
    try:
        with local_copy(file.blob_name) as path:
            result = run_trainer_module(
                "jobs.training.dataset_stats", "--file", str(path), "--model", model.directory,
                "--max-seq-len", str(model.max_sequence_length), timeout=settings.STATISTICS_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(last_error_line(result))
        statistics = json.loads(result.stdout.strip().splitlines()[-1])
        statistics["model"] = model.name
    except Exception as exc:  # noqa: BLE001 - recorded on the file for the user to see
        log.exception("statistics for %s failed", file.id)
        file_statistics_finish(file=file, statistics=None,
                               error=f"Statistics could not be computed: "
                                     f"{client_message(str(exc)) or exc.__class__.__name__}")
        return "failed"
    file_statistics_finish(file=file, statistics=statistics)
    return "succeeded"
