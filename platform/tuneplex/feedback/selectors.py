from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.feedback.models import Feedback
from tuneplex.tenancy.models import Organization


def feedback_list(*, organization: Organization) -> QuerySet[Feedback]:
    return Feedback.objects.filter(organization=organization).order_by("-created_at", "-id")


def feedback_exportable(*, organization: Organization) -> QuerySet[Feedback]:
    """Thumbs-up exchanges not yet written into a dataset, oldest first."""
    return (Feedback.objects.filter(organization=organization, rating=Feedback.Rating.UP,
                                    exported_to="").order_by("created_at", "id"))
