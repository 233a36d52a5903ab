"""Bad input of every kind gets a 4xx in the one error shape; nothing returns 500."""

from __future__ import annotations

import httpx
import pytest
from rest_framework.test import APIClient

from tests.conftest import bearer
from tuneplex.apikeys.models import ApiKey

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "request_id"} and set(body["error"]) == {"code", "message", "param"}
    assert body["request_id"] == response["X-Request-Id"]  # the id of the request's log lines
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("header", [
    "Bearer", "Bearer ", "bearer a b", "Basic dXNlcjpwdw==", "Token abc", "tpx_only",
    "Bearer tpx_" + "x" * 5000, "Bearer tpx_ünïcødé", "Bearer \u200btpx_abc", "Bearer tpx_a\tb",
])
def test_malformed_authorization_headers_get_401(org_a, header):
    client = APIClient()
    response = client.get("/v1/organization", HTTP_AUTHORIZATION=header)
    assert_error(response, 401, "invalid_api_key")


def test_no_credentials_get_401_with_a_challenge():
    response = APIClient().get("/v1/api_keys")
    assert_error(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("name,param", [
    ("x" * 201, "name"), ("", "name"), ("   ", "name"), ("nul\x00byte", "name"),
    ("bidi\u202eevil", "name"), ("zero\u200bwidth", "name"), (12345, "name"), (None, "name"),
    (["a"], "name"),
])
def test_bad_names_are_refused_with_the_param(org_a, name, param):
    before = ApiKey.objects.count()
    response = bearer(org_a.owner_key).post("/v1/api_keys", {"name": name}, format="json")
    assert_error(response, 400, param=param)
    assert ApiKey.objects.count() == before


@pytest.mark.parametrize("name", ["日本語のキー", "émoji 🚀 key", "a" * 200, "Ωmega — “quoted”"])
def test_unicode_names_within_limits_are_kept_exactly(org_a, name):
    response = bearer(org_a.owner_key).post("/v1/api_keys", {"name": name}, format="json")
    assert response.status_code == 201
    assert response.json()["name"] == name


def test_unknown_scopes_point_at_the_list_item(org_a):
    response = bearer(org_a.owner_key).post("/v1/api_keys", {"name": "x", "scopes": ["read", "root"]},
                                            format="json")
    assert_error(response, 400, param="scopes[1]")


@pytest.mark.parametrize("content_type,body,status,code", [
    ("text/plain", "name=x", 415, "unsupported_media_type"),
    ("application/x-www-form-urlencoded", "name=x", 415, "unsupported_media_type"),
    ("application/xml", "<name>x</name>", 415, "unsupported_media_type"),
    ("application/json", "{not json", 400, "invalid_json"),
    ("application/json", "[1, 2]", 400, None),
    ("application/json", '"just a string"', 400, None),
    ("application/json", b"\xff\xfe\x00garbage", 400, "invalid_json"),
])
def test_wrong_content_types_and_bodies_get_4xx(org_a, content_type, body, status, code):
    client = bearer(org_a.owner_key)
    response = client.generic("POST", "/v1/api_keys", body, content_type=content_type)
    assert_error(response, status, code)


@pytest.mark.parametrize("method,path", [
    ("get", "/v1/nope"), ("post", "/v1/fine_tuning/nothing"), ("get", "/v1"),
    ("post", "/v1/api_keys/key-doesnotexist/revoke"), ("get", "/v1/api_keys/key-doesnotexist"),
    ("get", "/v1/api_keys/key%2F..%2Fx"),
    ("get", "/v1/organization/members/" + "m" * 300),
])
def test_unknown_routes_and_ids_get_404(org_a, method, path):
    assert_error(getattr(bearer(org_a.owner_key), method)(path), 404)


@pytest.mark.parametrize("url", ["/v1/api_keys/%00", "/v1/api_keys?after=%00", "/login/%00"])
def test_nul_in_the_url_gets_400(org_a, url):
    assert_error(bearer(org_a.owner_key).get(url), 400, "bad_request")


def test_a_method_a_route_does_not_have_gets_405(org_a):
    assert_error(bearer(org_a.owner_key).delete("/v1/api_keys/key-doesnotexist"), 405,
                 "method_not_allowed")


def test_wrong_method_gets_405(org_a):
    assert_error(bearer(org_a.owner_key).put("/v1/api_keys", {}, format="json"), 405,
                 "method_not_allowed")


def test_an_oversized_body_gets_413(org_a, settings):
    big = '{"name": "' + "a" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + '"}'
    response = bearer(org_a.owner_key).generic("POST", "/v1/api_keys", big,
                                               content_type="application/json")
    assert_error(response, 413, "request_too_large")


def test_bad_pagination_params_name_the_param(org_a):
    client = bearer(org_a.owner_key)
    assert_error(client.get("/v1/api_keys?limit=0"), 400, param="limit")
    assert_error(client.get("/v1/api_keys?limit=abc"), 400, param="limit")
    assert_error(client.get("/v1/api_keys?after=key-nope"), 400, "invalid_cursor", "after")


def test_list_pages_follow_the_after_cursor(org_a):
    client = bearer(org_a.owner_key)
    for index in range(4):
        client.post("/v1/api_keys", {"name": f"k{index}"}, format="json")
    first = client.get("/v1/api_keys?limit=2").json()
    assert first["has_more"] is True and len(first["data"]) == 2
    second = client.get(f"/v1/api_keys?limit=10&after={first['last_id']}").json()
    seen = [k["id"] for k in first["data"] + second["data"]]
    assert len(seen) == len(set(seen)) == 5 and second["has_more"] is False


def test_session_writes_without_csrf_are_refused(org_a):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(org_a.owner)
    assert client.get("/v1/api_keys").status_code == 200
    response = client.post("/v1/api_keys", {"name": "x"}, format="json")
    assert_error(response, 403)


@pytest.mark.parametrize("body,fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"name": "\\ud800 alone", "scopes": ["read"]}', "cannot be encoded as UTF-8"),
])
def test_hostile_json_bodies_get_400_and_store_nothing(org_a, body, fragment):
    from tuneplex.apikeys.models import ApiKey

    before = ApiKey.objects.count()
    response = bearer(org_a.owner_key).generic("POST", "/v1/api_keys", body,
                                               content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert fragment in response.json()["error"]["message"]
    assert ApiKey.objects.count() == before


def test_a_paired_surrogate_escape_is_ordinary_text(org_a):
    response = bearer(org_a.owner_key).generic(
        "POST", "/v1/api_keys", '{"name": "smile \\ud83d\\ude00", "scopes": ["read"]}',
        content_type="application/json")
    assert response.status_code == 201 and response.json()["name"] == "smile \U0001F600"


@pytest.mark.parametrize("path", ["/static/../../etc/passwd", "/static/..%2f..%2fsettings.py",
                                  "/static/frontend/../../../x", "/static/no-such-file.css"])
def test_paths_outside_the_static_folders_are_404_not_500(path):
    import asyncio

    from tuneplex.asgi import application

    async def get(url: str):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(url)

    assert asyncio.run(get(path)).status_code == 404
    assert asyncio.run(get("/static/frontend/app.css")).status_code == 200  # served at all


def test_a_websocket_handshake_is_refused_not_a_500():
    """The openai SDK's realtime.connect opens a WebSocket on /v1/realtime: Django's handler
    takes HTTP only and raised (a 500); the handshake is refused instead."""
    import asyncio

    from tuneplex.asgi import application

    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "raw_path": b"/v1/realtime",
             "query_string": b"model=x", "headers": [(b"host", b"127.0.0.1")],
             "scheme": "ws", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "subprotocols": [], "asgi": {"version": "3.0"}}
    asyncio.run(application(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_an_internal_error_shows_a_request_id_and_no_internals(org_a, monkeypatch):
    from tuneplex.tenancy import apis

    def broken(self, request):
        raise RuntimeError("connection to db-7.internal:5432 failed, see /srv/tuneplex/x.py")

    monkeypatch.setattr(apis.OrganizationApi, "get", broken)
    client = APIClient()
    client.raise_request_exception = False  # answer like production: the 500 page, not a raise
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {org_a.owner_key}")
    response = client.get("/v1/organization", HTTP_X_REQUEST_ID="proxy-id-12345678")
    assert_error(response, 500, "server_error")
    message = response.json()["error"]["message"]
    assert "proxy-id-12345678" in message and response["X-Request-Id"] == "proxy-id-12345678"
    assert response.json()["request_id"] == "proxy-id-12345678"
    assert "db-7" not in message and "/srv" not in message and "RuntimeError" not in message
    ordinary = bearer(org_a.owner_key).get("/v1/base_models", HTTP_X_REQUEST_ID="bad id!")
    assert len(ordinary["X-Request-Id"]) == 32  # an unusable offered id is replaced


def test_client_messages_lose_paths_and_addresses():
    from tuneplex.core.redact import client_message

    text = ("FileNotFoundError: [Errno 2] No such file: '/var/lib/tuneplex/work/x/config.json' "
            "from 10.0.3.7:8100\nTraceback (most recent call last):\n  File \"/srv/a.py\"")
    assert client_message(text) == ("FileNotFoundError: [Errno 2] No such file: '<path>' from "
                                    "<address>")


def test_an_organization_over_its_api_rate_is_throttled_alone(org_a, org_b, settings):
    settings.ORG_API_RATE_LIMIT = 3  # the organizations are new: their counters start at 0
    client_a = bearer(org_a.owner_key)
    assert [client_a.get("/v1/files").status_code for _ in range(3)] == [200] * 3
    refused = client_a.get("/v1/files")
    assert_error(refused, 429, "rate_limit_exceeded")
    assert int(refused["Retry-After"]) > 0
    assert bearer(org_b.owner_key).get("/v1/files").status_code == 200  # B is not A


def test_the_dashboards_error_page_shows_the_request_id(rf):
    from tuneplex.core.errors import handler500
    from tuneplex.core.request_id import current

    token = current.set("page-id-12345678")
    try:
        page = handler500(rf.get("/jobs/"))
    finally:
        current.reset(token)
    assert page.status_code == 500 and b"<code>page-id-12345678</code>" in page.content
