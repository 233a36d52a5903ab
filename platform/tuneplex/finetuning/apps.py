from django.apps import AppConfig


class FineTuningConfig(AppConfig):
    name = "tuneplex.finetuning"
    label = "finetuning"
