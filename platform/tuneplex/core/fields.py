"""Request fields that take JSON's types as they are: the OpenAPI schema is the contract.

DRF's own fields coerce (``0`` becomes ``False`` or ``"0"``, ``"5"`` becomes ``5``), so a body
of the wrong type would be accepted where the schema says it is refused. These refuse it with
``invalid_type`` (a 400 naming the field). Values from forms and query strings, which are
always text, keep DRF's own fields.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data):
        if not isinstance(data, bool):
            raise serializers.ValidationError("Must be true or false.", code="invalid_type")
        return data


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError("Must be a string.", code="invalid_type")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if not isinstance(data, int) or isinstance(data, bool):
            raise serializers.ValidationError("Must be an integer.", code="invalid_type")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise serializers.ValidationError("Must be a number.", code="invalid_type")
        return super().to_internal_value(data)


@extend_schema_field({"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}})
class MessagesField(serializers.JSONField):
    """Chat messages: a non-empty list of {role, content} (the service checks each, naming it)."""


@extend_schema_field({"type": "object", "required": ["model", "content"], "properties": {
    "model": {"type": "string"}, "content": {"type": "string"}}})
class AnswerField(serializers.JSONField):
    """One model's answer: {model, content} (the service checks it, naming the field)."""


def enum_field(values: list, base=StrictCharField):
    """A field of ``base`` whose schema lists ``values`` (the service says which it refuses, with
    its own code)."""
    schema = {"type": "integer" if base is StrictIntegerField else "string", "enum": values}
    return extend_schema_field(schema)(type(f"Enum{base.__name__}", (base,), {}))
