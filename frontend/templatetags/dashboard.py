"""Small filters for the dashboard's templates."""

from __future__ import annotations

from datetime import UTC, datetime

from django import template

register = template.Library()


@register.filter
def duration(seconds) -> str:
    """12 s, 4 min 05 s, 2 h 03 min."""
    if seconds is None or seconds == "":
        return "—"
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@register.filter
def thousands(value) -> str:
    """1234567 → 1,234,567 (blank for None)."""
    if value is None or value == "":
        return "—"
    return f"{int(value):,}"


@register.filter
def lookup(mapping, key):
    """``errors|lookup:name``: a dict's item by a variable key (None when absent)."""
    return mapping.get(key) if hasattr(mapping, "get") else None


@register.filter
def gib(value) -> str:
    return "—" if value is None else f"{value / 2**30:.2f} GiB"


@register.filter
def percent(value) -> str:
    """0.8 → 80.0% (a dash for None)."""
    if value is None or value == "":
        return "—"
    return f"{100 * float(value):.1f}%"


@register.filter
def score(value) -> str:
    """A score, to three significant digits (a dash for None)."""
    if value is None or value == "":
        return "—"
    return f"{float(value):.3g}"


@register.filter
def epoch(value):
    """Seconds since 1970 (as a run's events keep their time) → an aware datetime."""
    if value is None or value == "":
        return None
    return datetime.fromtimestamp(float(value), tz=UTC)
