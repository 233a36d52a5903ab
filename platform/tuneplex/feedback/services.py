"""Writes for playground feedback: rate an exchange, export the thumbs-up ones as a dataset;
compare two answers, export comparisons and 👍/👎 pairs as a preference (DPO) dataset."""

from __future__ import annotations

import json

from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.utils import timezone

from jobs.training.jsonl import CHAT, PREFERENCE, LineError, check_record
from tuneplex.adapters.models import Adapter
from tuneplex.audit.services import audit_record
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.feedback.models import Comparison, Feedback
from tuneplex.feedback.selectors import (
    comparisons_exportable,
    feedback_exportable,
    rated_pairs_exportable,
)
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


def _export_file(*, organization: Organization, actor: Principal, lines: list[dict],
                 filename: str) -> File:
    """One dataset file of ``lines`` through the upload path (validation, quota, statistics).
    Called inside the caller's transaction; the caller deletes the blob if that rolls back."""
    content = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    file = file_create(organization=organization, actor=actor, purpose=File.Purpose.FINE_TUNE,
                       filename=filename, upload=SimpleUploadedFile(filename, content))
    if file.status != File.Status.PROCESSED:  # checked on the way in: should not happen
        first = (file.validation.get("errors") or [{}])[0]
        raise ApiError(f"The dataset failed validation: {first.get('message')}",
                       code="invalid_file", param=None)
    return file


def _too_few(count: int, what: str, how: str) -> ApiError:
    return ApiError(f"{count} new {what}; a dataset needs at least "
                    f"{settings.DATASET_MIN_EXAMPLES}. {how}", code="too_few_examples", param=None)


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
                raise _too_few(len(rows), "thumbs-up exchange(s)",
                               "Rate more answers in the playground.")
            file = _export_file(organization=organization, actor=actor,
                                lines=[{"messages": row.messages} for row in rows],
                                filename=f"feedback-{timezone.now():%Y%m%d-%H%M%S}.jsonl")
            Feedback.objects.filter(pk__in=[row.pk for row in rows]).update(exported_to=file.id)
            audit_record(actor=actor, action="feedback.export", obj=file,
                         metadata={"examples": len(rows)})
    except BaseException:
        if file is not None:  # the row was rolled back: no blob without its row
            artifact_storage().delete(file.blob_name)
        raise
    return file


# --- preference data: comparisons, and thumbs up vs down on one prompt ----------------------------


def comparison_record(*, organization: Organization, actor: Principal, messages: object,
                      preferred: object, non_preferred: object) -> Comparison:
    """Record which of two answers to one prompt is better (``preferred`` and
    ``non_preferred`` are ``{"model", "content"}``), checked as a line of a preference file."""
    prompt = _clean_prompt(messages)
    sides = []
    for name, side in (("preferred", preferred), ("non_preferred", non_preferred)):
        if not isinstance(side, dict):
            raise ApiError(f"{name} must be an object with model and content.",
                           code="invalid_comparison", param=name)
        try:
            model = _check_model(organization, side.get("model"))
        except ApiError as exc:
            raise ApiError(exc.message, code=exc.code, param=f"{name}.model") from None
        sides.append((model, side.get("content")))
    _check_pair(_pair_line(prompt, sides[0][1], sides[1][1]))
    with transaction.atomic():
        comparison = Comparison.objects.create(
            organization=organization, messages=prompt, preferred_model=sides[0][0],
            preferred=sides[0][1], non_preferred_model=sides[1][0], non_preferred=sides[1][1],
            created_by=actor.user)
        audit_record(actor=actor, action="comparison.create", obj=comparison,
                     metadata={"preferred_model": sides[0][0], "non_preferred_model": sides[1][0]})
    return comparison


def _clean_prompt(messages: object) -> list[dict[str, str]]:
    """The prompt of a comparison: chat messages ending with the user's turn."""
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise ApiError(f"messages must be a list of 1 to {MAX_MESSAGES} messages ending with the "
                       "user's.", code="invalid_messages", param="messages")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
            for m in messages]


def _pair_line(prompt: list[dict], preferred: object, non_preferred: object) -> dict:
    return {"input": {"messages": prompt},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}


def _check_pair(line: dict) -> None:
    """The checks of a line of an uploaded preference file, and the exchange's size limit."""
    try:
        check_record(line, PREFERENCE)
    except LineError as exc:
        param = {"input.messages": "messages"}.get(exc.param or "", exc.param)
        if param and param.startswith("input."):
            param = param.removeprefix("input.")
        for side in ("preferred", "non_preferred"):
            if param and param.startswith(f"{side}_output"):
                param = side
        raise ApiError(exc.message, code=exc.code, param=param) from None
    if len(json.dumps(line).encode()) > MAX_EXCHANGE_BYTES:
        raise ApiError(f"The comparison is larger than {MAX_EXCHANGE_BYTES} bytes.",
                       code="invalid_messages", param="messages")


def rated_pairs(rows: list[Feedback]) -> list[tuple[Feedback, Feedback]]:
    """Pairs of a 👍 and a 👎 answer to the same prompt (the same messages before the answer),
    each answer in at most one pair, oldest first; identical answers are never paired."""
    by_prompt: dict[str, dict[int, list[Feedback]]] = {}
    for row in rows:
        key = json.dumps(row.messages[:-1], sort_keys=True)
        by_prompt.setdefault(key, {}).setdefault(row.rating, []).append(row)
    pairs = []
    for ratings in by_prompt.values():
        downs = list(ratings.get(Feedback.Rating.DOWN, []))
        for up in ratings.get(Feedback.Rating.UP, []):
            down = next((d for d in downs if d.messages[-1]["content"].strip()
                         != up.messages[-1]["content"].strip()), None)
            if down is not None:
                downs.remove(down)
                pairs.append((up, down))
    return pairs


def preference_exportable_count(*, organization: Organization) -> int:
    return (comparisons_exportable(organization=organization).count()
            + len(rated_pairs(list(rated_pairs_exportable(organization=organization)))))


def preference_export(*, organization: Organization, actor: Principal) -> File:
    """Write the comparisons and the 👍/👎 pairs not yet exported into a new preference (DPO)
    dataset, through the upload path; each lands in exactly one dataset."""
    file = None
    try:
        with transaction.atomic():
            comparisons = list(comparisons_exportable(organization=organization).select_for_update())
            rated = rated_pairs(list(rated_pairs_exportable(organization=organization)
                                     .select_for_update()))
            lines = [_pair_line(c.messages, c.preferred, c.non_preferred) for c in comparisons]
            lines += [_pair_line(up.messages[:-1], up.messages[-1]["content"],
                                 down.messages[-1]["content"]) for up, down in rated]
            if len(lines) < settings.DATASET_MIN_EXAMPLES:
                raise _too_few(len(lines), "comparison(s) and 👍/👎 pair(s)",
                               "Mark the better of two answers in the side-by-side playground.")
            file = _export_file(organization=organization, actor=actor, lines=lines,
                                filename=f"preferences-{timezone.now():%Y%m%d-%H%M%S}.jsonl")
            Comparison.objects.filter(pk__in=[c.pk for c in comparisons]).update(exported_to=file.id)
            Feedback.objects.filter(pk__in=[row.pk for pair in rated for row in pair]).update(
                preference_exported_to=file.id)
            audit_record(actor=actor, action="feedback.preference_export", obj=file,
                         metadata={"comparisons": len(comparisons), "rated_pairs": len(rated)})
    except BaseException:
        if file is not None:  # the row was rolled back: no blob without its row
            artifact_storage().delete(file.blob_name)
        raise
    return file
