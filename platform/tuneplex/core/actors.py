"""Who is acting: the principal every service receives and every audit row records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneplex.apikeys.models import ApiKey
    from tuneplex.tenancy.models import Membership, Organization, User


@dataclass(frozen=True)
class Principal:
    """An authenticated caller acting inside one organization.

    Exactly one of ``user`` (a browser session) or ``api_key`` is the acting party; a key still
    remembers the user who created it, for the audit trail.
    """

    organization: Organization
    scopes: frozenset[str]
    user: User | None = None
    api_key: ApiKey | None = None
    membership: Membership | None = None

    @classmethod
    def of_member(cls, membership: Membership) -> Principal:
        """A signed-in member acting in their organization, with their role's scopes."""
        return cls(organization=membership.organization, scopes=membership.scopes,
                   user=membership.user, membership=membership)

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def label(self) -> str:
        if self.api_key is not None:
            return f"key:{self.api_key.prefix}"
        if self.user is not None:
            return f"user:{self.user.username}"
        return "system"

