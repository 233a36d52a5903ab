from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tuneplex.basemodels.services import RegistrationError, base_model_register


class Command(BaseCommand):
    help = ("Register a local Hugging Face causal-LM directory (safetensors weights) as a base "
            "model, e.g. an 8B model on a GPU node's disk. Running it again updates the entry.")

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument("--name", help="registry name (default: the directory's name)")
        parser.add_argument("--methods", default="lora,qlora",
                            help="comma-separated methods allowed (lora, qlora)")
        parser.add_argument("--max-sequence-length", type=int, default=None,
                            help="cap for training and serving (default: the model's own)")
        parser.add_argument("--disabled", action="store_true", help="register it disabled")

    def handle(self, *args, **options):
        directory: Path = options["directory"]
        try:
            model, changed = base_model_register(
                name=options["name"] or directory.resolve().name,
                directory=directory,
                methods=[m.strip() for m in options["methods"].split(",") if m.strip()],
                max_sequence_length=options["max_sequence_length"],
                enabled=not options["disabled"],
            )
        except RegistrationError as exc:
            raise CommandError(str(exc)) from None
        verb = "Registered" if changed else "Unchanged:"
        self.stdout.write(f"{verb} {model.name} ({model.parameter_count:,} parameters, "
                          f"max length {model.max_sequence_length}) at {model.directory}")
