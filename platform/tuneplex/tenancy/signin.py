"""Sign-in throttling on django-axes: three failure budgets, and failed single sign-ons kept apart.

- one username from one address: TUNEPLEX_LOGIN_FAILURE_LIMIT (a person mistyping);
- one username from any address: TUNEPLEX_LOGIN_USERNAME_FAILURE_LIMIT, higher (one account
  guessed at from many addresses);
- one address for any usernames: TUNEPLEX_LOGIN_ADDRESS_FAILURE_LIMIT, higher still (one
  address guessing at many accounts; an office behind one NAT shares it).

A failure counts against all three within TUNEPLEX_LOGIN_LOCKOUT_MINUTES of the previous one;
reaching any limit locks what it counts (even the right password is refused) for that long.

A failed single sign-on has no username typed: axes would file every one from an address under
one empty name, so that one office's failures locked single sign-on for all of them. Each is
filed under the browser session that tried (``sso:`` and a hash of the session key), so it
counts for that browser and towards its address's budget only.
"""

from __future__ import annotations

import hashlib
import secrets

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username, get_lockout_parameters
from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Sum


def attempt_username(request, credentials: dict | None) -> str:
    """AXES_USERNAME_CALLABLE: the name a sign-in attempt is counted under."""
    username = (credentials or {}).get("username")
    if username is None and request is not None:
        username = getattr(request, "data", request.POST).get("username")
    if username:
        return username
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None) or secrets.token_hex(16)
    return "sso:" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _limit_of(parameter) -> int:
    names = frozenset([parameter] if isinstance(parameter, str) else parameter)
    if names == {"username"}:
        return settings.LOGIN_USERNAME_FAILURE_LIMIT
    if names == {"ip_address"}:
        return settings.LOGIN_ADDRESS_FAILURE_LIMIT
    return settings.AXES_FAILURE_LIMIT  # username and address together


class SignInLockoutHandler(AxesDatabaseHandler):
    """AXES_HANDLER: each of AXES_LOCKOUT_PARAMETERS has its own limit.

    axes compares one failure count with AXES_FAILURE_LIMIT. This reports the most used budget
    in that unit: ``failures * AXES_FAILURE_LIMIT // limit`` reaches AXES_FAILURE_LIMIT exactly
    when ``failures`` reaches ``limit``.
    """

    def get_failures(self, request, credentials: dict | None = None) -> int:
        unit = settings.AXES_FAILURE_LIMIT
        used = 0
        for parameter, attempts in zip(get_lockout_parameters(request, credentials),
                                       self.get_user_attempts(request, credentials)):
            failures = attempts.aggregate(total=Sum("failures_since_start"))["total"] or 0
            used = max(used, failures * unit // _limit_of(parameter))
        return used

    def reset_user_attempts(self, request, credentials: dict | None = None) -> int:
        """A successful sign-in clears its own username's failures from its address only: not
        the address's budget (an attacker's own account would reset it) nor other addresses'."""
        count, _ = AccessAttempt.objects.filter(
            username=get_client_username(request, credentials),
            ip_address=request.axes_ip_address).delete()
        return count
