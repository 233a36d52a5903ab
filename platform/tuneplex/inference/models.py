from django.db import models


class UsageDaily(models.Model):
    """Tokens used through the inference endpoints, per organization, model and UTC day."""

    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="usage")
    model = models.CharField(max_length=300, help_text="Adapter name or base model name.")
    adapter = models.ForeignKey("adapters.Adapter", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="usage")
    day = models.DateField()
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "model", "day"],
                                               name="one_usage_row_per_org_model_day")]
        indexes = [models.Index(fields=["organization", "day"])]
