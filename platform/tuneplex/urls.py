from django.conf import settings
from django.urls import include, path, register_converter
from django.utils.csp import CSP
from django.utils.decorators import method_decorator
from django.views.decorators.csp import csp_override
from drf_spectacular.renderers import OpenApiJsonRenderer
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView

from tuneplex.apikeys import apis as apikeys
from tuneplex.audit import apis as audit
from tuneplex.basemodels import apis as basemodels
from tuneplex.batches import apis as batches
from tuneplex.evals import apis as evals
from tuneplex.evals import grader_apis as graders
from tuneplex.exports import apis as exports
from tuneplex.feedback import apis as feedback
from tuneplex.adapters import apis as adapters
from tuneplex.files import apis as files
from tuneplex.files import upload_apis as uploads
from tuneplex.finetuning import apis as finetuning
from tuneplex.inference import gateway
from tuneplex.operations import health
from tuneplex.sweeps import apis as sweeps
from tuneplex.tenancy import apis as tenancy


class ObjectIdConverter:
    """Our ids (``key-…``, ``mem-…``) and registry names: anything else is an unknown route."""

    regex = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ObjectIdConverter, "oid")


class PublicSchemaView(SpectacularAPIView):
    renderer_classes = [OpenApiJsonRenderer]
    public = True
    authentication_classes: list = []


# Redoc (vendored) starts itself from an inline script and styles itself inline, in a worker.
DOCS_CSP = {"default-src": [CSP.SELF], "script-src": [CSP.SELF, CSP.UNSAFE_INLINE],
            "style-src": [CSP.SELF, CSP.UNSAFE_INLINE], "img-src": [CSP.SELF, "data:"],
            "worker-src": [CSP.SELF, "blob:"], "object-src": [CSP.NONE],
            "frame-ancestors": [CSP.NONE]}


@method_decorator(csp_override(DOCS_CSP), name="dispatch")
class PublicDocsView(SpectacularRedocView):
    public = True
    authentication_classes: list = []


