"""Invitation links: the token is the proof.

A link carries a random 256-bit secret, signed with the server's SECRET_KEY (so a forged or
mangled link is refused before any database look-up, and rotating the key voids every link).
Only the secret's SHA-256 is stored; whoever holds the link and signs in may accept it, once,
before it expires.
"""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core import signing
from django.http import HttpRequest
from django.urls import reverse

_SIGNER = signing.Signer(salt="tuneplex.invitation")


def new_token() -> tuple[str, str]:
    """A fresh link token and the hash to store for it."""
    secret = secrets.token_urlsafe(32)
    return _SIGNER.sign(secret), hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def token_hash(token: str) -> str | None:
    """The stored hash a link's token stands for, or None when its signature does not hold."""
    try:
        return hash_secret(_SIGNER.unsign(token))
    except signing.BadSignature:
        return None


def invitation_url(token: str, *, base_url: str) -> str:
    return base_url.rstrip("/") + reverse("frontend:invitation-link", kwargs={"token": token})


def base_url_of(request: HttpRequest) -> str:
    """Where invitees reach this server: TUNEPLEX_PUBLIC_URL, else the address the admin used."""
    return settings.PUBLIC_URL or request.build_absolute_uri("/")
