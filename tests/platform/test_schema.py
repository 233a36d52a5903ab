"""The OpenAPI schema generates cleanly and the docs page needs no CDN."""

import subprocess
import sys
from pathlib import Path

from django.test import Client

REPO = Path(__file__).resolve().parents[2]


def test_the_schema_generates_without_warnings(tmp_path):
    result = subprocess.run([sys.executable, "manage.py", "spectacular", "--validate",
                             "--fail-on-warn", "--file", str(tmp_path / "schema.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_schema_and_docs_are_served_without_a_cdn():
    client = Client()
    schema = client.get("/v1/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/v1/fine_tuning/jobs" in paths and "/v1/files" in paths
    docs = client.get("/v1/docs")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "/static/drf_spectacular_sidecar/" in html and "cdn" not in html.lower()


def test_lists_are_documented_as_the_envelope_they_return_and_errors_in_their_shape(org_a):
    from tests.conftest import bearer

    schema = Client().get("/v1/openapi.json").json()
    client = bearer(org_a.owner_key)
    lists = [path for path, ops in schema["paths"].items()
             if "get" in ops and "{" not in path and "200" in ops["get"]["responses"]
             and "data" in ops["get"]["responses"]["200"].get("content", {})
             .get("application/json", {}).get("schema", {}).get("properties", {})]
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/adapters", "/v1/api_keys",
            "/v1/organization/members", "/v1/organization/invitations"} <= set(lists)
    for path in lists:
        documented = schema["paths"][path]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]
        body = client.get(path).json()
        assert set(documented.get("required", ["object", "data"])) <= set(body), path
        assert body["object"] == "list" and isinstance(body["data"], list), path
    for path, ops in schema["paths"].items():
        for method, operation in ops.items():
            assert {"400", "401", "403"} <= set(operation["responses"]), (method, path)
            if "{" in path:
                assert "404" in operation["responses"], (method, path)


def test_pause_resume_and_the_jobs_metadata_filter_are_documented():
    paths = Client().get("/v1/openapi.json").json()["paths"]
    for action in ("pause", "resume"):
        operation = paths[f"/v1/fine_tuning/jobs/{{id}}/{action}"]["post"]
        assert {"200", "404", "409"} <= set(operation["responses"]), action
    listed = {p["name"]: p for p in paths["/v1/fine_tuning/jobs"]["get"]["parameters"]}
    assert listed["metadata"]["style"] == "deepObject" and listed["metadata"]["in"] == "query"


def test_the_batch_api_is_documented_in_openais_shape():
    schema = Client().get("/v1/openapi.json").json()
    paths = schema["paths"]
    assert {"get", "post"} <= set(paths["/v1/batches"])
    assert "get" in paths["/v1/batches/{batch_id}"] and "post" in paths["/v1/batches/{batch_id}/cancel"]
    components = schema["components"]["schemas"]
    created = components["BatchCreateInputRequest"]["properties"]

    def enum(field: dict) -> list:  # inline, or in a component of its own
        if "enum" in field:
            return field["enum"]
        ref = field.get("$ref") or field["allOf"][0]["$ref"]
        return components[ref.rsplit("/", 1)[1]]["enum"]

    assert enum(created["endpoint"]) == ["/v1/chat/completions", "/v1/completions"]
    assert enum(created["completion_window"]) == ["24h"]
    batch = schema["components"]["schemas"]["BatchOutput"]["properties"]
    assert {"request_counts", "errors", "usage", "output_file_id", "error_file_id",
            "expires_at", "cancelling_at"} <= set(batch)
