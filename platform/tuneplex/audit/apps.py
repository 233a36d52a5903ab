from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "tuneplex.audit"
    label = "audit"
