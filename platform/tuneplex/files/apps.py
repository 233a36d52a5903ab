from django.apps import AppConfig


class FilesConfig(AppConfig):
    name = "tuneplex.files"
    label = "files"
