from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _feedback_id() -> str:
    return new_id("fb-")


class Feedback(models.Model):
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
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"])]

    @property
    def exported_to_or_none(self) -> str | None:
        return self.exported_to or None
