from django.apps import AppConfig


class EvalsConfig(AppConfig):
    name = "tuneplex.evals"
    label = "evals"
