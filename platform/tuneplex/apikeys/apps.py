from django.apps import AppConfig


class ApiKeysConfig(AppConfig):
    name = "tuneplex.apikeys"
    label = "apikeys"
