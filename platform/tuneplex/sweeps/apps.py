from django.apps import AppConfig


class SweepsConfig(AppConfig):
    name = "tuneplex.sweeps"
    label = "sweeps"
