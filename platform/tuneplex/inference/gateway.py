"""Per-tenant OpenAI-compatible inference: /v1/chat/completions, /v1/completions, /v1/responses,
/v1/models.

:func:`complete` admits a request (API key or signed-in session with the infer scope, rate
limit, size and max_tokens caps, a model the caller's organization may use), leases a replica
that has the adapter loaded from the pool, and passes the engine's answer through, streaming or
not; token usage is counted per organization and model when the answer ends. It is called by
the ASGI fast path (tuneplex/inference/asgi.py) for key-authenticated requests and by the async
Django views below for everything else. A Responses request (tuneplex.inference.responses) is
the chat completion it translates to all the way through, and only its answer is put in the
Responses API's shape. Tenants never see the engine's address, and its admin endpoints are not
reachable through here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf
from rest_framework.parsers import JSONParser
from rest_framework.request import Request

from jobs.training.jsonl import loads_strict
from serving.client import PoolClient, Route
from serving.engine import auth_headers
from serving.pool import AdapterLoadError, NoReplicaAvailable
from tuneplex.adapters.models import Adapter
from tuneplex.apikeys.authentication import ApiKeyAuthentication
from tuneplex.basemodels.selectors import served_base_models
from tuneplex.core.actors import Principal
from tuneplex.core.apis import timestamp
from tuneplex.core import metrics
from tuneplex.core.errors import ApiError, error_body
from tuneplex.core.scopes import INFER, READ
from tuneplex.inference import cache, checks, ratelimit, responses, streams, usage
from tuneplex.inference.pools import EngineUnavailable, pool_for
from tuneplex.inference.selectors import ModelNotFound, servable_model
from tuneplex.tenancy.authentication import OrganizationSessionAuthentication

log = logging.getLogger(__name__)

CHAT, COMPLETIONS, RESPONSES = streams.CHAT, streams.COMPLETIONS, responses.RESPONSES
MESSAGE_ROLES = {"system", "developer", "user", "assistant", "tool"}
# The OpenAI fields a request may carry; anything else (engine-specific knobs, a cache salt of
# the caller's own) is refused with unknown_parameter, so the engine sees only what we document.
_SAMPLING = {"model", "max_tokens", "n", "temperature", "top_p", "stop", "seed", "stream",
             "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
             "user"}
ALLOWED_FIELDS = {
    CHAT: _SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                       "tools", "tool_choice", "parallel_tool_calls"},
    COMPLETIONS: _SAMPLING | {"prompt", "echo", "suffix"},
}


@functools.lru_cache(maxsize=4096)
def cache_salt(organization_id: str) -> str:
    """The organization's prefix-cache salt: requests of one organization never reuse another's
    cached prefixes (whose timing would tell that the same text was sent by someone else)."""
    return hmac.new(settings.SECRET_KEY.encode(), f"cache-salt:{organization_id}".encode(),
                    hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Target:
    """Where an admitted request goes: the engine's model name and, for an adapter, its id."""

    principal: Principal
    model: str
    base_model: str
    adapter_id: str | None


