from django.db.models import QuerySet

from tuneplex.audit.models import AuditEvent
from tuneplex.tenancy.models import Organization


def audit_event_list(*, organization: Organization) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(organization=organization).order_by("-created_at", "-id")
