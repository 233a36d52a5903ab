"""``Authorization: Bearer <key>`` for the REST API."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from tuneplex.apikeys.selectors import api_key_by_hash
from tuneplex.apikeys.services import api_key_touch, hash_key
from tuneplex.core.actors import Principal
from tuneplex.tenancy.models import Membership

MAX_KEY_LENGTH = 200


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION")
        if header is None:
            return None
        parts = header.split()
        if not parts or parts[0].lower() != self.keyword.lower():
            raise exceptions.AuthenticationFailed(
                "Unsupported Authorization header; use 'Authorization: Bearer <api key>'."
            )
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed Authorization header; use 'Authorization: Bearer <api key>'."
            )
        token = parts[1]
        if len(token) > MAX_KEY_LENGTH or not token.isascii() or not token.isprintable():
            raise exceptions.AuthenticationFailed("Invalid API key.")
        api_key = api_key_by_hash(hashed_key=hash_key(token))
        if api_key is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        if api_key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API key has been revoked.")
        if not api_key.is_active:
            raise exceptions.AuthenticationFailed("This API key has expired.")
        # A key never outranks its creator's current role, and dies with their membership or
        # account (removal and deactivation also revoke it; this refuses any left over).
        membership = (Membership.objects.filter(organization=api_key.organization,
                                                user_id=api_key.created_by_id,
                                                user__is_active=True).first()
                      if api_key.created_by_id is not None else None)
        if membership is None:
            raise exceptions.AuthenticationFailed(
                "This API key's creator is no longer an active member of the organization.")
        scopes = frozenset(api_key.scopes) & membership.scopes
        api_key_touch(api_key=api_key)
        principal = Principal(organization=api_key.organization, scopes=scopes,
                              api_key=api_key, user=None, membership=membership)
        return (api_key.created_by, principal)

    def authenticate_header(self, request) -> str:
        return f'{self.keyword} realm="api"'
