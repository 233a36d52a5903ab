"""Staging an adapter for the engine reads through the `serving` storage: on an engine node, the
pool agent's own read-only credentials (TUNEPLEX_AGENT_S3_*), never the platform's."""

from __future__ import annotations

import copy

import pytest

from serving.adapters import AdapterInvalid
from tests.fixtures.adapter_rows import adapter_from_dir


def elsewhere(storage: dict) -> dict:
    """The same S3 server, a bucket that does not exist: what these credentials cannot read."""
    moved = copy.deepcopy(storage)
    moved["OPTIONS"]["bucket_name"] = "not-this-bucket"
    return moved


@pytest.mark.django_db
def test_staging_reads_through_the_serving_storage_only(s3_artifacts, settings, org_a, default_model,
                                                        adapters, tmp_path):
    from tuneplex.inference.staging import stage_adapter

    adapter = adapter_from_dir(org_a.organization, adapters["adapter-0"], suffix="st",
                               base_model=default_model)  # stored in the bucket
    bucket = settings.STORAGES["artifacts"]
    settings.SERVING_DIR = tmp_path / "serving"
    # The serving storage cannot read the bucket, the platform's can: staging fails...
    settings.STORAGES = {**settings.STORAGES, "serving": elsewhere(bucket)}
    with pytest.raises(AdapterInvalid) as refused:
        stage_adapter(adapter)
    assert refused.value.code == "adapter_incomplete"
    # ... and the other way round it succeeds.
    settings.STORAGES = {**settings.STORAGES, "artifacts": elsewhere(bucket), "serving": bucket}
    path, info = stage_adapter(adapter)
    assert (path / "adapter_model.safetensors").is_file() and info.rank > 0
