from django.apps import AppConfig


class AdaptersConfig(AppConfig):
    name = "tuneplex.adapters"
    label = "adapters"
