"""Replicas join the fleet by themselves (issue 26): they register in the real Redis with a
heartbeat, gateways read the membership each second, and one that stops beating is dropped.

The first tests use the membership and the pool client alone (stand-in agents answering
``/v1/state``); the last starts real replicas (vLLM + agent) beside a real gateway that was given
no replica address at all.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

from serving.client import PoolClient
from serving.pool import NoReplicaAvailable
from tests.conftest import (TEST_FLEET, GatewayProcess, ReplicaProcess, add_member, key_for,
                            make_tenant, wait_for)
from tuneplex.inference import membership

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture
def fleet(settings):
    """A fleet of this test's own on the real Redis."""
    settings.SERVING_FLEET = f"membership-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield settings.SERVING_FLEET
    for key in client.scan_iter(f"tuneplex:fleet:{settings.SERVING_FLEET}:*"):
        client.delete(key)
    client.close()


def test_a_replica_is_a_member_while_it_beats_and_leaves_when_it_stops(fleet, settings):
    client = redis.Redis.from_url(settings.REDIS_URL)
    assert membership.members(BASE, client) == []
    first = membership.Heartbeat(BASE, "http://10.0.0.1:8100/", every=1).start()
    second = membership.Heartbeat(BASE, "http://10.0.0.2:8100", every=1).start()
    try:
        assert membership.members(BASE, client) == ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
        assert membership.members("another-model", client) == []  # per base model
        entry = membership._entry_key(BASE, "http://10.0.0.1:8100")
        beat_at = json.loads(client.get(entry))["beat_at"]
        assert 0 < client.pttl(entry) <= 3000  # three beats to live
        wait_for(lambda: json.loads(client.get(entry) or b"{}").get("beat_at", 0) > beat_at,
                 timeout=5, message="the next beat to renew the entry")
        second.stop()  # a clean stop leaves at once
        assert membership.members(BASE, client) == ["http://10.0.0.1:8100"]
    finally:
        first.stop()
        second.stop()
    assert membership.members(BASE, client) == []


def test_a_replica_that_stops_beating_expires_and_is_swept_from_the_set(fleet, settings):
    client = redis.Redis.from_url(settings.REDIS_URL)
    membership.register(client, BASE, "http://10.0.0.3:8100", ttl_seconds=1)  # then it "dies"
    membership.register(client, BASE, "http://10.0.0.4:8100", ttl_seconds=60)
    assert membership.members(BASE, client) == ["http://10.0.0.3:8100", "http://10.0.0.4:8100"]
    wait_for(lambda: membership.members(BASE, client) == ["http://10.0.0.4:8100"], timeout=5,
             message="the silent replica to expire")
    assert client.smembers(membership._set_key(BASE)) == {b"http://10.0.0.4:8100"}


FLEET_ACL = ("resetkeys ~tuneplex:fleet:* resetchannels -@all +set +sadd +srem +del +smembers "
             "+mget +ping +hello +select +publish")  # as docs/operations.md and the Compose file give it


def test_a_replica_registers_as_a_redis_user_that_can_touch_only_the_fleet(fleet, settings):
    """The user docs/operations.md gives engine nodes: enough to beat, refused the limits' keys."""
    admin = redis.Redis.from_url(settings.REDIS_URL)
    name, password = f"fleet-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", *FLEET_ACL.split())
    url = redis.connection.parse_url(settings.REDIS_URL)
    try:
        settings.FLEET_REDIS_URL = (f"redis://{name}:{password}@{url.get('host', '127.0.0.1')}:"
                              f"{url.get('port', 6379)}/{url.get('db', 0)}")
        beat = membership.Heartbeat(BASE, "http://10.0.0.9:8100", every=1).start()
        try:
            assert membership.members(BASE, admin) == ["http://10.0.0.9:8100"]
            as_engine = redis.Redis.from_url(settings.FLEET_REDIS_URL)
            assert membership.members(BASE, as_engine) == ["http://10.0.0.9:8100"]
            admin.set("tuneplex:{org_x}:inflight", "1")
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_engine.get("tuneplex:{org_x}:inflight")
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_engine.keys("*")
            as_engine.close()
        finally:
            beat.stop()
        assert membership.members(BASE, admin) == []  # it could also leave
    finally:
        admin.delete("tuneplex:{org_x}:inflight")
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


