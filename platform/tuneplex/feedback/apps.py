from django.apps import AppConfig


class FeedbackConfig(AppConfig):
    name = "tuneplex.feedback"
    label = "feedback"
