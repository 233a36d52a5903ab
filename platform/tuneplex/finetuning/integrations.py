"""A job's `integrations`: OpenAI's `wandb` and our `mlflow`, checked field by field.

    [{"type": "wandb", "wandb": {"project", "name"?, "entity"?, "tags"?}},
     {"type": "mlflow", "mlflow": {"experiment_name", "run_name"?, "tags"?}}]

Each refusal is a 400 naming the field (``integrations[0].wandb.project``). What is stored, and
returned on the job, is the checked form with every field present (OpenAI's job object gives
``name``, ``entity`` and ``tags`` even when not set). No tenant gives an address: the MLflow
server is the operator's (TUNEPLEX_MLFLOW_TRACKING_URI), and W&B's is WANDB_BASE_URL or W&B's own.
The workers act on them in :mod:`tuneplex.finetuning.tracking`.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings

from tuneplex.core.errors import ApiError
from tuneplex.tenancy.models import Organization

KINDS = ("wandb", "mlflow")
# W&B's own rules: a project or entity name has none of these, and is at most 128 characters;
# a tag is 1 to 64 characters.
WANDB_NAME_FORBIDDEN = re.compile(r"[/\\#?%:]")
WANDB_NAME_MAX, WANDB_TAG_MAX, MAX_TAGS = 128, 64, 20
# MLflow's limits for a run name and tags (mlflow.utils.validation), and the characters its
# REST API takes in a tag key. Keys under mlflow. and tuneplex. are set by MLflow and by us.
MLFLOW_EXPERIMENT_MAX, MLFLOW_RUN_NAME_MAX = 200, 250
MLFLOW_TAG_KEY = re.compile(r"[\w\-. /]{1,250}")
MLFLOW_TAG_VALUE_MAX = 5000
RESERVED_TAG_PREFIXES = ("mlflow.", "tuneplex.")


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(message, code="invalid_integration", param=param)


def _text(value: Any, param: str, *, limit: int, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _invalid(param, "Must be a non-empty string." if value is not None
                       else "This field is required.")
    if len(value) > limit:
        raise _invalid(param, f"At most {limit} characters.")
    return value


def _fields(given: Any, param: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise _invalid(param, "Must be an object.")
    for key in given:
        if key not in known:
            raise _invalid(f"{param}.{key}", f"Unknown field {key!r}; known: {', '.join(known)}.")
    return given


def _wandb(given: Any, param: str, organization: Organization) -> dict[str, Any]:
    fields = _fields(given, param, ("project", "name", "entity", "tags"))
    checked: dict[str, Any] = {}
    for key in ("project", "entity"):
        value = _text(fields.get(key), f"{param}.{key}", limit=WANDB_NAME_MAX,
                      required=key == "project")
        if value is not None and WANDB_NAME_FORBIDDEN.search(value):
            raise _invalid(f"{param}.{key}", "W&B names cannot contain / \\ # ? % or :.")
        checked[key] = value
    checked["name"] = _text(fields.get("name"), f"{param}.name", limit=WANDB_NAME_MAX)
    tags = fields.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > MAX_TAGS:
            raise _invalid(f"{param}.tags", f"Must be a list of at most {MAX_TAGS} strings.")
        for index, tag in enumerate(tags):
            _text(tag, f"{param}.tags[{index}]", limit=WANDB_TAG_MAX, required=True)
    checked["tags"] = list(tags) if tags is not None else None
    if settings.WANDB_MODE == "online" and not organization.has_wandb_api_key:
        raise ApiError("This platform sends W&B runs online with the organization's W&B API "
                       "key, and none is set: an owner or admin sets it with POST "
                       "/v1/organization/integrations/wandb.", code="integration_unavailable",
                       param=f"{param}")
    return {"project": checked["project"], "name": checked["name"],
            "entity": checked["entity"], "tags": checked["tags"]}


def _mlflow(given: Any, param: str) -> dict[str, Any]:
    fields = _fields(given, param, ("experiment_name", "run_name", "tags"))
    experiment = _text(fields.get("experiment_name"), f"{param}.experiment_name",
                       limit=MLFLOW_EXPERIMENT_MAX, required=True)
    run_name = _text(fields.get("run_name"), f"{param}.run_name", limit=MLFLOW_RUN_NAME_MAX)
    tags = fields.get("tags")
    if tags is not None:
        if not isinstance(tags, dict) or len(tags) > MAX_TAGS:
            raise _invalid(f"{param}.tags", f"Must be an object of at most {MAX_TAGS} string "
                                            "values.")
        for key, value in tags.items():
            if not MLFLOW_TAG_KEY.fullmatch(key) or key.startswith(RESERVED_TAG_PREFIXES):
                raise _invalid(f"{param}.tags.{key}", "A tag key is 1 to 250 letters, digits, "
                               "'_', '-', '.', ' ' or '/', and does not start with mlflow. or "
                               "tuneplex. (set by MLflow and by the platform).")
            _text(value, f"{param}.tags.{key}", limit=MLFLOW_TAG_VALUE_MAX, required=True)
    return {"experiment_name": experiment, "run_name": run_name,
            "tags": dict(tags) if tags is not None else None}


def integrations_check(raw: Any, *, organization: Organization) -> list[dict[str, Any]]:
    """The request's integrations, checked and filled in; raises ApiError naming the field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _invalid("integrations", "Must be a list of integrations.")
    checked: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        param = f"integrations[{index}]"
        if not isinstance(item, dict):
            raise _invalid(param, "Must be an object: {type, <type>: {...}}.")
        kind = item.get("type")
        if kind not in KINDS:
            raise _invalid(f"{param}.type", f"Must be one of {', '.join(KINDS)}.")
        _fields(item, param, ("type", kind))
        if any(done["type"] == kind for done in checked):
            raise _invalid(f"{param}.type", f"At most one {kind} integration a job.")
        if kind not in item:
            raise _invalid(f"{param}.{kind}", "This field is required.")
        if kind == "mlflow" and not settings.MLFLOW_TRACKING_URI:
            raise ApiError("This platform has no MLflow tracking server: its operator sets one "
                           "with TUNEPLEX_MLFLOW_TRACKING_URI.", code="integration_unavailable",
                           param=f"{param}.type")
        settings_of = (_wandb(item[kind], f"{param}.{kind}", organization) if kind == "wandb"
                       else _mlflow(item[kind], f"{param}.{kind}"))
        checked.append({"type": kind, kind: settings_of})
    return checked
