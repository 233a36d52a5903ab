from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "tuneplex.inference"
    label = "inference"

    def ready(self) -> None:
        from tuneplex.inference.cache import connect_signals

        connect_signals()