api_v1 = [
    path("openapi.json", PublicSchemaView.as_view(), name="openapi"),
    path("docs", PublicDocsView.as_view(url_name="openapi"), name="api-docs"),
    path("organization", tenancy.OrganizationApi.as_view()),
    path("organization/members", tenancy.MemberListApi.as_view()),
    path("organization/members/<oid:id>", tenancy.MemberDetailApi.as_view()),
    path("organization/invitations", tenancy.InvitationListApi.as_view()),
    path("organization/invitations/<oid:id>/revoke", tenancy.InvitationRevokeApi.as_view()),
    path("organization/integrations/wandb", tenancy.WandbIntegrationApi.as_view()),
    path("api_keys", apikeys.ApiKeyListApi.as_view()),
    path("api_keys/<oid:id>", apikeys.ApiKeyDetailApi.as_view()),
    path("api_keys/<oid:id>/revoke", apikeys.ApiKeyRevokeApi.as_view()),
    path("audit_events", audit.AuditEventListApi.as_view()),
    path("files", files.FileListApi.as_view()),
    path("files/<oid:id>", files.FileDetailApi.as_view()),
    path("files/<oid:id>/content", files.FileContentApi.as_view()),
    path("uploads", uploads.UploadCreateApi.as_view()),
    path("uploads/<oid:id>/parts", uploads.UploadPartApi.as_view()),
    path("uploads/<oid:id>/complete", uploads.UploadCompleteApi.as_view()),
    path("uploads/<oid:id>/cancel", uploads.UploadCancelApi.as_view()),
    path("fine_tuning/jobs", finetuning.JobListApi.as_view()),
    path("fine_tuning/jobs/<oid:id>", finetuning.JobDetailApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/cancel", finetuning.JobCancelApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/pause", finetuning.JobPauseApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/resume", finetuning.JobResumeApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/events", finetuning.JobEventsApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/checkpoints", finetuning.JobCheckpointsApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/tensorboard", finetuning.JobTensorboardApi.as_view()),
    path("fine_tuning/jobs/<oid:id>/wandb", finetuning.JobWandbApi.as_view()),
    path("adapters", adapters.AdapterListApi.as_view()),
    path("adapters/<oid:id>", adapters.AdapterDetailApi.as_view()),
    path("adapters/<oid:id>/download", adapters.AdapterDownloadApi.as_view()),
    path("adapters/<oid:id>/merge", adapters.AdapterMergeApi.as_view()),
    path("adapters/<oid:id>/deploy", adapters.AdapterDeployApi.as_view()),
    path("adapters/<oid:id>/undeploy", adapters.AdapterUndeployApi.as_view()),
    path("adapters/<oid:id>/exports", exports.ExportListApi.as_view()),
    path("adapters/<oid:id>/exports/<oid:export_id>", exports.ExportDetailApi.as_view()),
    path("adapters/<oid:id>/exports/<oid:export_id>/content", exports.ExportContentApi.as_view()),
    path("chat/completions", gateway.chat_completions, name="chat-completions"),
    path("completions", gateway.completions, name="completions"),
    path("responses", gateway.create_response, name="responses"),
    path("models", gateway.models_list, name="models"),
    path("models/<str:model>", gateway.model_detail, name="model-detail"),
    path("feedback", feedback.FeedbackListApi.as_view()),
    path("feedback/export", feedback.FeedbackExportApi.as_view()),
    path("feedback/comparisons", feedback.ComparisonListApi.as_view()),
    path("feedback/preference_export", feedback.PreferenceExportApi.as_view()),
    path("fine_tuning/alpha/graders/validate", graders.GraderValidateApi.as_view()),
    path("fine_tuning/alpha/graders/run", graders.GraderRunApi.as_view()),
    path("deploy_gates", evals.GateListApi.as_view()),
    path("deploy_gates/<oid:gate_id>", evals.GateDetailApi.as_view()),
    path("evals", evals.EvalListApi.as_view()),
    path("evals/<oid:eval_id>", evals.EvalDetailApi.as_view()),
    path("evals/<oid:eval_id>/runs", evals.RunListApi.as_view()),
    path("evals/<oid:eval_id>/runs/<oid:run_id>", evals.RunDetailApi.as_view()),
    path("evals/<oid:eval_id>/runs/<oid:run_id>/cancel", evals.RunCancelApi.as_view()),
    path("evals/<oid:eval_id>/runs/<oid:run_id>/output_items", evals.OutputItemListApi.as_view()),
    path("evals/<oid:eval_id>/runs/<oid:run_id>/output_items/<oid:output_item_id>",
         evals.OutputItemDetailApi.as_view()),
    path("batches", batches.BatchListApi.as_view()),
    path("batches/<oid:batch_id>", batches.BatchDetailApi.as_view()),
    path("batches/<oid:batch_id>/cancel", batches.BatchCancelApi.as_view()),
    path("sweeps", sweeps.SweepListApi.as_view()),
    path("sweeps/<oid:sweep_id>", sweeps.SweepDetailApi.as_view()),
    path("sweeps/<oid:sweep_id>/cancel", sweeps.SweepCancelApi.as_view()),
    path("base_models", basemodels.BaseModelListApi.as_view()),
    path("base_models/<oid:name>", basemodels.BaseModelDetailApi.as_view()),
]

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("v1/", include(api_v1)),
    path("", include("frontend.urls")),
]
if settings.OIDC_ENABLED:  # /oidc/authenticate/ and /oidc/callback/ (single sign-on)
    urlpatterns.insert(0, path("oidc/", include("mozilla_django_oidc.urls")))

handler400 = "tuneplex.core.errors.handler400"
handler403 = "tuneplex.core.errors.handler403"
handler404 = "tuneplex.core.errors.handler404"
handler500 = "tuneplex.core.errors.handler500"
