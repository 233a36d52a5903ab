from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tests.conftest import add_member, bearer, key_for
from tuneplex.apikeys.models import ApiKey
from tuneplex.apikeys.services import hash_key
from tuneplex.audit.models import AuditEvent
from tuneplex.core.scopes import Role

pytestmark = pytest.mark.django_db


def test_a_created_key_is_shown_once_and_stored_only_as_a_hash(org_a):
    response = bearer(org_a.owner_key).post(
        "/v1/api_keys", {"name": "ci", "scopes": ["read", "train"]}, format="json")
    assert response.status_code == 201
    key = response.json()["key"]
    assert key.startswith("tpx_") and len(key) == 44
    stored = ApiKey.objects.get(id=response.json()["id"])
    assert stored.hashed_key == hash_key(key) and stored.prefix == key[:12]
    # No table anywhere holds the plaintext.
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')
            assert key not in repr(cursor.fetchall()), table
    again = bearer(org_a.owner_key).get(f"/v1/api_keys/{stored.id}")
    assert again.status_code == 200 and "key" not in again.json()
    assert again.json()["scopes"] == ["read", "train"]


@pytest.mark.parametrize("state", ["revoked", "expired", "unknown"])
def test_a_revoked_expired_or_unknown_key_gets_401(org_a, state):
    key = key_for(org_a, org_a.owner, ["read"])
    row = ApiKey.objects.get(hashed_key=hash_key(key))
    if state == "revoked":
        response = bearer(org_a.owner_key).post(f"/v1/api_keys/{row.id}/revoke")
        assert response.status_code == 200 and response.json()["revoked_at"]
    elif state == "expired":
        ApiKey.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    else:
        key = key[:-4] + "zzzz"
    response = bearer(key).get("/v1/organization")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_key_without_the_needed_scope_gets_403(org_a):
    read_only = key_for(org_a, org_a.owner, ["read"])
    assert bearer(read_only).get("/v1/api_keys").status_code == 200
    response = bearer(read_only).post("/v1/api_keys", {"name": "x"}, format="json")
    assert response.status_code == 403
    assert "train" in response.json()["error"]["message"]
    assert bearer(read_only).get("/v1/audit_events").status_code == 403


def test_a_viewer_cannot_write_by_session_or_key(org_a, viewer_of_a):
    viewer_key = key_for(org_a, viewer_of_a, ["read"])
    owner_key_id = ApiKey.objects.filter(organization=org_a.organization).first().id
    from rest_framework.test import APIClient

    session = APIClient()
    session.force_login(viewer_of_a)
    for client in (session, bearer(viewer_key)):
        assert client.get("/v1/api_keys").status_code == 200
        for method, url, body in [
            ("post", "/v1/api_keys", {"name": "mine"}),
            ("post", f"/v1/api_keys/{owner_key_id}/revoke", None),
            ("post", "/v1/organization/invitations", {"invitee": "nobody"}),
        ]:
            response = getattr(client, method)(url, body, format="json")
            assert response.status_code == 403, (url, response.content)
            assert response.json()["error"]["code"] == "permission_denied"
    assert ApiKey.objects.get(id=owner_key_id).revoked_at is None


def test_a_viewer_cannot_create_a_key_with_more_scopes_than_their_role(org_a, viewer_of_a):
    from tuneplex.apikeys.services import api_key_create
    from tuneplex.core.errors import ApiError

    with pytest.raises(ApiError) as raised:
        api_key_create(organization=org_a.organization, actor=org_a.principal(viewer_of_a),
                       name="sneaky", scopes=["train"])
    assert raised.value.status == 403 and raised.value.param == "scopes"


