from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.feedback.models import Comparison, Feedback
from tuneplex.tenancy.models import Organization


def feedback_list(*, organization: Organization) -> QuerySet[Feedback]:
    return Feedback.objects.filter(organization=organization).order_by("-created_at", "-id")


def feedback_exportable(*, organization: Organization) -> QuerySet[Feedback]:
    """Thumbs-up exchanges not yet written into a dataset, oldest first."""
    return (Feedback.objects.filter(organization=organization, rating=Feedback.Rating.UP,
                                    exported_to="").order_by("created_at", "id"))


def comparison_list(*, organization: Organization) -> QuerySet[Comparison]:
    return Comparison.objects.filter(organization=organization).order_by("-created_at", "-id")


def comparisons_exportable(*, organization: Organization) -> QuerySet[Comparison]:
    """Comparisons not yet written into a preference dataset, oldest first."""
    return Comparison.objects.filter(organization=organization, exported_to="").order_by(
        "created_at", "id")


def rated_pairs_exportable(*, organization: Organization) -> QuerySet[Feedback]:
    """Rated answers not yet in a preference dataset, oldest first: the candidates for pairs of
    a 👍 and a 👎 answer to the same prompt."""
    return Feedback.objects.filter(organization=organization, preference_exported_to="").order_by(
        "created_at", "id")
