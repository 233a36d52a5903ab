from django.apps import AppConfig


class OperationsConfig(AppConfig):
    name = "tuneplex.operations"
    label = "operations"

    def ready(self) -> None:
        from tuneplex.operations import worker_metrics

        worker_metrics.connect()  # heard only in Celery workers; harmless elsewhere