def test_a_members_key_cannot_grant_admin(org_a, member_of_a):
    key = key_for(org_a, member_of_a, ["read", "train"])
    response = bearer(key).post("/v1/api_keys", {"name": "x", "scopes": ["admin"]}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["param"] == "scopes"


def test_a_key_loses_scopes_when_its_creator_is_demoted_or_removed(org_a, member_of_a):
    key = key_for(org_a, member_of_a, ["read", "train"])
    membership = org_a.organization.memberships.get(user=member_of_a)
    membership.role = Role.VIEWER
    membership.save()
    assert bearer(key).post("/v1/api_keys", {"name": "x"}, format="json").status_code == 403
    membership.delete()
    assert bearer(key).get("/v1/organization").status_code == 401


def test_last_used_time_is_recorded(org_a):
    key = key_for(org_a, org_a.owner, ["read"])
    row = ApiKey.objects.get(hashed_key=hash_key(key))
    assert row.last_used_at is None
    assert bearer(key).get("/v1/organization").status_code == 200
    row.refresh_from_db()
    assert row.last_used_at is not None
    assert bearer(key).get(f"/v1/api_keys/{row.id}").json()["last_used_at"] is not None


def test_an_expiry_in_the_past_is_refused(org_a):
    response = bearer(org_a.owner_key).post(
        "/v1/api_keys", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "expires_at"


def test_every_write_is_audited_with_its_actor(org_a):
    response = bearer(org_a.owner_key).post("/v1/api_keys", {"name": "audited"}, format="json")
    new_id = response.json()["id"]
    bearer(org_a.owner_key).post(f"/v1/api_keys/{new_id}/revoke")
    events = AuditEvent.objects.filter(organization=org_a.organization, object_id=new_id)
    assert sorted(events.values_list("action", flat=True)) == ["api_key.create", "api_key.revoke"]
    event = events.get(action="api_key.create")
    owner_key_row = ApiKey.objects.get(hashed_key=hash_key(org_a.owner_key))
    assert event.actor_api_key_id == owner_key_row.id
    assert event.actor_user_id == org_a.owner.id
    assert event.actor_label == f"key:{owner_key_row.prefix}"
    listed = bearer(org_a.owner_key).get("/v1/audit_events").json()["data"]
    assert listed[0]["action"] == "api_key.revoke" and listed[0]["object_id"] == new_id


def test_members_can_be_demoted_and_the_last_owner_is_kept(org_a):
    newcomer = add_member(org_a, Role.MEMBER)
    member_id = org_a.organization.memberships.get(user=newcomer).id
    client = bearer(org_a.owner_key)
    assert client.patch(f"/v1/organization/members/{member_id}", {"role": "viewer"},
                        format="json").json()["role"] == "viewer"
    owner_membership = org_a.organization.memberships.get(user=org_a.owner)
    last = client.patch(f"/v1/organization/members/{owner_membership.id}", {"role": "admin"},
                        format="json")
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_owner"
    assert client.delete(f"/v1/organization/members/{member_id}").status_code == 204
    assert not newcomer.memberships.exists()


def test_nobody_can_be_added_without_an_invitation(org_a):
    from tests.conftest import make_user

    make_user("bystander")
    response = bearer(org_a.owner_key).post("/v1/organization/members",
                                            {"username": "bystander"}, format="json")
    assert response.status_code == 405
    assert not org_a.organization.memberships.filter(user__username="bystander").exists()


def test_an_admin_cannot_make_an_owner(org_a):
    admin = add_member(org_a, Role.ADMIN)
    key = key_for(org_a, admin, ["read", "admin"])
    target = add_member(org_a, Role.MEMBER)
    membership = org_a.organization.memberships.get(user=target)
    response = bearer(key).patch(f"/v1/organization/members/{membership.id}", {"role": "owner"},
                                 format="json")
    assert response.status_code == 403 and response.json()["error"]["param"] == "role"


def test_an_admin_cannot_demote_or_remove_an_owner(org_a):
    admin = add_member(org_a, Role.ADMIN)
    key = key_for(org_a, admin, ["read", "admin"])
    owner = org_a.organization.memberships.get(user=org_a.owner)
    second_owner = org_a.organization.memberships.get(user=add_member(org_a, Role.OWNER))
    for target in (owner, second_owner):
        demoted = bearer(key).patch(f"/v1/organization/members/{target.id}", {"role": "viewer"},
                                    format="json")
        assert demoted.status_code == 403 and demoted.json()["error"]["param"] == "role"
        assert bearer(key).delete(f"/v1/organization/members/{target.id}").status_code == 403
    assert sorted(org_a.organization.memberships.filter(role="owner").values_list("id", flat=True)
                  ) == sorted([owner.id, second_owner.id])


def test_keys_die_with_their_creators_membership_or_account(org_a):
    from tuneplex.tenancy.services import membership_remove

    leaver, deactivated, deleted = (add_member(org_a, Role.MEMBER) for _ in range(3))
    keys = {user.username: key_for(org_a, user, ["read"]) for user in (leaver, deactivated, deleted)}
    for key in keys.values():
        assert bearer(key).get("/v1/files").status_code == 200
    membership_remove(organization=org_a.organization, actor=org_a.principal(),
                      membership=org_a.organization.memberships.get(user=leaver))
    deactivated.is_active = False
    deactivated.save()
    deleted.delete()
    for username, key in keys.items():
        response = bearer(key).get("/v1/files")
        assert response.status_code == 401, username
    assert not ApiKey.objects.filter(organization=org_a.organization, revoked_at__isnull=True,
                                     name="test key").exists()
    assert ApiKey.objects.filter(created_by=None, revoked_at__isnull=False).count() == 1


def test_the_number_of_live_keys_is_capped(org_a, settings):
    settings.ORG_MAX_API_KEYS = 3  # the owner's key exists already
    client = bearer(org_a.owner_key)
    for name in ("one", "two"):
        assert client.post("/v1/api_keys", {"name": name, "scopes": ["read"]},
                           format="json").status_code == 201
    refused = client.post("/v1/api_keys", {"name": "three", "scopes": ["read"]}, format="json")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "api_key_limit_reached"
    assert ApiKey.objects.filter(organization=org_a.organization).count() == 3
    two = ApiKey.objects.get(organization=org_a.organization, name="two")
    assert client.post(f"/v1/api_keys/{two.id}/revoke").status_code == 200
    assert client.post("/v1/api_keys", {"name": "three", "scopes": ["read"]},
                       format="json").status_code == 201


def test_a_cursor_that_is_not_an_id_of_the_list_is_a_400_not_a_500(org_a):
    """The audit log's ids are integers: a text cursor failed the query (found by the fuzzer)."""
    for path in ("/v1/audit_events", "/v1/api_keys"):
        refused = bearer(org_a.owner_key).get(f"{path}?after=%06p")
        assert refused.status_code == 400, (path, refused.content)
        assert refused.json()["error"]["code"] == "invalid_cursor"
