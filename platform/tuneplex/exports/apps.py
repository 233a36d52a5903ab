from django.apps import AppConfig


class ExportsConfig(AppConfig):
    name = "tuneplex.exports"
    label = "exports"