class _StandInAgent:
    """Answers ``/v1/state`` as a ready pool agent does; nothing else."""

    def __init__(self) -> None:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"ready": True, "engine_url": agent.engine_url, "loaded": [],
                                   "slots": 4}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.engine_url = f"http://engine-of-{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_pool_takes_in_replicas_that_join_and_drops_those_that_leave(fleet, settings):
    client = redis.Redis.from_url(settings.REDIS_URL)
    agents = [_StandInAgent(), _StandInAgent()]
    pool = PoolClient([], api_key="k", slots=4, fleet=lambda: membership.entries(BASE, client))
    try:
        pool.refresh()
        with pytest.raises(NoReplicaAvailable):  # nobody has joined yet
            pool.any_replica()
        assert pool.health() == (False, "no replica has joined the fleet")

        membership.register(client, BASE, agents[0].url, ttl_seconds=60)
        pool.refresh()
        assert pool.any_replica().engine_url == agents[0].engine_url
        membership.register(client, BASE, agents[1].url, ttl_seconds=60)
        pool.refresh()
        assert pool.health() == (True, "2 of 2 replicas up")
        routes = [pool.any_replica() for _ in range(4)]  # held: each goes to the least busy
        assert {r.engine_url for r in routes} == {a.engine_url for a in agents}

        membership.leave(client, BASE, agents[0].url)
        pool.refresh()
        assert pool.health() == (True, "1 of 1 replicas up")
        assert {pool.any_replica().engine_url for _ in range(3)} == {agents[1].engine_url}
        for route in routes:  # requests on the replica that left end normally
            pool.release(route)
    finally:
        pool.close()
        for agent in agents:
            agent.close()


def test_a_pool_keeps_its_replicas_when_the_membership_cannot_be_read(fleet, settings):
    agent = _StandInAgent()
    client = redis.Redis.from_url(settings.REDIS_URL)
    membership.register(client, BASE, agent.url, ttl_seconds=60)
    answers = {"redis": True}

    def fleet() -> dict:
        if not answers["redis"]:
            raise redis.ConnectionError("Redis went away")
        return membership.entries(BASE, client)

    pool = PoolClient([], api_key="k", slots=4, fleet=fleet)
    try:
        pool.refresh()
        assert pool.health() == (True, "1 of 1 replicas up")
        answers["redis"] = False
        pool.refresh()
        assert pool.any_replica().engine_url == agent.engine_url  # still routed
        answers["redis"] = True
        membership.leave(client, BASE, agent.url)
        pool.refresh()  # the positive control: read again, the departure is seen
        assert pool.health() == (False, "no replica has joined the fleet")
    finally:
        pool.close()
        agent.close()


def _state(*loaded: str, ready: bool = True, engine: str = "http://10.0.0.7:8101") -> dict:
    return {"ready": ready, "slots": 4, "loaded": list(loaded), "engine_url": engine}


