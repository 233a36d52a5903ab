"""Public identifiers: a readable prefix and random base62, like OpenAI's ``file-…``/``ftjob-…``.

Ids are random, never derived from names or counters, so they leak nothing about other tenants.
"""

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 24


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(ID_LENGTH))


def id_field_length(prefix: str) -> int:
    return len(prefix) + ID_LENGTH
