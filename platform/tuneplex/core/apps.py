from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "tuneplex.core"
    label = "core"

    def ready(self) -> None:
        from tuneplex.core import schema  # noqa: F401 - registers the OpenAPI extensions
