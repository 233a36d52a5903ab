"""Fine-tuning jobs: the new-job form (presets, advanced hyperparameters checked inline, the
pre-flight memory and time estimate), the list, and the live job page (progress, ETA, loss
chart, events, pause, resume and cancel) that polls until the job has finished."""

from __future__ import annotations

import dataclasses

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from frontend.views.common import field_errors, get_or_404, polled_section, principal_of
from jobs.training.config import SCHEDULERS, SHARDINGS, TrainingConfig
from tuneplex.adapters.selectors import adapter_list
from tuneplex.basemodels.selectors import base_model_list
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import TRAIN
from tuneplex.files.models import File
from tuneplex.files.selectors import file_list
from tuneplex.finetuning import selectors
from tuneplex.finetuning.estimates import time_estimate
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services import lifecycle
from tuneplex.finetuning.services.plan import METHOD_FIELDS, OPENAI_NAMES, job_plan

POLL_SECONDS = 2
EVENTS_SHOWN = 100
CHART_POINTS = 400

PRESETS = {
    "quick": {"label": "Quick check", "hyperparameters": {"n_epochs": 1, "lora_rank": 8},
              "help": "One pass over the data with a small adapter (rank 8): see quickly whether "
                      "the data teaches what you want."},
    "balanced": {"label": "Balanced", "hyperparameters": {},
                 "help": "The defaults: epochs, batch size and learning rate chosen from the "
                         "dataset size, rank 16 on every linear layer."},
    # Rank 16: the largest the serving pool loads by default (TUNEPLEX_ENGINE_MAX_LORA_RANK);
    # a larger one would be refused (adapter_not_servable).
    "thorough": {"label": "Thorough", "hyperparameters": {"n_epochs": 4, "lora_rank": 16,
                                                          "lora_alpha": 32, "learning_rate": 1e-4},
                 "help": "Four passes, rank 16 on every linear layer and a gentler learning "
                         "rate: for larger datasets and harder tasks."},
}
DEFAULT_PRESET = "balanced"

# Advanced hyperparameters: form field → (type, label, help). Blank keeps the preset's value.
ADVANCED: dict[str, tuple[type, str, str]] = {
    "n_epochs": (int, "Epochs", "Passes over the data (1-50). Blank: chosen from the dataset size."),
    "batch_size": (int, "Batch size", "Examples per forward pass (1-512). Blank: chosen for you."),
    "gradient_accumulation_steps": (int, "Gradient accumulation",
                                    "Micro-batches per optimizer step (1-1024)."),
    "learning_rate": (float, "Learning rate", "Peak learning rate (0-1). Blank: 2e-4."),
    "lr_scheduler": (str, "Schedule", "cosine, linear or constant, after warmup."),
    "warmup_ratio": (float, "Warmup ratio", "Fraction of the steps spent warming up (0-0.5)."),
    "lora_rank": (int, "LoRA rank", "Adapter rank r (1-256); larger learns more, costs more."),
    "lora_alpha": (float, "LoRA alpha", "Scales the update by alpha / rank."),
    "lora_dropout": (float, "LoRA dropout", "Dropout on the adapter's input (0 to < 1)."),
    "max_seq_len": (int, "Max sequence length", "Longer examples are truncated."),
    "validation_split": (float, "Validation split",
                         "Fraction held out to evaluate when no validation file is given (0-0.5)."),
    "checkpoint_every_steps": (int, "Checkpoint every", "Steps between resumable checkpoints."),
    "seed": (int, "Seed", "Data order, initialisation and dropout."),
    "gpus": (int, "GPUs", "GPUs to train on at once (same losses as one, faster). At most "
                          "what one GPU worker has. Blank: 1."),
    "sharding": (str, "Sharding", "With several GPUs: auto splits the model across them only "
                                  "when it does not fit one GPU; off gives each GPU a whole copy; "
                                  "fsdp always splits (LoRA only). Blank: auto."),
    "gradient_checkpointing": (bool, "Gradient checkpointing",
                               "Recompute every layer: least memory, slowest. Unchecked, the "
                               "worker checkpoints only the layers its memory needs."),
}
# Advanced settings with a fixed set of values: a select, its first option the trainer's default.
CHOICES = {name: {"default": getattr(TrainingConfig, name), "options": options}
           for name, options in (("lr_scheduler", SCHEDULERS), ("sharding", SHARDINGS))}
METHOD_TYPES = {
    "supervised": "Supervised: learn to give the answers in the dataset (chat, alpaca, "
                  "prompt-completion or text files).",
    "dpo": "Preference (DPO): learn to prefer the preferred answer of each pair over the other "
           "(preference files: input, preferred_output, non_preferred_output).",
}
BETA_HELP = ("DPO only. How far the adapter may move away from the model it starts from: higher "
             "keeps it closer (default 0.1; 0 < beta ≤ 100).")
