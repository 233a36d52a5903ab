"""Shared fixtures: organizations, users with roles, API keys, and API clients."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from tuneplex.apikeys.services import api_key_create
from tuneplex.core.actors import Principal
from tuneplex.core.scopes import ALL_SCOPES, Role
from tuneplex.tenancy.models import Membership, Organization, User
from tuneplex.tenancy.services import organization_create

_counter = itertools.count()


@dataclass
class Tenant:
    organization: Organization
    owner: User
    owner_key: str  # full-scope key of the owner

    def principal(self, user: User | None = None) -> Principal:
        membership = Membership.objects.get(organization=self.organization,
                                            user=user or self.owner)
        return Principal(organization=self.organization, scopes=membership.scopes,
                         user=membership.user, membership=membership)


def make_user(name: str | None = None) -> User:
    return User.objects.create_user(name or f"user{next(_counter)}", password="pw-123456789")


def make_tenant(name: str) -> Tenant:
    owner = make_user(f"{name.lower()}-owner-{next(_counter)}")
    organization = organization_create(name=name, owner=owner)
    tenant = Tenant(organization=organization, owner=owner, owner_key="")
    tenant.owner_key = api_key_create(organization=organization, actor=tenant.principal(),
                                      name="owner key", scopes=list(ALL_SCOPES)).plaintext
    return tenant


def add_member(tenant: Tenant, role: str) -> User:
    user = make_user()
    Membership.objects.create(organization=tenant.organization, user=user, role=role)
    return user


def key_for(tenant: Tenant, user: User, scopes: list[str]) -> str:
    return api_key_create(organization=tenant.organization, actor=tenant.principal(user),
                          name="test key", scopes=scopes).plaintext


def bearer(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def org_a(db) -> Tenant:
    return make_tenant("Alpha")


@pytest.fixture
def org_b(db) -> Tenant:
    return make_tenant("Beta")


@pytest.fixture
def viewer_of_a(org_a) -> User:
    return add_member(org_a, Role.VIEWER)


@pytest.fixture
def member_of_a(org_a) -> User:
    return add_member(org_a, Role.MEMBER)
