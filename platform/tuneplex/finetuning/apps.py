from django.apps import AppConfig


class FineTuningConfig(AppConfig):
    name = "tuneplex.finetuning"
    label = "finetuning"

    def ready(self) -> None:
        from tuneplex.finetuning import worker_signals

        worker_signals.connect()  # heard only in Celery workers; harmless elsewhere
