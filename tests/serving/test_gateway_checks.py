"""Admission on the inference endpoints: who may ask, what, for which model, how often.

These run the real views in-process (Redis for the rate limit, PostgreSQL for keys and adapters);
the test process attaches to no engine (tests/serving/test_gateway.py runs the real one).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from django.test import Client

from tests.conftest import add_member, bearer, key_for
from tests.fixtures.adapter_rows import adapter_row
from tuneplex.adapters.models import Adapter
from tuneplex.audit.models import AuditEvent
from tuneplex.core.scopes import READ, Role

BASE = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "hi"}]


def post(key: str | None, body, path: str = "/v1/chat/completions"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return Client().post(path, data=raw, content_type="application/json", **headers)


def error(response) -> tuple[int, str, str | None]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["param"]


@pytest.fixture
def limits_clock(monkeypatch) -> float:
    """The limiters' clock, fixed in the middle of a one-minute window, so that no window rolls
    over during a test: the views call ``ratelimit.admit`` (and ``hit``, through it) without a
    time, and get this one."""
    from tuneplex.inference import ratelimit

    fixed = time.time() // ratelimit.WINDOW * ratelimit.WINDOW + 30
    real_admit = ratelimit.admit

    async def admit_at_the_fixed_time(limits, *, now: float | None = None):
        return await real_admit(limits, now=fixed if now is None else now)

    monkeypatch.setattr(ratelimit, "admit", admit_at_the_fixed_time)
    return fixed


@pytest.fixture
def adapter_of(default_model):
    def make(tenant, *, deployed: bool) -> Adapter:
        return adapter_row(tenant.organization, default_model, deployed=deployed)
    return make


@pytest.mark.django_db
def test_callers_without_a_valid_infer_key_are_refused(org_a):
    assert error(post(None, {"model": BASE, "messages": CHAT}))[:2] == (401, "unauthenticated")
    assert error(post("tpx_" + "x" * 40, {"model": BASE, "messages": CHAT}))[:2] == (401, "invalid_api_key")
    read_only = key_for(org_a, add_member(org_a, Role.MEMBER), [READ])
    assert error(post(read_only, {"model": BASE, "messages": CHAT}))[:2] == (403, "permission_denied")
    viewer_key = key_for(org_a, add_member(org_a, Role.VIEWER), [READ])
    assert Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {viewer_key}").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("body,expected", [
    (b"{not json", (400, "invalid_json", None)),
    ([1, 2], (400, "invalid_json", None)),
    ({"messages": CHAT}, (400, "missing_model", "model")),
    ({"model": 7, "messages": CHAT}, (400, "invalid_type", "model")),
    ({"model": BASE}, (400, "invalid_messages", "messages")),
    ({"model": BASE, "messages": []}, (400, "invalid_messages", "messages")),
    ({"model": BASE, "messages": [{"content": "no role"}]}, (400, "invalid_messages", "messages[0].role")),
    ({"model": BASE, "messages": [{"role": {}, "content": None}]},
     (400, "invalid_messages", "messages[0].role")),  # found by the fuzzer: a 500
    ({"model": BASE, "messages": CHAT, "stream": "yes"}, (400, "invalid_type", "stream")),
    ({"model": BASE, "messages": CHAT, "max_tokens": 10**6}, (400, "max_tokens_out_of_range", "max_tokens")),
    ({"model": BASE, "messages": CHAT, "max_tokens": 0}, (400, "max_tokens_out_of_range", "max_tokens")),
    ({"model": BASE, "messages": CHAT, "max_tokens": True}, (400, "invalid_type", "max_tokens")),
    ({"model": BASE, "messages": CHAT, "max_completion_tokens": 10**6},
     (400, "max_completion_tokens_out_of_range", "max_completion_tokens")),
    ({"model": BASE, "messages": CHAT, "n": 99}, (400, "n_out_of_range", "n")),
    ({"model": BASE, "messages": CHAT, "kv_transfer_params": {}}, (400, "unknown_parameter",
                                                                   "kv_transfer_params")),
    ({"model": BASE, "messages": CHAT, "cache_salt": "guess"}, (400, "unknown_parameter",
                                                                "cache_salt")),
    ('{"model": "SmolLM2-135M-Instruct", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}",
     (400, "invalid_json", None)),
    ('{"model": "SmolLM2\\udc00", "messages": [{"role": "user", "content": "hi"}]}',
     (400, "invalid_json", None)),
    ('{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "\\ud800"}]}',
     (400, "invalid_json", None)),
])
def test_bad_chat_requests_name_the_field(org_a, body, expected):
    assert error(post(org_a.owner_key, body)) == expected


STREAM = {"model": BASE, "messages": CHAT, "stream": True}


@pytest.mark.django_db
@pytest.mark.parametrize("extra,expected", [
    ({**STREAM, "stream_options": "yes"}, (400, "invalid_type", "stream_options")),
    ({**STREAM, "stream_options": []}, (400, "invalid_type", "stream_options")),
    ({**STREAM, "stream_options": {"include_usage": "yes"}},
     (400, "invalid_type", "stream_options.include_usage")),
    ({**STREAM, "stream_options": {"secret_knob": True}},
     (400, "unknown_parameter", "stream_options.secret_knob")),
    ({"stream_options": {"include_usage": True}}, (400, "invalid_value", "stream_options")),
    ({"temperature": "hot"}, (400, "invalid_type", "temperature")),
    ({"temperature": 7}, (400, "temperature_out_of_range", "temperature")),
    ({"top_p": True}, (400, "invalid_type", "top_p")),
    ({"presence_penalty": [1]}, (400, "invalid_type", "presence_penalty")),
    ({"seed": 1.5}, (400, "invalid_type", "seed")),
    ({"stop": 5}, (400, "invalid_type", "stop")),
    ({"stop": ["a", "b", "c", "d", "e"]}, (400, "too_many_stop_sequences", "stop")),
    ({"logit_bias": [1]}, (400, "invalid_type", "logit_bias")),
    ({"logit_bias": {"x": 1}}, (400, "invalid_value", "logit_bias.x")),
    ({"logit_bias": {"5": 500}}, (400, "invalid_value", "logit_bias.5")),
    ({"logprobs": 3}, (400, "invalid_type", "logprobs")),
    ({"top_logprobs": 3}, (400, "invalid_value", "top_logprobs")),
    ({"user": {"id": 1}}, (400, "invalid_type", "user")),
    ({"response_format": {"type": "yaml"}}, (400, "invalid_type", "response_format")),
    ({"tools": {"a": 1}}, (400, "invalid_type", "tools")),
    ({"tools": [{"type": "function", "function": {}}]}, (400, "invalid_type", "tools[0].function")),
    ({"tool_choice": "sometimes"}, (400, "invalid_type", "tool_choice")),
    # A named choice was a 500 (a dict looked up in a set; found by the fuzzer in CI).
    ({"tool_choice": {"type": "function", "function": {"name": ""}}},
     (400, "invalid_value", "tool_choice.function.name")),
    ({"tools": [{"type": "function", "function": {"name": "add"}}],
      "tool_choice": {"type": "function", "function": {"name": "sub"}}},
     (400, "invalid_value", "tool_choice.function.name")),
    ({"parallel_tool_calls": "no"}, (400, "invalid_type", "parallel_tool_calls")),
    ({"messages": [{"role": "user", "content": 5}]}, (400, "invalid_type", "messages[0].content")),
])
def test_every_optional_field_of_the_wrong_type_is_a_400_naming_it(org_a, extra, expected):
    """Before these checks, a stream_options that was not an object crashed the gateway (500)."""
    assert error(post(org_a.owner_key, {"model": BASE, "messages": CHAT, **extra})) == expected


@pytest.mark.django_db
@pytest.mark.parametrize("extra,expected", [
    ({"logprobs": True}, (400, "invalid_type", "logprobs")),
    ({"logprobs": 9}, (400, "logprobs_out_of_range", "logprobs")),
    ({"echo": "yes"}, (400, "invalid_type", "echo")),
    ({"suffix": 3}, (400, "invalid_type", "suffix")),
])
def test_completion_options_of_the_wrong_type_are_a_400_naming_them(org_a, extra, expected):
    assert error(post(org_a.owner_key, {"model": BASE, "prompt": "hi", **extra},
                      "/v1/completions")) == expected


@pytest.mark.django_db
def test_wrong_methods_on_the_inference_routes_say_which_is_allowed(org_a):
    assert Client().get("/v1/chat/completions")["Allow"] == "POST"
    assert Client().put("/v1/completions")["Allow"] == "POST"
    assert Client().post("/v1/models")["Allow"] == "GET"
    # With CSRF checks on, as for a real client: a key's DELETE (the SDK's models.delete) is the
    # 405 too, not a CSRF refusal.
    deleted = Client(enforce_csrf_checks=True).delete(
        f"/v1/models/{BASE}", HTTP_AUTHORIZATION=f"Bearer {org_a.owner_key}")
    assert (deleted.status_code, deleted["Allow"]) == (405, "GET")
    assert deleted.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_bad_completion_prompts_and_oversized_bodies(org_a, settings):
    assert error(post(org_a.owner_key, {"model": BASE, "prompt": 5}, "/v1/completions")) == (
        400, "invalid_prompt", "prompt")
    assert error(post(org_a.owner_key, {"model": BASE, "prompt": []}, "/v1/completions"))[1] == "invalid_prompt"
    settings.INFERENCE_MAX_BODY = 1000
    big = {"model": BASE, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert error(post(org_a.owner_key, big))[:2] == (413, "request_too_large")
    assert Client().get("/v1/chat/completions").status_code == 405


@pytest.mark.django_db
def test_models_of_other_organizations_are_not_found(org_a, org_b, adapter_of, settings):
    settings.ENGINE_REPLICAS = {BASE: ["http://127.0.0.1:9"]}  # served (nothing listens there)
    theirs = adapter_of(org_b, deployed=True)
    mine_undeployed = adapter_of(org_a, deployed=False)
    assert error(post(org_a.owner_key, {"model": theirs.name, "messages": CHAT})) == (
        404, "model_not_found", "model")
    assert error(post(org_a.owner_key, {"model": "gpt-4o", "messages": CHAT}))[1] == "model_not_found"
    assert error(post(org_a.owner_key, {"model": mine_undeployed.name, "messages": CHAT}))[1] == \
        "model_not_deployed"
    models = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {org_a.owner_key}").json()
    assert [m["id"] for m in models["data"]] == [BASE]
    assert Client().get(f"/v1/models/{theirs.name}",
                        HTTP_AUTHORIZATION=f"Bearer {org_a.owner_key}").status_code == 404


@pytest.mark.django_db
def test_the_rate_limit_is_per_key_and_answers_429_with_retry_after(org_a, settings, limits_clock):
    settings.INFERENCE_RATE_LIMIT = 2
    settings.ENGINE_REPLICAS = {}
    second_key = key_for(org_a, org_a.owner, ["infer"])  # same organization, same member
    body = {"model": BASE, "messages": CHAT}
    # Counted even when refused later (no engine serves the model in the test process).
    for _ in range(2):
        assert error(post(org_a.owner_key, body))[:2] == (404, "model_not_found")
    limited = post(org_a.owner_key, body)
    assert error(limited)[:2] == (429, "rate_limit_exceeded")
    assert limited["Retry-After"] == "31"  # the window's 30 s left, rounded up
    assert limited["x-ratelimit-remaining-requests"] == "0"
    # The other key of the same organization has its own count, in the same window.
    assert error(post(second_key, body))[:2] == (404, "model_not_found")


@pytest.mark.django_db
def test_deploy_without_an_engine_is_a_clear_503_and_changes_nothing(org_a, adapter_of, settings):
    settings.ENGINE_REPLICAS = {}
    adapter = adapter_of(org_a, deployed=False)
    response = bearer(org_a.owner_key).post(f"/v1/adapters/{adapter.id}/deploy", {}, format="json")
    assert error(response)[:2] == (503, "engine_unavailable")
    assert "TUNEPLEX_ENGINE" in response.json()["error"]["message"]
    adapter.refresh_from_db()
    assert not adapter.deployed and not adapter.pinned
    bad = bearer(org_a.owner_key).post(f"/v1/adapters/{adapter.id}/deploy", {"pinned": "maybe"},
                                       format="json")
    assert error(bad)[0] == 400 and error(bad)[2] == "pinned"
    coerced = bearer(org_a.owner_key).post(f"/v1/adapters/{adapter.id}/deploy", {"pinned": 1},
                                           format="json")  # DRF took 1 for true
    assert error(coerced) == (400, "invalid_type", "pinned")
    viewer_key = key_for(org_a, add_member(org_a, Role.VIEWER), [READ])
    assert bearer(viewer_key).post(f"/v1/adapters/{adapter.id}/deploy", {}, format="json").status_code == 403


@pytest.mark.django_db
def test_auto_deploy_is_an_admin_setting_of_the_organization(org_a):
    assert bearer(org_a.owner_key).get("/v1/organization").json()["auto_deploy"] is True
    changed = bearer(org_a.owner_key).patch("/v1/organization", {"auto_deploy": False}, format="json")
    assert changed.status_code == 200 and changed.json()["auto_deploy"] is False
    org_a.organization.refresh_from_db()
    assert org_a.organization.auto_deploy is False
    assert AuditEvent.objects.filter(organization=org_a.organization, action="organization.update",
                                     metadata={"auto_deploy": False}).exists()
    member_key = key_for(org_a, add_member(org_a, Role.MEMBER), [READ, "train"])
    refused = bearer(member_key).patch("/v1/organization", {"auto_deploy": True}, format="json")
    assert refused.status_code == 403
    org_a.organization.refresh_from_db()
    assert org_a.organization.auto_deploy is False


@pytest.mark.django_db
def test_a_huge_prompt_list_is_refused_before_the_engine(org_a, settings):
    """1,000 prompts with n=4 is under vLLM's own cap: the gateway's check refuses it first."""
    settings.INFERENCE_MAX_N = 4
    thousand = {"model": BASE, "prompt": ["Tell me a story."] * 1000, "n": 4}
    assert error(post(org_a.owner_key, thousand, "/v1/completions")) == (
        400, "too_many_prompts", "prompt")
    sixteen_by_four = {"model": BASE, "prompt": ["Hi."] * 16, "n": 4}
    assert error(post(org_a.owner_key, sixteen_by_four, "/v1/completions")) == (
        400, "too_many_sequences", "n")


def test_the_forwarded_body_holds_only_allowlisted_fields_and_the_organizations_salt():
    from tuneplex.inference.gateway import ALLOWED_FIELDS, COMPLETIONS, cache_salt, parse_body

    body = parse_body(json.dumps({"model": BASE, "prompt": "hi", "temperature": 0}).encode(),
                      COMPLETIONS)
    assert set(body) <= ALLOWED_FIELDS[COMPLETIONS]
    assert cache_salt("org-a") == cache_salt("org-a") != cache_salt("org-b")
    assert len(cache_salt("org-a")) == 32


def limits(organization: str, tokens: int, **overrides):
    from tuneplex.inference.ratelimit import Limits

    return Limits(**{"requester": f"key:{organization}", "organization": organization,
                     "requests_per_minute": 0, "tokens": tokens, "tokens_per_minute": 1000,
                     "concurrency": 0, "stale_after": 60, **overrides})


@pytest.mark.django_db
@pytest.mark.parametrize("store", ["redis", "memory"])
def test_token_budgets_reserve_and_settle_per_organization(settings, store):
    """Against the real Redis (several web processes) and in memory (the embedded default): a
    reservation beyond the budget is refused and not kept; settling returns what a request did
    not use; the request limit counts every request."""
    from tuneplex.inference.ratelimit import admit, finish, hit

    if store == "memory":
        settings.REDIS_URL = ""

    import uuid

    subject, other = f"org:budget-{uuid.uuid4().hex}", f"org:other-{uuid.uuid4().hex}"
    now = time.time() // 60 * 60 + 30  # the middle of one window, for the whole test

    async def scenario():
        first = await admit(limits(subject, 600), now=now)
        assert first.refused_by is None and first.tokens.remaining == 400
        refused = await admit(limits(subject, 600), now=now)
        assert refused.refused_by == "tokens" and refused.tokens.remaining == 400
        assert refused.tokens.reset_after == 31
        await finish(first, 120)  # it really cost 120
        await finish(first, 0)  # settled once only
        assert (await admit(limits(subject, 600), now=now)).tokens.remaining == 280
        assert (await admit(limits(other, 900), now=now)).refused_by is None  # per organization
        counted = [await hit(f"key:{subject}", subject, 2, now=now) for _ in range(3)]
        assert [v.allowed for v in counted] == [True, True, False]
        assert counted[1].remaining == 0 and counted[2].reset_after == 31

    asyncio.run(scenario())


@pytest.mark.django_db
def test_a_request_beyond_the_token_budget_is_refused_with_headers(org_a, settings, default_model,
                                                                    limits_clock):
    settings.ENGINE_REPLICAS = {BASE: ["http://127.0.0.1:9"]}  # served (nothing listens there)
    settings.ORG_INFERENCE_TOKENS_PER_MINUTE = 100
    response = post(org_a.owner_key, {"model": BASE, "messages": CHAT, "max_tokens": 200})
    assert error(response)[:2] == (429, "token_budget_exceeded")
    assert response["Retry-After"] == "31"
    assert response["x-ratelimit-limit-tokens"] == "100"


@pytest.mark.django_db
def test_an_organization_at_its_concurrency_cap_does_not_hold_up_another(org_a, org_b, settings,
                                                                         default_model):
    from tuneplex.inference.ratelimit import admit, finish

    settings.ENGINE_REPLICAS = {BASE: ["http://127.0.0.1:9"]}  # served (nothing listens there)
    settings.ORG_INFERENCE_CONCURRENCY = 2
    subject = f"org:{org_a.organization.id}"
    cap = {"concurrency": 2, "tokens_per_minute": 0}
    held = [asyncio.run(admit(limits(subject, 1, **cap))) for _ in range(2)]
    assert [h.refused_by for h in held] == [None, None]
    try:
        assert asyncio.run(admit(limits(subject, 1, **cap))).refused_by == "concurrency"
        busy = post(org_a.owner_key, {"model": BASE, "messages": CHAT, "max_tokens": 4})
        assert error(busy)[:2] == (429, "concurrency_limit_exceeded")
        other = post(org_b.owner_key, {"model": BASE, "messages": CHAT, "max_tokens": 4})
        assert other.status_code != 429  # admitted (no engine runs here: 503 after admission)
        assert error(other)[1] == "engine_unavailable"
    finally:
        for admission in held:
            asyncio.run(finish(admission, 0))
    # A request that ends (here: no engine) gives its slot back.
    probe = asyncio.run(admit(limits(subject, 1, concurrency=1, tokens_per_minute=0)))
    assert probe.refused_by is None
    asyncio.run(finish(probe, 0))


@pytest.mark.parametrize("choice", ["auto", "none", "required",
                                    {"type": "function", "function": {"name": "add"}}])
def test_a_tool_choice_that_names_a_given_tool_passes_the_checks(choice):
    """The positive control of the named tool_choice 400s above."""
    from tuneplex.inference.checks import check_options

    check_options({"model": BASE, "messages": CHAT, "tool_choice": choice,
                   "tools": [{"type": "function", "function": {"name": "add"}}]}, "chat")
