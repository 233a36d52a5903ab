from django.db import models

from tuneplex.core.ids import id_field_length, new_id

METHODS = ("lora", "qlora")


def _base_model_id() -> str:
    return new_id("bm-")


def _default_methods() -> list[str]:
    return list(METHODS)


class BaseModel(models.Model):
    """A causal LM on local disk that jobs may fine-tune and the pool may serve.

    Shared by all organizations: base models are installed by the operator, not by tenants.
    """

    id = models.CharField(primary_key=True, max_length=id_field_length("bm-"),
                          default=_base_model_id, editable=False)
    name = models.CharField(max_length=100, unique=True)
    directory = models.CharField(max_length=1000, help_text="Hugging Face model directory.")
    parameter_count = models.BigIntegerField()
    max_sequence_length = models.PositiveIntegerField()
    has_chat_template = models.BooleanField()
    methods_allowed = models.JSONField(default=_default_methods)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name