@dataclass
class Reply:
    """An answer, independent of how it is sent (Django's response or the ASGI fast path)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    kind: str = "none"  # the model kind for metrics: base, adapter, none (refused before)

    def as_django(self) -> HttpResponse:
        if self.stream is not None:
            response = _StreamResponse(self.stream, status=self.status)
        else:
            response = HttpResponse(self.body, status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


class _StreamResponse(StreamingHttpResponse):
    """A relayed stream for Django's handler (browser sessions). Django closes a response also
    when its client went away mid-stream, but only through ``close()``, on a worker thread, and
    never closes the iterator it was streaming: so ``close()`` hands the relay's own ``aclose``
    (lease, concurrency slot, settlement) back to the event loop."""

    def __init__(self, relay, **kwargs) -> None:
        super().__init__(relay, **kwargs)
        self._relay, self._loop = relay, asyncio.get_running_loop()

    def close(self) -> None:
        super().close()
        relay, self._relay = self._relay, None
        if relay is not None and hasattr(relay, "aclose"):
            self._loop.call_soon_threadsafe(_in_background, relay.aclose)


_background: set[asyncio.Task] = set()  # tasks that must run to their end (asyncio keeps weak refs)


def _in_background(work) -> None:
    task = asyncio.get_running_loop().create_task(work())
    _background.add(task)
    task.add_done_callback(_background.discard)


JSON = "application/json"


def _error(exc: ApiError, headers: dict | None = None) -> Reply:
    body = json.dumps(error_body(exc.code, exc.message, exc.param)).encode()
    return Reply(exc.status, {"Content-Type": JSON, **(headers or {})}, body)


# --- admission -------------------------------------------------------------------------------------

def _fingerprint(authorization: str) -> str:
    return hashlib.sha256(authorization.encode(errors="replace")).hexdigest()


def _authenticate(authorization: str | None, request=None) -> Principal:
    """An API key (``Authorization: Bearer``) or a signed-in browser session (with CSRF on POST;
    ``request`` is Django's, absent on the ASGI fast path, which only takes keys)."""
    try:
        if authorization is not None:
            fingerprint = _fingerprint(authorization)
            principal = cache.principals.get(fingerprint)
            if principal is None:
                principal = ApiKeyAuthentication().authenticate(
                    SimpleNamespace(META={"HTTP_AUTHORIZATION": authorization}))[1]
                cache.principals.put(fingerprint, principal)
            return principal
        session = None if request is None else \
            OrganizationSessionAuthentication().authenticate(Request(request, parsers=[JSONParser()]))
    except drf.AuthenticationFailed as exc:
        raise ApiError(str(exc.detail), code="invalid_api_key", status=401) from None
    except drf.PermissionDenied as exc:
        raise ApiError(str(exc.detail), code="permission_denied", status=403) from None
    except drf.APIException as exc:  # e.g. a body the CSRF check cannot read
        raise ApiError(str(exc.detail), code=exc.default_code, status=exc.status_code) from None
    if session is None:
        raise ApiError("Authentication required: send 'Authorization: Bearer <api key>' or sign in.",
                       code="unauthenticated", status=401)
    return session[1]


def _require(principal: Principal, *scopes: str) -> None:
    if not any(principal.has_scope(s) for s in scopes):
        who = "This API key" if principal.api_key is not None else "Your role"
        raise ApiError(f"{who} lacks the '{scopes[0]}' scope needed for this request.",
                       code="permission_denied", status=403)


def _resolve(principal: Principal, model: str) -> Target:
    """The organization's deployed adapter, or a served base model, named ``model``; else 404."""
    target = _cached_target(principal, model)
    if target is None:
        target = _lookup(principal, model)
        cache.targets.put((principal.organization.id, model), target)
    return target


def _cached_target(principal: Principal, model: str) -> Target | None:
    target = cache.targets.get((principal.organization.id, model))
    if target is None or target.principal is principal:
        return target
    return dataclasses.replace(target, principal=principal)


def _lookup(principal: Principal, model: str) -> Target:
    # An adapter is staged and validated on the replica's own node by its pool agent, not here.
    found = servable_model(organization=principal.organization, model=model)
    return Target(principal, found.model, found.base_model, found.adapter_id)


class RateLimited(ApiError):
    status = 429

    def __init__(self, verdict: ratelimit.Verdict) -> None:
        super().__init__(f"Rate limit of {verdict.limit} requests per minute reached for this API "
                         f"key; retry in {verdict.reset_after}s.", code="rate_limit_exceeded")
        self.headers = {**_limit_headers(verdict), "Retry-After": str(verdict.reset_after)}


class TokenBudgetExceeded(ApiError):
    status = 429

    def __init__(self, verdict: ratelimit.TokenVerdict, asked: int) -> None:
        super().__init__(f"This request may cost {asked} tokens; the organization has "
                         f"{verdict.remaining} of its {verdict.limit} tokens a minute left "
                         f"(TUNEPLEX_ORG_INFERENCE_TOKENS_PER_MINUTE); retry in "
                         f"{verdict.reset_after}s or ask for fewer max_tokens.",
                         code="token_budget_exceeded")
        self.headers = {**_token_headers(verdict), "Retry-After": str(verdict.reset_after)}


class ConcurrencyLimited(ApiError):
    status = 429

    def __init__(self) -> None:
        super().__init__(f"The organization already has {settings.ORG_INFERENCE_CONCURRENCY} "
                         "requests in flight (TUNEPLEX_ORG_INFERENCE_CONCURRENCY); retry when one "
                         "ends.", code="concurrency_limit_exceeded")
        self.headers = {"Retry-After": "1"}


def _limits(principal: Principal, body: dict, raw: bytes, requester: str) -> ratelimit.Limits:
    """What the request may cost (its prompt, about 4 bytes a token, plus max_tokens x n x
    prompts) and the limits of its requester (a key, a user, an eval run) and organization."""
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    most = body.get("max_completion_tokens") or body.get("max_tokens") or settings.INFERENCE_MAX_TOKENS
    return ratelimit.Limits(
        requester=requester, organization=f"org:{principal.organization.id}",
        requests_per_minute=settings.INFERENCE_RATE_LIMIT,
        tokens=len(raw) // 4 + most * (body.get("n") or 1) * prompts,
        tokens_per_minute=settings.ORG_INFERENCE_TOKENS_PER_MINUTE,
        concurrency=settings.ORG_INFERENCE_CONCURRENCY, stale_after=settings.ENGINE_TIMEOUT + 60)


def _refusal(admission: ratelimit.Admission) -> ApiError:
    if admission.refused_by == "requests":
        return RateLimited(admission.requests)
    if admission.refused_by == "tokens":
        return TokenBudgetExceeded(admission.tokens, admission.limits.tokens)
    return ConcurrencyLimited()


class TooManyFailedAuthentications(ApiError):
    status = 429

    def __init__(self, verdict: ratelimit.Verdict) -> None:
        super().__init__(f"Too many failed authentications from this address ({verdict.limit} a "
                         f"minute, TUNEPLEX_INFERENCE_AUTH_FAILURES_PER_MINUTE); retry in "
                         f"{verdict.reset_after}s with a valid API key.",
                         code="too_many_failed_authentications")
        self.headers = {"Retry-After": str(verdict.reset_after)}


class LimitsUnavailable(ApiError):
    status = 503

    def __init__(self) -> None:
        super().__init__("The service that keeps rate limits and budgets cannot be reached; "
                         "retry in a moment.", code="limits_unavailable")
        self.headers = {"Retry-After": "1"}


def _principal(authorization: str | None) -> Principal | None:
    """The caller from the admission cache, when it knows the key (no database)."""
    if authorization is None:
        return None
    return cache.principals.get(_fingerprint(authorization))


def _who_blocking(authorization: str | None, request) -> Principal:
    if request is None:
        close_old_connections()  # what Django does when its requests start (the fast path skips it)
    return _authenticate(authorization, request)


def _what_blocking(principal: Principal, model: str, request) -> Target:
    """The model's target, and the serving pool asked for its state if this process has not yet."""
    if request is None:
        close_old_connections()  # also here: the caller may have come from the cache
    target = _resolve(principal, model)
    pool_for(target.base_model).ensure_fresh()
    return target


def _candidate_blocking(principal: Principal, model: str, request) -> Target:
    """A candidate adapter, deployed or not (never cached: the admission cache holds only what
    every request may use)."""
    close_old_connections()
    found = servable_model(organization=principal.organization, model=model, undeployed_ok=True)
    pool_for(found.base_model).ensure_fresh()
    return Target(principal, found.model, found.base_model, found.adapter_id)


_lookup_pools: dict[tuple[int, str], ThreadPoolExecutor] = {}  # per process (a fork gets its own)


def _lookup_pool(kind: str) -> ThreadPoolExecutor:
    import os

    pool = _lookup_pools.get((os.getpid(), kind))
    if pool is None:
        pool = _lookup_pools[(os.getpid(), kind)] = ThreadPoolExecutor(
            settings.INFERENCE_LOOKUP_THREADS, thread_name_prefix=f"gateway-{kind}")
    return pool


async def _blocking(function, *args, request, known: bool = True):
    """A database look-up of the admission. The fast path's run on bounded pools of their own:
    keys this process has seen valid (and their models) on one, keys it has never seen on
    another, so that a flood of unknown keys queues behind itself, neither on the one thread that
    Django's views share nor ahead of the tenants already known. Django's views' run where
    Django runs them."""
    if request is not None:
        return await sync_to_async(function)(*args, request)
    return await asyncio.get_running_loop().run_in_executor(
        _lookup_pool("known" if known else "unknown"), functools.partial(function, *args, request))


async def _who(authorization: str | None, request, address: str | None) -> Principal:
    """The caller. A key this process knows costs nothing; an unknown one is looked up (at most
    TUNEPLEX_INFERENCE_AUTH_FAILURES_PER_MINUTE failures a minute per client address, else 429),
    and a refused one is remembered for a few seconds, so that repeating it asks nobody."""
    principal = _principal(authorization)
    if principal is not None:
        return principal
    limit = settings.INFERENCE_AUTH_FAILURES_PER_MINUTE if authorization is not None and address else 0
    if limit:
        verdict = await ratelimit.failed_authentications(address, limit, count=False)
        if not verdict.allowed:
            raise TooManyFailedAuthentications(verdict)
    refused = cache.refusals.get(_fingerprint(authorization)) if authorization is not None else None
    try:
        if refused is not None:
            raise ApiError(refused, code="invalid_api_key", status=401)
        known = authorization is not None and cache.principals.known(_fingerprint(authorization))
        return await _blocking(_who_blocking, authorization, request=request, known=known)
    except ApiError as exc:
        if exc.status == 401 and authorization is not None:
            cache.refusals.put(_fingerprint(authorization), exc.message)
            if limit:
                await ratelimit.failed_authentications(address, limit, count=True)
        raise


async def _admit(authorization: str | None, raw: bytes, endpoint: str, request=None,
                 address: str | None = None, inside: Inside | None = None,
                 ) -> tuple[Target, dict, dict, ratelimit.Admission]:
    """Who asks (401/403, 429 for an address that keeps failing), what (400/413), for which
    model (404), and whether its key's request limit, its organization's token budget and
    concurrency cap let it through (429; every authenticated request counts against the request
    limit). With the key and the model in the admission cache this is one round trip to Redis
    and no thread; the database is asked, on a bounded pool, only when they are not. A request
    from ``inside`` the platform (an eval run) comes with its principal instead of a key."""
    principal = inside.principal if inside is not None else await _who(authorization, request, address)
    requester = inside.requester if inside is not None else requester_of(principal)
    _require(principal, INFER)
    try:
        body = parse_body(raw, endpoint)
        body["cache_salt"] = cache_salt(principal.organization.id)
        if inside is not None and body["model"] in inside.undeployed:
            target = await _blocking(_candidate_blocking, principal, body["model"], request=request)
        else:
            target = _cached_target(principal, body["model"])
        if target is None or not pool_for(target.base_model).refreshed.is_set():
            target = await _blocking(_what_blocking, principal, body["model"], request=request)
    except ApiError:
        verdict = await ratelimit.hit(requester, f"org:{principal.organization.id}",
                                      settings.INFERENCE_RATE_LIMIT)
        if not verdict.allowed:
            raise RateLimited(verdict) from None
        raise
    admission = await ratelimit.admit(_limits(principal, body, raw, requester))
    if admission.refused_by is not None:
        raise _refusal(admission)
    headers = {**_limit_headers(admission.requests), **_token_headers(admission.tokens)}
    return target, body, headers, admission


# --- request checks (pure) ------------------------------------------------------------------------

def _int_field(body: dict, name: str, *, low: int, high: int, hint: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"{name} must be an integer.", code="invalid_type", param=name)
    if not low <= value <= high:
        raise ApiError(f"{name} must be between {low} and {high} ({hint}).",
                       code=f"{name}_out_of_range", param=name)


def parse_body(raw: bytes, endpoint: str) -> dict:
    """The request body as the engine will get it, or an ApiError naming the field at fault."""
    if len(raw) > settings.INFERENCE_MAX_BODY:
        raise ApiError(f"The request body is {len(raw)} bytes; the limit is "
                       f"{settings.INFERENCE_MAX_BODY} (TUNEPLEX_INFERENCE_MAX_BODY).",
                       code="request_too_large", status=413)
    try:
        body = loads_strict(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError("The body is not valid UTF-8.", code="invalid_json") from None
    except ValueError as exc:  # not JSON, too deeply nested, or text UTF-8 cannot hold
        raise ApiError(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("The body must be a JSON object.", code="invalid_json")
    if endpoint == RESPONSES:  # translated into the chat completion the engine gets
        return responses.chat_body(body, max_tokens=settings.INFERENCE_MAX_TOKENS)
    unknown = sorted(set(body) - ALLOWED_FIELDS[endpoint])
    if unknown:
        raise ApiError(f"Unrecognized request argument: {unknown[0]}. The fields accepted are "
                       f"OpenAI's: {', '.join(sorted(ALLOWED_FIELDS[endpoint]))}.",
                       code="unknown_parameter", param=unknown[0])
    checks.check_model(body)
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list.", code="invalid_messages", param="messages")
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if not isinstance(role, str) or role not in MESSAGE_ROLES:
                raise ApiError(f"messages[{index}] needs a role, one of {sorted(MESSAGE_ROLES)}.",
                               code="invalid_messages", param=f"messages[{index}].role")
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                            and all(isinstance(p, str) for p in prompt))):
            raise ApiError("prompt must be a string or a non-empty list of strings.",
                           code="invalid_prompt", param="prompt")
    checks.check_options(body, endpoint)
    cap = settings.INFERENCE_MAX_TOKENS
    for name in ("max_tokens", "max_completion_tokens"):
        _int_field(body, name, low=1, high=cap, hint="TUNEPLEX_INFERENCE_MAX_TOKENS")
    _int_field(body, "n", low=1, high=settings.INFERENCE_MAX_N, hint="TUNEPLEX_INFERENCE_MAX_N")
    if endpoint == COMPLETIONS and isinstance(body["prompt"], list):
        prompts = len(body["prompt"])
        if prompts > settings.INFERENCE_MAX_PROMPTS:
            raise ApiError(f"At most {settings.INFERENCE_MAX_PROMPTS} prompts in one request "
                           f"(TUNEPLEX_INFERENCE_MAX_PROMPTS); this one has {prompts}.",
                           code="too_many_prompts", param="prompt")
        sequences = prompts * (body.get("n") or 1)
        if sequences > settings.INFERENCE_MAX_SEQUENCES:
            raise ApiError(f"prompts x n is {sequences}; at most {settings.INFERENCE_MAX_SEQUENCES} "
                           "sequences in one request (TUNEPLEX_INFERENCE_MAX_SEQUENCES).",
                           code="too_many_sequences", param="n")
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = cap
    return body


# --- proxying --------------------------------------------------------------------------------------

_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> session
# What a replica that failed looks like from here: refused, reset, broken off, timed out.
ENGINE_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


def _client() -> aiohttp.ClientSession:
    """The connections to the replicas, kept alive, one session per event loop. aiohttp rather
    than httpx on this hop: a third of httpx's cost per request, which is most of what the
    gateway adds to a short completion."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=settings.ENGINE_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
            headers=auth_headers(settings.ENGINE_API_KEY))
    return client


async def _route(pool: PoolClient, target: Target) -> Route:
    """A replica for the request. A leased adapter costs no I/O; otherwise lease it off the loop."""
    try:
        if target.adapter_id is None:
            return pool.any_replica()
        route = pool.acquire_nowait(target.model)
        if route is None:
            route = await sync_to_async(pool.acquire, thread_sensitive=False)(
                target.model, target.adapter_id)
        return route
    except AdapterLoadError as exc:
        log.error("adapter %s could not be loaded: %s", target.model, exc)
        raise ApiError("The adapter could not be loaded by the serving pool; try again later or "
                       "deploy it again.", code="adapter_unavailable", status=503) from None
    except NoReplicaAvailable as exc:
        raise EngineUnavailable(f"No engine replica can take the request now: {exc}") from None


async def _send(pool: PoolClient, target: Target, endpoint: str, body: dict
                ) -> tuple[aiohttp.ClientResponse, Route]:
    """Send to a replica. A replica that does not answer is marked down and the request goes to
    another (nothing was generated yet); one that no longer knows the adapter (it restarted) gets
    it again through a new lease. At most three tries."""
    for attempt in (1, 2, 3):
        route = await _route(pool, target)
        try:
            response = await _client().post(f"{route.engine_url}/v1/{endpoint}", json=body)
        except ENGINE_FAILURES as exc:
            pool.release(route)
            pool.mark_down(route.replica, f"its engine did not answer ({type(exc).__name__})")
            continue
        except BaseException:  # cancelled (the client went away): hand the lease back
            pool.release(route)
            raise
        if response.status == 404 and target.adapter_id is not None and attempt < 3:
            response.release()
            pool.release(route)
            pool.forget(route)
            continue
        return response, route
    raise EngineUnavailable("No engine replica answered the request.")


async def _engine_error(response: aiohttp.ClientResponse) -> Reply:
    try:
        raw = await response.read()
    except ENGINE_FAILURES:
        raw = b""
    finally:
        response.release()
    try:
        payload = json.loads(raw)
        message = (payload.get("error") or {}).get("message") or payload.get("message") or str(payload)
    except (ValueError, AttributeError):
        message = raw[:500].decode(errors="replace")
    if response.status >= 500:
        log.error("engine answered %s: %s", response.status, message)
        return _error(ApiError("The engine failed on this request.", code="engine_error", status=502))
    return _error(ApiError(message, code="invalid_request", status=response.status))


def _usage_of(payload: dict) -> tuple[int, int]:
    usage = payload.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _record(target: Target, prompt: int, completion: int) -> None:
    usage.count(organization_id=target.principal.organization.id, model=target.model,
                adapter_id=target.adapter_id, prompt_tokens=prompt, completion_tokens=completion)
    kind = _kind(target)
    _series(metrics.GATEWAY_TOKENS, kind, "prompt").inc(prompt)
    _series(metrics.GATEWAY_TOKENS, kind, "completion").inc(completion)


@functools.lru_cache(maxsize=256)
def _series(metric, *labels: str):
    """One labelled series of a metric, looked up once per process (a few dozen exist)."""
    return metric.labels(*labels)


def _kind(target: Target | None) -> str:
    return "none" if target is None else "base" if target.adapter_id is None else "adapter"


def _observe(endpoint: str, reply: Reply, started: float, *, stream: bool) -> None:
    """Count an answered request (a stream's when its last event is sent)."""
    _series(metrics.GATEWAY_REQUESTS, endpoint, reply.kind, str(reply.status)).inc()
    _series(metrics.GATEWAY_LATENCY, endpoint, reply.kind, "true" if stream else "false").observe(
        time.perf_counter() - started)


@dataclass(frozen=True)
class Inside:
    """A request made by the platform itself on an organization's behalf (an eval run's sample
    or judge): admitted, limited, routed and settled as the organization's own requests are,
    under its own requester name (its request limit), with no key."""

    principal: Principal
    requester: str
    priority: int = 0  # vLLM's request priority (lower first) where the engine schedules by it
    undeployed: frozenset[str] = frozenset()  # candidate adapters it may use before their deploy


async def complete_inside(inside: Inside, endpoint: str, body: dict) -> Reply:
    """One plain (not streamed) completion for ``inside``; the reply's body is OpenAI's JSON."""
    if body.get("stream"):
        raise ValueError("complete_inside answers plain requests only")
    return await complete(endpoint, authorization=None, raw=json.dumps(body).encode(),
                          inside=inside)


async def finish_inside(timeout: float = 10) -> None:
    """Before an event loop made for requests from inside ends: its settlements still being
    retried are written, and its connections (engines, Redis) closed."""
    await ratelimit.drain(timeout)
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.close()
    await ratelimit.close_loop_client()
    await asyncio.to_thread(usage.flush)


async def complete(endpoint: str, *, authorization: str | None, raw: bytes, request=None,
                   address: str | None = None, inside: Inside | None = None) -> Reply:
    """Admit, route, forward and answer one completion request.

    Cancelling it (the ASGI fast path does when the client goes away) closes the connection to
    the engine, which aborts the request there. Counted in the gateway's metrics when answered.
    """
    started = time.perf_counter()
    try:
        try:
            reply = await _answer(endpoint, authorization, raw, request, address, started, inside)
        except ratelimit.LimitsUnavailable:
            reply = _error(LimitsUnavailable(), LimitsUnavailable().headers)
    except Exception:  # answered 500 by the caller (the fast path or Django's handler)
        _series(metrics.GATEWAY_REQUESTS, endpoint, "none", "500").inc()
        raise
    if reply.stream is None:
        _observe(endpoint, reply, started, stream=False)
    return reply


async def _answer(endpoint: str, authorization: str | None, raw: bytes, request,
                  address: str | None, started: float, inside: Inside | None = None) -> Reply:
    reservation: ratelimit.Admission | None = None
    target: Target | None = None
    engine = CHAT if endpoint == RESPONSES else endpoint  # what the engine is asked
    try:
        target, body, limit_headers, reservation = await _admit(authorization, raw, endpoint, request,
                                                                address, inside)
        if inside is None:  # a tenant's own request: eval runs make room for it
            await ratelimit.interactive_begin(reservation, target.base_model)
        elif inside.priority and settings.ENGINE_PRIORITY_SCHEDULING:
            body["priority"] = inside.priority
        pool = pool_for(target.base_model)
        asked = body.get("stream_options") or {}
        stream = bool(body.get("stream"))
        # The engine always streams, with usage on every chunk: an answer that ends early is
        # settled with what was generated until then (see tuneplex.inference.streams).
        body["stream"], body["stream_options"] = True, streams.engine_stream_options(body)
        if not stream:  # nobody reads its chunks as they come: fewer, larger ones cost the engine less
            body["stream_interval"] = streams.PLAIN_REPORT_TOKENS
        response, route = await _send(pool, target, engine, body)
    except ApiError as exc:
        await _finish(reservation, 0)
        if exc.status == 429:
            _series(metrics.GATEWAY_REJECTED, exc.code).inc()
        reply = _error(exc, getattr(exc, "headers", None))
        reply.kind = _kind(target)
        return reply
    except BaseException:  # cancelled (the client went away) before the engine answered
        await _finish(reservation, 0)
        raise
    kind = _kind(target)
    if response.status != 200:  # refused by the engine: nothing was generated
        pool.release(route)
        await _finish(reservation, 0)
        reply = await _engine_error(response)
        reply.kind = kind
        return reply
    meter = streams.Meter(engine, body)
    settle = functools.partial(_settle, target, reservation, meter, route, engine, body)
    if stream:
        observe = functools.partial(_observe, endpoint, started=started, stream=True)
        if endpoint == RESPONSES:
            relay = _ResponsesRelay(response, pool, route, meter, settle, kind=kind,
                                    events=responses.Events(body.request), observe=observe)
        else:
            relay = _Relay(response, pool, route, meter, settle, kind=kind,
                           wants_usage=bool(asked.get("include_usage")),
                           wants_continuous=bool(asked.get("continuous_usage_stats")),
                           observe=observe)
        return Reply(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                           "X-Accel-Buffering": "no", **limit_headers}, stream=relay, kind=kind)
    shape = functools.partial(responses.answer, request=body.request) if endpoint == RESPONSES else None
    reply = await _collect(response, pool, route, meter, settle, engine, shape)
    reply.headers.update(limit_headers)
    reply.kind = kind
    return reply


async def _collect(response: aiohttp.ClientResponse, pool: PoolClient, route: Route,
                   meter: streams.Meter, settle, endpoint: str, shape=None) -> Reply:
    """A plain answer, put together from the engine's stream (and given the caller's ``shape``,
    where it is not the engine's); settled however it ends (read to the end, broken off by the
    replica, or cancelled because the client went away, which closes the engine's connection and
    so aborts the request there at once)."""
    assembler = streams.Assembler(endpoint)
    try:
        async for line in _lines(response):
            chunk = _chunk(line)
            if chunk is not None:
                meter.see(chunk)
                assembler.add(chunk)
    except streams.EngineStreamError as exc:
        return _stream_error(exc)
    except ENGINE_FAILURES as exc:
        pool.mark_down(route.replica, f"it failed during an answer ({type(exc).__name__})")
        return _error(EngineUnavailable("The engine replica failed during the answer; retry the request."))
    finally:
        response.release()  # back to the kept-alive connections, or closed when not read to the end
        pool.release(route)
        await asyncio.shield(settle())
    answer = assembler.answer()
    return Reply(200, {"Content-Type": JSON},
                 streams.dumps(answer if shape is None else shape(answer)).encode())


def _chunk(line: str) -> dict | None:
    """One server-sent event's JSON payload, or None (``[DONE]``, comments, a line cut short)."""
    if not line.startswith("data: {"):
        return None
    try:
        chunk = json.loads(line[6:])
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _stream_error(exc: streams.EngineStreamError) -> Reply:
    if exc.status >= 500:
        log.error("engine failed during an answer: %s", exc.message)
        return _error(ApiError("The engine failed on this request.", code="engine_error", status=502))
    return _error(ApiError(exc.message, code="invalid_request", status=exc.status))


async def _settle(target: Target, reservation: ratelimit.Admission, meter: streams.Meter,
                  route: Route, endpoint: str, body: dict) -> None:
    """Count the request's tokens against its organization and settle its reservation: what the
    engine reported, however the request ended, and never less than its prompt (asked of the
    engine when the request ended before its first chunk told it)."""
    prompt, completion = meter.tokens()
    unseen = meter.unseen_prompts()
    if unseen:
        prompt += await _count_prompts(route, target, endpoint, body, unseen)
    _record(target, prompt, completion)
    await ratelimit.finish(reservation, prompt + completion)


async def _count_prompts(route: Route, target: Target, endpoint: str, body: dict,
                         indexes: list[int]) -> int:
    """The tokens of the request's prompts ``indexes``, by the engine's tokenizer (its
    ``/tokenize``, with the chat template for messages); the admission's estimate of about four
    bytes a token where the engine cannot tell."""
    if endpoint == CHAT:
        asks = [{"model": target.base_model, "messages": body["messages"]}]
    else:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        asks = [{"model": target.base_model, "prompt": prompts[index]} for index in indexes]
    total = 0
    for ask in asks:
        try:
            async with _client().post(f"{route.engine_url}/tokenize", json=ask,
                                      timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status == 200:
                    total += int((await response.json())["count"])
                    continue
        except (*ENGINE_FAILURES, ValueError, KeyError, TypeError):
            pass
        total += len(json.dumps(ask.get("messages") or ask.get("prompt"))) // 4
    return total


async def _finish(reservation: ratelimit.Admission | None, actual_tokens: int) -> None:
    """Settle and free the request's slot, also when the request is being cancelled meanwhile
    (a slot left taken would count against the organization until it goes stale)."""
    if reservation is not None and not reservation.finished:
        await asyncio.shield(ratelimit.finish(reservation, actual_tokens))


async def _complete(request, endpoint: str) -> HttpResponse:
    """The Django view (browser sessions, and keys when the fast path is not mounted)."""
    if request.method != "POST":
        return _error(ApiError("Use POST.", code="method_not_allowed", status=405),
                      {"Allow": "POST"}).as_django()
    reply = await complete(endpoint, authorization=request.headers.get("Authorization"),
                           raw=request.body, request=request, address=request.META.get("REMOTE_ADDR"))
    return reply.as_django()


STREAM_FAILED = ("data: " + json.dumps({"error": {
    "message": "The engine replica failed during the answer; retry the request.",
    "type": "engine_error", "param": None, "code": "engine_error"}}) + "\n\ndata: [DONE]\n\n").encode()


class _Relay:
    """Pass the engine's server-sent events through, as the caller asked for them (the running
    usage the gateway asked for on its behalf is taken out), counting the tokens as they come.

    A stream the engine breaks off (the replica died) ends with an error event and ``[DONE]``,
    and the replica is marked down so that new requests go elsewhere. The engine connection is
    closed, the lease released and the request settled exactly once: when the events end, or at
    ``aclose``, also for a stream abandoned before its first event (a generator's own ``finally``
    would not run then).
    """

    def __init__(self, response: aiohttp.ClientResponse, pool: PoolClient, route: Route,
                 meter: streams.Meter, settle, *, kind: str, wants_usage: bool,
                 wants_continuous: bool, observe) -> None:
        self.response, self.pool, self.route, self.meter, self.settle = response, pool, route, meter, settle
        self.kind = kind
        self.wants_usage, self.wants_continuous, self.observe = wants_usage, wants_continuous, observe
        self._finished = False
        self._events = self._relay()

    def __aiter__(self):
        return self._events

    async def aclose(self) -> None:
        await self._events.aclose()
        await self._close()

    async def _close(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.response.release()  # closes the connection when the stream was not read to its end,
        # which is what aborts the request in the engine
        self.pool.release(self.route)
        self.observe(Reply(200, {}, kind=self.kind))
        await asyncio.shield(self.settle())

    def _shown(self, line: str) -> str | None:
        """The line as the caller gets it, or None to leave it out."""
        chunk = _chunk(line)
        if chunk is None:
            return line
        self.meter.see(chunk)
        shown = streams.for_caller(chunk, wants_usage=self.wants_usage,
                                   wants_continuous=self.wants_continuous)
        if shown is chunk:
            return line
        return None if shown is None else f"data: {streams.dumps(shown)}"

    async def _relay(self):
        done = False
        try:
            async for line in _lines(self.response):
                if not line or (line := self._shown(line)) is None:
                    continue
                done = line == "data: [DONE]"
                yield f"{line}\n\n".encode()
        except ENGINE_FAILURES as exc:
            self.pool.mark_down(self.route.replica, f"it broke off a stream ({type(exc).__name__})")
            log.warning("stream broken off by %s: %s", self.route.engine_url, exc)
        finally:
            await self._close()
        if not done:
            yield STREAM_FAILED


class _ResponsesRelay(_Relay):
    """The engine's chat chunks as the Responses API's events (responses.Events): the opening
    events at once, a delta for each piece of text, the closing ones at the engine's ``[DONE]``,
    and ``response.failed`` where the engine failed or broke off. Closed, released and settled
    as any relay, also when the client goes away."""

    def __init__(self, *args, events: responses.Events, **kwargs) -> None:
        self.events = events
        super().__init__(*args, wants_usage=False, wants_continuous=False, **kwargs)

    async def _relay(self):
        events = self.events
        try:
            yield events.opening()
            async for line in _lines(self.response):
                if line == "data: [DONE]":
                    shown = events.closing()
                elif (chunk := _chunk(line)) is not None:
                    self.meter.see(chunk)
                    shown = events.add(chunk)
                else:
                    continue
                if shown:
                    yield shown
        except ENGINE_FAILURES as exc:
            self.pool.mark_down(self.route.replica, f"it broke off a stream ({type(exc).__name__})")
            log.warning("stream broken off by %s: %s", self.route.engine_url, exc)
        finally:
            await self._close()
        if not events.ended:
            yield events.failed("The engine replica failed during the answer; retry the request.")


async def _lines(response: aiohttp.ClientResponse):
    """The response's lines as they arrive, without their line ends (of any length: aiohttp's
    own line reader refuses lines over 64 KiB, which an echoed prompt with logprobs can be)."""
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.rstrip(b"\r").decode()


def requester_of(principal: Principal) -> str:
    """Whose request limit a request counts against: its key's, or its signed-in user's."""
    return f"key:{principal.api_key.id}" if principal.api_key is not None else f"user:{principal.user.pk}"


def _token_headers(verdict: ratelimit.TokenVerdict) -> dict[str, str]:
    if not verdict.limit:
        return {}
    return {"x-ratelimit-limit-tokens": str(verdict.limit),
            "x-ratelimit-remaining-tokens": str(verdict.remaining),
            "x-ratelimit-reset-tokens": f"{verdict.reset_after}s"}


def _limit_headers(verdict: ratelimit.Verdict) -> dict[str, str]:
    if not verdict.limit:
        return {}
    return {"x-ratelimit-limit-requests": str(verdict.limit),
            "x-ratelimit-remaining-requests": str(verdict.remaining),
            "x-ratelimit-reset-requests": f"{verdict.reset_after}s"}


@csrf_exempt
async def chat_completions(request):
    return await _complete(request, CHAT)


@csrf_exempt
async def completions(request):
    return await _complete(request, COMPLETIONS)


@csrf_exempt
async def create_response(request):
    return await _complete(request, RESPONSES)


# --- models ----------------------------------------------------------------------------------------

def _model_objects(request, only: str | None = None) -> list[dict]:
    principal = _authenticate(request.headers.get("Authorization"), request)
    _require(principal, INFER, READ)
    bases = served_base_models()
    adapters = Adapter.objects.filter(organization=principal.organization, deployed=True)
    if only is not None:
        bases, adapters = bases.filter(name=only), adapters.filter(name=only)
    found = [{"id": b.name, "object": "model", "created": timestamp(b.created_at),
              "owned_by": "tuneplex", "root": b.name, "parent": None} for b in bases]
    found += [{"id": a.name, "object": "model", "created": timestamp(a.created_at),
               "owned_by": principal.organization.slug, "root": a.base_model.name,
               "parent": a.base_model.name}
              for a in adapters.select_related("base_model").order_by("-created_at")]
    return found


# Exempt from CSRF like the completion views: they change nothing, and without it a key's
# DELETE /v1/models/{model} (the SDK's models.delete) was refused for a missing CSRF cookie
# instead of the 405 that says models are not deleted here.
@csrf_exempt
async def models_list(request):
    if request.method != "GET":
        return _error(ApiError("Use GET.", code="method_not_allowed", status=405),
                      {"Allow": "GET"}).as_django()
    try:
        data = await sync_to_async(_model_objects)(request)
    except ApiError as exc:
        return _error(exc).as_django()
    return JsonResponse({"object": "list", "data": data})


@csrf_exempt
async def model_detail(request, model: str):
    if request.method != "GET":
        return _error(ApiError("Use GET.", code="method_not_allowed", status=405),
                      {"Allow": "GET"}).as_django()
    try:
        data = await sync_to_async(_model_objects)(request, model)
        if not data:
            raise ModelNotFound(model)
    except ApiError as exc:
        return _error(exc).as_django()
    return JsonResponse(data[0])