FORM_FIELDS = {"model", "training_file", "validation_file", "method", "method_type", "beta",
               "suffix", *ADVANCED}
_TYPE_ERRORS = {int: "Enter a whole number.", float: "Enter a number."}


def _parse(post) -> tuple[dict, dict[str, str]]:
    """The request's job arguments, and the fields that are not even numbers."""
    preset = post.get("preset") if post.get("preset") in PRESETS else DEFAULT_PRESET
    hyperparameters = dict(PRESETS[preset]["hyperparameters"])
    errors: dict[str, str] = {}
    hyperparameters["method"] = post.get("method") or "lora"
    method_type = post.get("method_type") if post.get("method_type") in METHOD_TYPES else "supervised"
    beta = post.get("beta", "").strip()
    if method_type == "dpo" and beta:
        try:
            hyperparameters["beta"] = float(beta)
        except ValueError:
            errors["beta"] = _TYPE_ERRORS[float]
    for name, (kind, _, _) in ADVANCED.items():
        if kind is bool:
            if post.get(name) == "on":
                hyperparameters[name] = True
            continue
        raw = post.get(name, "").strip()
        if not raw:
            continue
        try:
            hyperparameters[name] = kind(raw)
        except ValueError:
            errors[name] = _TYPE_ERRORS[kind]
    arguments = {"model": post.get("model", ""), "training_file": post.get("training_file", ""),
                 "validation_file": post.get("validation_file") or None,
                 "suffix": post.get("suffix", "").strip() or None,
                 "hyperparameters": hyperparameters, "method_type": method_type}
    return arguments, errors


def _form_context(principal, values, *, plan=None, estimate=None, errors=None) -> dict:
    files = (file_list(organization=principal.organization, purpose=File.Purpose.FINE_TUNE)
             .filter(status=File.Status.PROCESSED).order_by("-created_at")[:200])
    return {"values": values, "plan": plan, "estimate": estimate, "errors": errors or {},
            "files": files,
            "base_models": base_model_list(enabled_only=True), "presets": PRESETS,
            "adapters": adapter_list(organization=principal.organization).order_by("-created_at")[:200],
            "method_types": METHOD_TYPES, "beta_help": BETA_HELP,
            "advanced": [(name, *spec) for name, spec in ADVANCED.items()], "choices": CHOICES,
            "qlora_available": settings.TRAINING_DEVICE == "cuda",
            "memory_limit": settings.TRAINING_MEMORY, "form_fields": sorted(FORM_FIELDS)}


@login_required
def job_new(request):
    principal = principal_of(request, TRAIN)
    if request.method == "POST":
        arguments, errors = _parse(request.POST)
        if not errors:
            try:
                job = lifecycle.job_create(organization=principal.organization, actor=principal,
                                          **arguments)
            except ApiError as exc:
                errors = field_errors(exc, FORM_FIELDS)
            else:
                return redirect("frontend:job", id=job.id)
        return render(request, "frontend/job_new.html",
                      _form_context(principal, request.POST, errors=errors), status=400)
    values = {"preset": DEFAULT_PRESET, "method": "lora", "method_type": "supervised",
              "training_file": request.GET.get("file", ""),
              "model": settings.DEFAULT_BASE_MODEL}
    return render(request, "frontend/job_new.html", _form_context(principal, values))


@login_required
@require_POST
def job_check(request):
    """Inline validation: each field's error (swapped out of band) and the pre-flight estimate."""
    principal = principal_of(request, TRAIN)
    arguments, errors = _parse(request.POST)
    plan = estimate = None
    if not errors:
        try:
            plan = job_plan(organization=principal.organization, **arguments)
        except ApiError as exc:
            errors = field_errors(exc, FORM_FIELDS)
        else:
            estimate = time_estimate(organization=principal.organization, config=plan.config,
                                     base_model=plan.base_model, train=plan.train)
    return render(request, "frontend/job_new.html#preflight", _form_context(
        principal, request.POST, plan=plan, estimate=estimate, errors=errors) | {"oob": True})


@login_required
def jobs(request):
    principal = principal_of(request)
    return render(request, "frontend/jobs.html", {
        "jobs": selectors.job_list(organization=principal.organization).order_by("-created_at")[:200],
        "can_train": TRAIN in principal.scopes})


# The job page's settings, grouped and ordered as the new-job form asks for them; then the
# trainer's other settings in its own field order, then anything else stored (older jobs).
_CONFIG_NAMES = {name: OPENAI_NAMES.get(name, name) for name in ADVANCED}


