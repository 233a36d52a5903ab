"""The Celery application: ``celery -A jobs.celery worker``.

Broker settings come from Django settings (``CELERY_*``): Redis when REDIS_URL is set, else
kombu's filesystem transport under the data folder (a real broker that needs no server).
"""

import os

from celery import Celery

from jobs.metrics import take_a_metrics_folder

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tuneplex.settings")
take_a_metrics_folder()  # a worker's, before anything imports prometheus_client

app = Celery("tuneplex")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["jobs"])


def ensure_broker_folders() -> None:
    """The filesystem transport expects its folders to exist."""
    from pathlib import Path

    options = app.conf.broker_transport_options or {}
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if key in options:
            Path(options[key]).mkdir(parents=True, exist_ok=True)


ensure_broker_folders()
