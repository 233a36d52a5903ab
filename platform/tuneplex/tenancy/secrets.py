"""Secrets an organization hands the platform (its W&B API key), kept encrypted in the database.

Fernet (AES-128-CBC with HMAC-SHA256) under a key derived from the server's SECRET_KEY with HKDF,
one derived key per purpose: a database dump alone reveals no secret, and a value sealed for one
purpose does not open as another. Changing SECRET_KEY makes the stored secrets unreadable
(:class:`SecretUnreadable`): the organization sets them again. Nothing returns a secret to a
client; the platform reads it only where it uses it (a GPU worker starting a W&B run).
"""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

# The purposes (each its own derived key).
WANDB_API_KEY = "wandb_api_key"


class SecretUnreadable(Exception):
    """A sealed value that this server's SECRET_KEY does not open (changed since it was stored)."""


@functools.cache
def _fernet(purpose: str, secret_key: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=f"tuneplex.{purpose}".encode()).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def seal(plain: str, *, purpose: str) -> str:
    return _fernet(purpose, settings.SECRET_KEY).encrypt(plain.encode()).decode()


def unseal(sealed: str, *, purpose: str) -> str:
    try:
        return _fernet(purpose, settings.SECRET_KEY).decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(f"the stored {purpose} cannot be read with this server's "
                               "SECRET_KEY (was it changed?); set it again") from None