def test_a_pool_routes_by_the_states_replicas_publish_without_asking_them(fleet, settings):
    """Nothing listens at the replica's address: a pool that asked it would mark it down."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    url = "http://127.0.0.1:9"  # the discard port: closed
    membership.register(client, BASE, url, ttl_seconds=60, state=_state("ft:a"))
    pool = PoolClient([], api_key="k", slots=4, fleet=lambda: membership.entries(BASE, client))
    try:
        pool.refresh()
        assert pool.health() == (True, "1 of 1 replicas up")
        assert pool.loaded_anywhere("ft:a") and not pool.loaded_anywhere("ft:b")
        assert pool.any_replica().engine_url == "http://10.0.0.7:8101"
        # A change pushed between two reads is routed by at once; a replica that left, dropped.
        pool.apply_state(url, _state("ft:a", "ft:b"))
        assert pool.loaded_anywhere("ft:b")
        pool.apply_state(url, None)
        assert pool.health() == (False, "no replica has joined the fleet")
        pool.refresh()  # its entry is still in Redis (it never left there): read back in
        assert pool.health() == (True, "1 of 1 replicas up")
    finally:
        pool.close()


def test_a_change_is_pushed_to_the_watchers_as_it_happens(fleet, settings):
    import queue

    changes: queue.Queue = queue.Queue()
    watcher = membership.Watcher(lambda base, url, state: changes.put((base, url, state))).start()
    loaded: list[str] = []
    beat = None
    try:
        assert watcher.subscribed.wait(10)
        beat = membership.Heartbeat(BASE, "http://10.0.0.8:8100", every=30,
                                    state=lambda: _state(*loaded)).start()
        assert changes.get(timeout=5) == (BASE, "http://10.0.0.8:8100", _state())  # it joined
        loaded.append("ft:new")  # the agent loaded an adapter: published within a look
        assert changes.get(timeout=5) == (BASE, "http://10.0.0.8:8100", _state("ft:new"))
        assert changes.empty()  # a heartbeat (30 s here) would not have shown it yet
        beat.stop()
        assert changes.get(timeout=5) == (BASE, "http://10.0.0.8:8100", None)  # it left
    finally:
        if beat is not None:
            beat.stop()
        watcher.stop()


# --- real replicas ----------------------------------------------------------------------------


def _requests_served(replica: ReplicaProcess) -> float:
    text = httpx.get(f"{replica.engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


@pytest.mark.django_db(transaction=True)
def test_a_replica_started_later_joins_a_running_gateway_and_one_killed_is_routed_around(
        engine, registered_base_model, test_database_url, tmp_path_factory, settings):
    settings.SERVING_FLEET = TEST_FLEET  # the session's replicas' fleet
    registered_base_model()  # (earlier tests' flushes took its row)
    tenant = make_tenant("Fleet")
    key = key_for(tenant, add_member(tenant, "admin"), ["infer"])
    gateway = GatewayProcess(database_url=test_database_url, engine=None, fleet=True)
    joined = None
    try:
        answers: list[str] = []

        def ask() -> httpx.Response:
            response = httpx.post(f"{gateway.url}/v1/completions", timeout=60,
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": BASE, "prompt": "Hello", "max_tokens": 2})
            answers.append(f"{response.status_code} {response.text[:200]}")
            return response

        # The session's replica is in the fleet: the gateway, told of no replica, finds it.
        wait_for(lambda: ask().status_code == 200, timeout=30,
                 message=lambda: f"the gateway to find a replica (last: {answers[-1:]})")

        joined = ReplicaProcess(database_url=test_database_url, name="joins",
                                serving_dir=tmp_path_factory.mktemp("serving-joins"))
        joined.start()
        joined.wait_ready()
        before = _requests_served(joined)
        # Requests spread over the replicas this gateway knows: the new one gets some, with no
        # restart and no configuration edit.
        wait_for(lambda: ask().status_code == 200 and _requests_served(joined) > before,
                 timeout=30, message="the new replica to take requests")

        os.killpg(joined.process.pid, signal.SIGKILL)  # no clean leave: its entry must expire
        joined.process.wait(timeout=30)
        wait_for(lambda: joined.url not in membership.members(BASE), timeout=10,
                 message="the killed replica to leave the fleet (3 heartbeats of 1 s)")
        answers = [ask().status_code for _ in range(6)]
        assert answers == [200] * 6, answers
    finally:
        if joined is not None:
            joined.stop()
        gateway.stop()
