from django.apps import AppConfig


class BaseModelsConfig(AppConfig):
    name = "tuneplex.basemodels"
    label = "basemodels"
