from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "tuneplex.tenancy"
    label = "tenancy"
