from django.apps import AppConfig


class EvalsConfig(AppConfig):
    name = "tuneplex.evals"
    label = "evals"

    def ready(self) -> None:
        from tuneplex.evals.gates import on_adapter_trained
        from tuneplex.finetuning.signals import adapter_trained

        adapter_trained.connect(on_adapter_trained, dispatch_uid="evals.after_training")
