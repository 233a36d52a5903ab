"""Dataset statistics: run in a Celery worker, computed by the trainer environment's tokenizer."""

from __future__ import annotations

import json
import logging
import subprocess

from django.conf import settings

from tuneplex.basemodels.models import BaseModel
from tuneplex.files.services import file_statistics_claim, file_statistics_finish, local_copy

log = logging.getLogger(__name__)
STATISTICS_TIMEOUT_SECONDS = 3600


def statistics_model() -> BaseModel | None:
    return BaseModel.objects.filter(name=settings.DEFAULT_BASE_MODEL, enabled=True).first()


def compute_statistics(file_id: str) -> None:
    file = file_statistics_claim(file_id=file_id)
    if file is None:
        log.info("statistics for %s already taken or done", file_id)
        return
    model = statistics_model()
    if model is None:
        file_statistics_finish(file=file, statistics=None,
                               error=f"The base model {settings.DEFAULT_BASE_MODEL} is not registered.")
        return
    try:
        with local_copy(file.blob_name) as path:
            result = subprocess.run(
                [str(settings.TRAINER_PYTHON), "-m", "jobs.training.dataset_stats",
                 "--file", str(path), "--model", model.directory,
                 "--max-seq-len", str(model.max_sequence_length)],
                cwd=settings.REPO_DIR, capture_output=True, text=True,
                timeout=STATISTICS_TIMEOUT_SECONDS, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
            )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                               else f"exit status {result.returncode}")
        statistics = json.loads(result.stdout.strip().splitlines()[-1])
        statistics["model"] = model.name
    except Exception as exc:  # noqa: BLE001 - recorded on the file for the user to see
        log.exception("statistics for %s failed", file_id)
        file_statistics_finish(file=file, statistics=None, error=f"{exc.__class__.__name__}: {exc}"[:500])
        return
    file_statistics_finish(file=file, statistics=statistics)
