"""Writes for playground feedback: rate an exchange, export the thumbs-up ones as a dataset."""

from __future__ import annotations

import json

from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.utils import timezone

from jobs.training.jsonl import CHAT, LineError, check_record
from tuneplex.adapters.models import Adapter
from tuneplex.audit.services import audit_record
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.feedback.models import Feedback
from tuneplex.feedback.selectors import feedback_exportable
from tuneplex.files.models import File
from tuneplex.files.services import artifact_storage, file_create
from tuneplex.tenancy.models import Organization

MAX_MESSAGES = 64
MAX_EXCHANGE_BYTES = 64 * 1024


def _clean_messages(messages: object) -> list[dict[str, str]]:
    """The exchange as chat messages (role, content), ending with the rated assistant answer."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list.", code="invalid_messages",
                       param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(f"At most {MAX_MESSAGES} messages may be rated at once.",
                       code="invalid_messages", param="messages")
    try:  # the same checks as a chat line of an uploaded dataset
        check_record({"messages": messages}, CHAT)
    except LineError as exc:
        # A missing assistant answer is reported just below, at the message that should be it.
        if exc.code != "example_missing_assistant_message":
            raise ApiError(exc.message, code="invalid_messages", param=exc.param) from None
    cleaned = [{"role": m["role"], "content": m["content"]} for m in messages]
    if cleaned[-1]["role"] != "assistant":
        raise ApiError("The last message must be the assistant's (non-empty) answer being rated.",
                       code="invalid_messages", param=f"messages[{len(cleaned) - 1}]")
    if not any(m["role"] == "user" for m in cleaned):
        raise ApiError("The exchange needs a user message.", code="invalid_messages",
                       param="messages")
    if len(json.dumps(cleaned).encode()) > MAX_EXCHANGE_BYTES:
        raise ApiError(f"The exchange is larger than {MAX_EXCHANGE_BYTES} bytes.",
                       code="invalid_messages", param="messages")
    return cleaned


def _check_model(organization: Organization, model: object) -> str:
    """Only a model the organization could have chatted with: its own adapter or a base model."""
    if isinstance(model, str) and (
            Adapter.objects.filter(organization=organization, name=model).exists()
            or BaseModel.objects.filter(name=model, enabled=True).exists()):
        return model
    raise ApiError(f"No such model: {model!r}.", code="model_not_found", param="model")


def feedback_record(*, organization: Organization, actor: Principal, model: object,
                    messages: object, rating: object) -> Feedback:
    if rating not in (Feedback.Rating.UP, Feedback.Rating.DOWN):
        raise ApiError("rating must be 1 (thumbs up) or -1 (thumbs down).", code="invalid_rating",
                       param="rating")
    cleaned = _clean_messages(messages)
    model_name = _check_model(organization, model)
    with transaction.atomic():
        feedback = Feedback.objects.create(organization=organization, model=model_name,
                                           messages=cleaned, rating=rating, created_by=actor.user)
        audit_record(actor=actor, action="feedback.create", obj=feedback,
                     metadata={"model": model_name, "rating": int(rating)})
    return feedback


def feedback_export(*, organization: Organization, actor: Principal) -> File:
    """Write every thumbs-up exchange not yet exported into a new chat dataset (a File).

    The file goes through the same validation, quota and statistics as an upload; the exchanges
    are marked exported in the same transaction, so each lands in exactly one dataset.
    """
    file = None
    try:
        with transaction.atomic():
            rows = list(feedback_exportable(organization=organization).select_for_update())
            if len(rows) < settings.DATASET_MIN_EXAMPLES:
                raise ApiError(f"{len(rows)} new thumbs-up exchange(s); a dataset needs at least "
                               f"{settings.DATASET_MIN_EXAMPLES}. Rate more answers in the "
                               "playground.", code="too_few_examples", param=None)
            content = "".join(json.dumps({"messages": row.messages}, ensure_ascii=False) + "\n"
                              for row in rows).encode()
            filename = f"feedback-{timezone.now():%Y%m%d-%H%M%S}.jsonl"
            file = file_create(organization=organization, actor=actor,
                               purpose=File.Purpose.FINE_TUNE, filename=filename,
                               upload=SimpleUploadedFile(filename, content))
            if file.status != File.Status.PROCESSED:  # checked on the way in: should not happen
                first = (file.validation.get("errors") or [{}])[0]
                raise ApiError(f"The feedback dataset failed validation: {first.get('message')}",
                               code="invalid_file", param=None)
            Feedback.objects.filter(pk__in=[row.pk for row in rows]).update(exported_to=file.id)
            audit_record(actor=actor, action="feedback.export", obj=file,
                         metadata={"examples": len(rows)})
    except BaseException:
        if file is not None:  # the row was rolled back: no blob without its row
            artifact_storage().delete(file.blob_name)
        raise
    return file
