"""Every error answer carries its request id (the ``X-Request-Id`` header, and ``request_id`` in
the error body), and the log line of an internal error carries the same id, under the real
server (uvicorn): Django's views and DRF's, and the answers made before Django (the inference
fast path, the body-size guard, /metrics). The faults are planted by tests/fixtures/faulty_asgi,
which is imported by the server only (it changes the views of the process that imports it).
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import GatewayProcess, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def web(test_database_url):
    process = GatewayProcess(database_url=test_database_url, engine=None,
                             app="tests.fixtures.faulty_asgi:application")
    try:
        yield process
    finally:
        process.stop()


def carried_id(response: httpx.Response) -> str:
    """The response's request id, after checking that its body carries the same one."""
    request_id = response.headers["X-Request-Id"]
    body = response.json()
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message", "param"}, body
    assert body["request_id"] == request_id
    return request_id


def logged_line(web: GatewayProcess, text: str) -> str:
    """The web process's log line holding ``text``, once it is written."""
    def find() -> str | None:
        return next((line for line in web.log_path.read_text().splitlines() if text in line), None)
    return wait_for(find, timeout=10, message=f"{text!r} in {web.log_path}")


def test_an_internal_error_in_a_view_carries_its_request_id_to_the_client_and_the_log(web, org_a):
    offered = f"proxy-{uuid.uuid4().hex[:16]}"
    key = {"Authorization": f"Bearer {org_a.owner_key}"}
    response = httpx.get(f"{web.url}/v1/organization", headers={**key, "X-Request-Id": offered})
    assert response.status_code == 500
    assert carried_id(response) == offered  # a proxy's id is kept
    error = response.json()["error"]
    assert error["code"] == "server_error" and offered in error["message"]
    assert "db-7" not in response.text and "/srv" not in response.text
    assert "ERROR django.request" in logged_line(web, f"[{offered}]: Internal Server Error: /v1/organization")
    assert "db-7.internal:5432" in web.log_path.read_text()  # the internals: in the log only

    generated = httpx.get(f"{web.url}/v1/organization", headers=key)  # no id offered: one is made
    request_id = carried_id(generated)
    assert len(request_id) == 32 and request_id != offered
    logged_line(web, f"[{request_id}]: Internal Server Error: /v1/organization")


def test_an_internal_error_in_the_inference_fast_path_carries_its_request_id(web, org_a):
    response = httpx.post(f"{web.url}/v1/chat/completions",
                          headers={"Authorization": f"Bearer {org_a.owner_key}"},
                          json={"model": "m", "messages": [{"role": "user",
                                                            "content": "plant-a-fault"}]})
    assert response.status_code == 500
    request_id = carried_id(response)
    assert request_id in response.json()["error"]["message"] and "db-7" not in response.text
    assert "ERROR tuneplex.inference.asgi" in logged_line(
        web, f"[{request_id}]: inference request failed")


def test_an_exception_that_escapes_every_layer_is_answered_in_the_error_shape(web, org_a):
    response = httpx.post(f"{web.url}/v1/chat/completions",
                          headers={"Authorization": f"Bearer {org_a.owner_key}"},
                          json={"model": "m", "messages": [{"role": "user",
                                                            "content": "plant-a-crash"}]})
    assert response.status_code == 500  # not uvicorn's bare text answer
    request_id = carried_id(response)
    assert response.json()["error"]["code"] == "server_error" and "db-7" not in response.text
    assert "ERROR tuneplex.core.asgi_request_id" in logged_line(
        web, f"[{request_id}]: unhandled error in POST /v1/chat/completions")


def test_every_error_answer_carries_its_request_id(web, org_a, org_b, settings):
    key_a = {"Authorization": f"Bearer {org_a.owner_key}"}
    theirs = httpx.get(f"{web.url}/v1/api_keys", headers={
        "Authorization": f"Bearer {org_b.owner_key}"}).json()["data"][0]["id"]
    too_large = b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    answers = {
        "Django's unknown route": (404, httpx.get(f"{web.url}/v1/nope", headers=key_a)),
        "DRF: another organization's object": (
            404, httpx.get(f"{web.url}/v1/api_keys/{theirs}", headers=key_a)),
        "DRF: no credentials": (401, httpx.get(f"{web.url}/v1/api_keys")),
        "DRF: invalid input": (400, httpx.post(f"{web.url}/v1/api_keys", headers=key_a,
                                               json={"name": ""})),
        "the fast path: an unknown key": (401, httpx.post(
            f"{web.url}/v1/chat/completions", headers={"Authorization": "Bearer tpx_nope"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})),
        "the body-size guard": (413, httpx.post(f"{web.url}/v1/api_keys", headers=key_a,
                                                content=too_large)),
        "/metrics through a proxy": (403, httpx.get(f"{web.url}/metrics", headers={
            "X-Forwarded-For": "203.0.113.9"})),
    }
    seen = set()
    for name, (status, response) in answers.items():
        assert response.status_code == status, (name, response.text)
        seen.add(carried_id(response))
    assert len(seen) == len(answers)  # each request its own id
