"""Adapters: list, retrieve, download (zip of the safetensors adapter), merge and export."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response

from jobs.training.layout import ADAPTER_ARTIFACT_FILES
from tuneplex.adapters import selectors, services
from tuneplex.adapters.models import Adapter
from tuneplex.core.apis import ApiObjectOutput, OrgApi
from tuneplex.core.downloads import zip_response
from tuneplex.core.errors import Conflict
from tuneplex.core.fields import StrictBooleanField
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import READ, TRAIN
from tuneplex.core.storage_layout import merged_prefix
from tuneplex.files.services import artifact_storage
from tuneplex.inference.pools import is_loaded
from tuneplex.inference.services import adapter_deploy, adapter_undeploy


class AdapterOutput(ApiObjectOutput):
    object_name = "adapter"
    id = serializers.CharField()
    name = serializers.CharField(help_text="Use as `model` on the inference endpoints.")
    base_model = serializers.CharField(source="base_model.name")
    fine_tuning_job_id = serializers.CharField(source="job_id")
    rank = serializers.IntegerField()
    bytes = serializers.IntegerField()
    sha256 = serializers.CharField()
    merge_status = serializers.CharField()
    merge_error = serializers.CharField()
    deployed = serializers.BooleanField(help_text="Served by the pool: usable as `model` now.")
    pinned = serializers.BooleanField(help_text="Never evicted from the engine's adapter slots.")
    deploy_error = serializers.CharField(help_text="Why the last deploy failed; empty otherwise.")
    loaded = serializers.SerializerMethodField(
        help_text="Loaded on an engine replica right now (deployed adapters load on first use).")
    parent = serializers.CharField(source="parent.name", allow_null=True, default=None,
                                   help_text="The adapter its job continued training from.")
    lineage = serializers.JSONField(help_text="Its job's lineage: the model it continued from "
                                    "(adapter, checkpoint) and the datasets of every generation; "
                                    "empty for an adapter trained from the base model.")

    def get_loaded(self, adapter) -> bool:
        return adapter.deployed and is_loaded(adapter)


class AdapterListApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=AdapterOutput(many=True), summary="List adapters")
    def get(self, request):
        return Response(list_page(selectors.adapter_list(organization=self.organization),
                                  request.query_params, serializer_class=AdapterOutput))


class AdapterDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=AdapterOutput, summary="Retrieve an adapter")
    def get(self, request, id: str):
        return Response(AdapterOutput(selectors.adapter_get(organization=self.organization,
                                                            adapter_id=id)).data)


class AdapterDownloadApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses={(200, "application/zip"): bytes},
                   summary="Download the adapter (adapter_config.json, adapter_model.safetensors)")
    def get(self, request, id: str):
        adapter = selectors.adapter_get(organization=self.organization, adapter_id=id)
        names = [(f"{adapter.blob_prefix}/{n}", n) for n in
                 ADAPTER_ARTIFACT_FILES
                 if artifact_storage().exists(f"{adapter.blob_prefix}/{n}")]
        return zip_response(request, names, f"{adapter.id}.zip")


class AdapterMergeApi(OrgApi):
    scopes = {"POST": TRAIN, "GET": READ}

    @extend_schema(request=None, responses={202: AdapterOutput},
                   summary="Merge the adapter into its base model (runs on a GPU worker)")
    def post(self, request, id: str):
        adapter = selectors.adapter_get(organization=self.organization, adapter_id=id)
        adapter = services.adapter_request_merge(organization=self.organization,
                                                 actor=self.principal, adapter=adapter)
        return Response(AdapterOutput(adapter).data, status=202)

    @extend_schema(responses={(200, "application/zip"): bytes},
                   summary="Download the merged model once merge_status is succeeded")
    def get(self, request, id: str):
        adapter = selectors.adapter_get(organization=self.organization, adapter_id=id)
        if adapter.merge_status != Adapter.MergeStatus.SUCCEEDED:
            raise Conflict(f"No merged model yet (merge_status is {adapter.merge_status}); "
                           f"POST to this URL to start one.", code="merge_not_ready")
        prefix = merged_prefix(adapter.blob_prefix)
        _, files = artifact_storage().listdir(prefix)
        return zip_response(request, [(f"{prefix}/{n}", n) for n in sorted(files)],
                            f"{adapter.id}-merged.zip")


class AdapterDeployApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema_serializer(component_name="AdapterDeployInput")
    class Input(serializers.Serializer):
        pinned = StrictBooleanField(
            default=False, help_text="Keep it loaded: never evicted for other adapters "
                                     "(at most half of a replica's slots can be pinned).")

    @extend_schema(request=Input, responses=AdapterOutput,
                   summary="Deploy the adapter to the serving pool (validated, then loaded)")
    def post(self, request, id: str):
        adapter = selectors.adapter_get(organization=self.organization, adapter_id=id)
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        adapter = adapter_deploy(organization=self.organization, actor=self.principal,
                                 adapter=adapter, pinned=data.validated_data["pinned"])
        return Response(AdapterOutput(adapter).data)


class AdapterUndeployApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=AdapterOutput,
                   summary="Stop serving the adapter (requests for it get 404)")
    def post(self, request, id: str):
        adapter = selectors.adapter_get(organization=self.organization, adapter_id=id)
        adapter = adapter_undeploy(organization=self.organization, actor=self.principal, adapter=adapter)
        return Response(AdapterOutput(adapter).data)
