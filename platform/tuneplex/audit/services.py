"""The audit trail. Every write service calls :func:`audit_record` inside its transaction."""

from __future__ import annotations

from typing import Any

from django.db import models

from tuneplex.audit.models import AuditEvent
from tuneplex.core.actors import Principal


def audit_record(*, actor: Principal, action: str, obj: models.Model,
                 metadata: dict[str, Any] | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        organization=actor.organization,
        actor_user=actor.user if actor.api_key is None else actor.api_key.created_by,
        actor_api_key=actor.api_key,
        actor_label=actor.label,
        action=action,
        object_type=obj._meta.label_lower,
        object_id=str(obj.pk),
        metadata=metadata or {},
    )
