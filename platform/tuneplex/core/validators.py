"""Validation of human-entered names: bounded, normalised, no control characters."""

from __future__ import annotations

import unicodedata

from rest_framework import serializers

NAME_MAX_LENGTH = 200


def clean_name(value: str, *, max_length: int = NAME_MAX_LENGTH) -> str:
    """NFC-normalise and trim; refuse empty, overlong and control/format characters.

    PostgreSQL refuses NUL in text, and invisible characters make names that look alike.
    """
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise serializers.ValidationError("Must not be blank.", code="blank")
    if len(text) > max_length:
        raise serializers.ValidationError(
            f"Must be at most {max_length} characters (got {len(text)}).", code="max_length"
        )
    for char in text:
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn") or char in "\u2028\u2029":
            raise serializers.ValidationError(
                f"Contains a control or invisible character (U+{ord(char):04X}).", code="invalid_characters"
            )
    return text


class NameField(serializers.CharField):
    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", None)
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError("Must be a string.", code="invalid_type")
        return clean_name(data)