def settings_groups(job: FineTuningJob) -> list[tuple[str, list[tuple[str, object]]]]:
    """(group title, [(label, value), ...]) of the job's settings, in a fixed order whatever
    the job set: the same settings show in the same places on every job page."""
    config = dict(job.config or {})
    shown: set[str] = set()

    def take(name: str, default=None):
        shown.add(name)
        return config.get(name, default)

    dpo = job.method_type == "dpo"
    groups = [
        ("Model and data", [("Base model", job.base_model.name),
                            ("Training dataset", job.training_file),
                            ("Validation dataset", job.validation_file or "none"),
                            ("Name suffix", job.suffix or "none")]),
        ("Training method", [("Method", "DPO" if dpo else "supervised"),
                             ("Beta (DPO)", take("dpo_beta") if dpo else "not used")]),
        ("Adapter", [("Adapter", take("method", job.method))]),
        ("Advanced hyperparameters", [(label, take(_CONFIG_NAMES[name]))
                                      for name, (_, label, _) in ADVANCED.items()]),
    ]
    groups.append(("Experiment tracking", _tracking_rows(job)))
    shown |= METHOD_FIELDS | {"dpo_beta"}  # said by the method above
    fields = [f.name for f in dataclasses.fields(TrainingConfig)]
    others = [name for name in fields if name in config and name not in shown]
    others += sorted(name for name in config if name not in shown and name not in fields)
    groups.append(("Other settings", [(name, config[name]) for name in others]))
    return groups


def _tracking_rows(job: FineTuningJob) -> list[tuple[str, str]]:
    """The job's integrations in words: where its parameters, metrics and adapter are tracked."""
    rows = []
    for integration in job.integrations or []:
        options = integration.get(integration.get("type"), {}) or {}
        tags = f", tags {', '.join(options['tags'])}" if options.get("tags") else ""
        if integration.get("type") == "wandb":
            where = " / ".join(filter(None, (options.get("entity"), options.get("project"))))
            rows.append(("Weights & Biases", f"project {where}"
                         + (f", run {options['name']}" if options.get("name") else "") + tags))
        elif integration.get("type") == "mlflow":
            rows.append(("MLflow", f"experiment {job.organization.slug}/"
                                   f"{options.get('experiment_name')}"
                         + (f", run {options['run_name']}" if options.get("run_name") else "")
                         + tags))
    return rows or [("Tracking", "none")]


def _progress_context(principal, job: FineTuningJob) -> dict:
    points = selectors.job_metrics_sampled(job=job, at_most=CHART_POINTS)  # bounded per poll
    series = ["train_loss", "eval_loss"]
    if job.method_type == "dpo":
        series += ["reward_margin", "reward_accuracy"]
    chart = {"step": [p.get("step") for p in points],
             **{name: [p.get(name) for p in points] for name in series}}
    finished = job.status in FineTuningJob.FINISHED
    return {"job": job, "finished": finished, "chart": chart, "poll_seconds": POLL_SECONDS,
            "events": selectors.job_events(job=job).order_by("-created_at", "-id")[:EVENTS_SHOWN],
            "percent": (round(100 * job.step / job.total_steps) if job.total_steps else 0),
            "can_cancel": TRAIN in principal.scopes and not finished,
            "can_pause": (TRAIN in principal.scopes and job.status in FineTuningJob.ACTIVE
                          and job.status != FineTuningJob.Status.PAUSED
                          and not job.pause_requested and not job.cancel_requested),
            "can_resume": TRAIN in principal.scopes and job.status == FineTuningJob.Status.PAUSED,
            "adapter": getattr(job, "adapter", None) if job.status == "succeeded" else None,
            "has_wandb": any(i.get("type") == "wandb" for i in job.integrations or [])}


@login_required
def job(request, id: str):
    principal = principal_of(request)
    found = get_or_404(selectors.job_get, organization=principal.organization, job_id=id)
    return render(request, "frontend/job.html", _progress_context(principal, found)
                  | {"settings_groups": settings_groups(found)})


@login_required
def job_progress(request, id: str):
    """The live part of the job page, polled every few seconds; 286 stops htmx polling."""
    principal = principal_of(request)
    found = get_or_404(selectors.job_get, organization=principal.organization, job_id=id)
    context = _progress_context(principal, found)
    return polled_section(request, "frontend/job.html#progress", context, done=context["finished"])


def _job_action(request, id: str, service):
    """Cancel, pause or resume (``service``, a lifecycle service) for a member with the train
    scope, then the job's live section again, with the refusal's message if there was one."""
    principal = principal_of(request, TRAIN)
    found = get_or_404(selectors.job_get, organization=principal.organization, job_id=id)
    error = ""
    try:
        found = service(organization=principal.organization, actor=principal, job=found)
    except ApiError as exc:
        error = exc.message
        found.refresh_from_db()
    context = _progress_context(principal, found) | {"cancel_error": error}
    return render(request, "frontend/job.html#progress", context)


@login_required
@require_POST
def job_cancel(request, id: str):
    return _job_action(request, id, lifecycle.job_cancel)


@login_required
@require_POST
def job_pause(request, id: str):
    return _job_action(request, id, lifecycle.job_pause)


@login_required
@require_POST
def job_resume(request, id: str):
    return _job_action(request, id, lifecycle.job_resume)
