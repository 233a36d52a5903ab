"""Strict readers for settings taken from the environment.

Each helper reads one variable once and raises ``ImproperlyConfigured`` naming the variable when
its value cannot be parsed, so a typo fails at start-up instead of silently falling back to a
default. Settings call these helpers; nothing else reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None,
            choices: tuple[str, ...] | None = None) -> str | None:
    value = _raw(name, environ)
    if value is None:
        return default
    if choices is not None and value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value


def env_bool(name: str, default: bool, *, environ: Mapping[str, str] | None = None) -> bool:
    value = _raw(name, environ)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no)")


def env_int(name: str, default: int, *, environ: Mapping[str, str] | None = None,
            minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name, environ)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def env_bytes(name: str, default: int, *, environ: Mapping[str, str] | None = None) -> int:
    """A size such as ``512MiB``, ``2GB`` or a plain number of bytes."""
    value = _raw(name, environ)
    if value is None:
        return default
    text = value.replace(" ", "").upper()
    digits = text.rstrip("KMGTIB")
    unit = text[len(digits):]
    try:
        number = float(digits)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a size (e.g. 512MiB, 2GB, 1048576)") from None
    if unit not in _SIZE_UNITS or number < 0:
        raise ImproperlyConfigured(f"{name}={value!r} is not a size (e.g. 512MiB, 2GB, 1048576)")
    return int(number * _SIZE_UNITS[unit])


def env_list(name: str, default: list[str], *, environ: Mapping[str, str] | None = None) -> list[str]:
    value = _raw(name, environ)
    if value is None:
        return list(default)
    items = [item.strip() for item in value.split(",")]
    if any(item == "" for item in items):
        raise ImproperlyConfigured(f"{name}={value!r} has an empty item in its comma-separated list")
    return items


def env_url(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None,
            schemes: tuple[str, ...]) -> str | None:
    value = _raw(name, environ)
    if value is None:
        return default
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} must be a URL with scheme {' or '.join(schemes)}, got scheme {parts.scheme!r}"
        )
    if parts.scheme not in ("sqlite",) and not parts.hostname:
        raise ImproperlyConfigured(f"{name}={_redact(value)!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ImproperlyConfigured(f"{name}={_redact(value)!r} has an invalid port") from None
    return value


def env_path(name: str, default: Path, *, environ: Mapping[str, str] | None = None) -> Path:
    value = _raw(name, environ)
    if value is None:
        return default
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ImproperlyConfigured(f"{name}={value!r} must be an absolute path")
    return path


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
