from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _feedback_id() -> str:
    return new_id("fb-")


def _comparison_id() -> str:
    return new_id("cmp-")


class PlaygroundRecord(models.Model):
    """What every record kept from the playground carries: who made it and when, and the dataset
    it was exported into (``exported_to``, declared by each with its own help text)."""

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True
        indexes = [models.Index(fields=["organization", "-created_at"])]

    @property
    def exported_to_or_none(self) -> str | None:
        return self.exported_to or None


class Feedback(PlaygroundRecord):
    """A rated exchange from the playground: the conversation up to the answer that was rated.

    Thumbs-up exchanges become supervised examples of a feedback dataset (:func:`feedback_export`);
    thumbs-down ones are kept to read, never trained on.
    """

    class Rating(models.IntegerChoices):
        UP = 1, "up"
        DOWN = -1, "down"

    id = models.CharField(primary_key=True, max_length=id_field_length("fb-"), default=_feedback_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="feedback")
    model = models.CharField(max_length=300, help_text="The adapter or base model that answered.")
    messages = models.JSONField(help_text="Chat messages; the last one is the rated answer.")
    rating = models.SmallIntegerField(choices=Rating.choices)
    exported_to = models.CharField(max_length=64, blank=True, default="",
                                   help_text="The file id of the dataset it was exported into.")
    preference_exported_to = models.CharField(
        max_length=64, blank=True, default="",
        help_text="The preference dataset it went into, paired with an answer of the other "
                  "rating to the same prompt.")


class Comparison(PlaygroundRecord):
    """Two answers to the same prompt, one marked better (the side-by-side playground): a
    preference pair for DPO (:func:`tuneplex.feedback.services.preference_export`)."""

    id = models.CharField(primary_key=True, max_length=id_field_length("cmp-"),
                          default=_comparison_id, editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="comparisons")
    messages = models.JSONField(help_text="The prompt: chat messages ending with the user's.")
    preferred_model = models.CharField(max_length=300)
    preferred = models.TextField(help_text="The better answer.")
    non_preferred_model = models.CharField(max_length=300)
    non_preferred = models.TextField(help_text="The worse answer.")
    exported_to = models.CharField(max_length=64, blank=True, default="",
                                   help_text="The preference dataset it was exported into.")
