from django.apps import AppConfig


class BatchesConfig(AppConfig):
    name = "tuneplex.batches"
    label = "batches"
