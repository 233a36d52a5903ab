"""Scopes carried by API keys and implied by membership roles."""

from django.db import models

READ, TRAIN, INFER, ADMIN = "read", "train", "infer", "admin"
ALL_SCOPES: tuple[str, ...] = (READ, TRAIN, INFER, ADMIN)


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


ROLE_SCOPES: dict[str, frozenset[str]] = {
    Role.OWNER: frozenset(ALL_SCOPES),
    Role.ADMIN: frozenset(ALL_SCOPES),
    Role.MEMBER: frozenset({READ, TRAIN, INFER}),
    Role.VIEWER: frozenset({READ}),
}
