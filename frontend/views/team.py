"""Team (members and roles), API keys (created → shown once, revoked), and the audit log."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_POST

from frontend.views.common import get_or_404, principal_of
from tuneplex.apikeys import selectors as key_selectors
from tuneplex.apikeys.services import api_key_create, api_key_revoke
from tuneplex.audit.selectors import audit_event_list
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import ADMIN, ALL_SCOPES, TRAIN, Role
from tuneplex.tenancy import selectors as tenancy_selectors
from tuneplex.tenancy import services as tenancy_services
from tuneplex.tenancy.links import base_url_of

AUDIT_PAGE = 50
MAX_KEY_DAYS = 3650


# --- team ------------------------------------------------------------------------------------------


def _grantable_roles(principal: Principal) -> list[str]:
    if principal.membership is not None and principal.membership.role == Role.OWNER:
        return list(Role.values)
    return [role for role in Role.values if role != Role.OWNER]


def _team_context(principal: Principal, **extra) -> dict:
    can_manage = ADMIN in principal.scopes
    invitations = (tenancy_selectors.invitation_list(organization=principal.organization)[:100]
                   if can_manage else [])
    return {"members": tenancy_selectors.membership_list(organization=principal.organization),
            "can_manage": can_manage, "roles": _grantable_roles(principal),
            "all_roles": Role.values, "me": principal.membership, "invitations": invitations,
            "invitation_days": settings.INVITATION_DAYS, "organization": principal.organization,
            "wandb_mode": settings.WANDB_MODE, **extra}


@login_required
def team(request):
    return render(request, "frontend/team.html", _team_context(principal_of(request)))


@login_required
@require_POST
def wandb_key_view(request):
    """Set (action=set, api_key) or remove (action=remove) the organization's W&B API key."""
    principal = principal_of(request, ADMIN)
    remove = request.POST.get("action") == "remove"
    try:
        tenancy_services.organization_wandb_key_set(
            organization=principal.organization, actor=principal,
            api_key=None if remove else request.POST.get("api_key", "").strip()[:1000])
    except ApiError as exc:
        return render(request, "frontend/team.html", _team_context(
            principal, wandb_error=exc.message), status=exc.status)
    principal.organization.refresh_from_db(fields=["wandb_api_key_sealed",
                                                   "wandb_api_key_updated_at"])
    return render(request, "frontend/team.html", _team_context(
        principal, wandb_saved="removed" if remove else "saved"))


@login_required
@require_POST
def invitation_create_view(request):
    principal = principal_of(request, ADMIN)
    try:
        created = tenancy_services.invitation_create(
            organization=principal.organization, actor=principal,
            invitee=request.POST.get("invitee", "")[:254], role=request.POST.get("role", ""),
            base_url=base_url_of(request))
    except ApiError as exc:
        return render(request, "frontend/team.html", _team_context(
            principal, invite_error=exc.message, invite_values=request.POST), status=exc.status)
    # The link is in this response only (its token is stored as a hash).
    response = render(request, "frontend/team.html", _team_context(
        principal, invited=created.invitation, invitation_url=created.url,
        mailed=tenancy_services.invitation_is_mailed(created.invitation)))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def invitation_revoke_view(request, id: str):
    principal = principal_of(request, ADMIN)
    invitation = get_or_404(tenancy_selectors.invitation_get, organization=principal.organization,
                            invitation_id=id)
    error = ""
    try:
        invitation = tenancy_services.invitation_revoke(
            organization=principal.organization, actor=principal, invitation=invitation)
    except ApiError as exc:
        if exc.status == 403:
            raise PermissionDenied(exc.message) from None
        error = exc.message
    return render(request, "frontend/team.html#invitation-row",
                  _team_context(principal, invitation=invitation, row_error=error))


@login_required
@require_POST
def member_role(request, id: str):
    principal = principal_of(request, ADMIN)
    membership = get_or_404(tenancy_selectors.membership_get, organization=principal.organization,
                            membership_id=id)
    error = ""
    try:
        membership = tenancy_services.membership_set_role(
            organization=principal.organization, actor=principal, membership=membership,
            role=request.POST.get("role", ""))
    except ApiError as exc:
        error = exc.message
        membership.refresh_from_db()
    return render(request, "frontend/team.html#member-row",
                  _team_context(principal, member=membership, row_error=error))


@login_required
@require_POST
def member_remove(request, id: str):
    principal = principal_of(request, ADMIN)
    membership = get_or_404(tenancy_selectors.membership_get, organization=principal.organization,
                            membership_id=id)
    try:
        tenancy_services.membership_remove(organization=principal.organization, actor=principal,
                                           membership=membership)
    except ApiError as exc:
        return render(request, "frontend/team.html#member-row",
                      _team_context(principal, member=membership, row_error=exc.message))
    response = render(request, "frontend/team.html#member-row", {"removed": True})
    if membership.user_id == request.user.pk:  # left the organization: back to the overview
        response["HX-Redirect"] = "/"
    return response


# --- API keys --------------------------------------------------------------------------------------


def _can_revoke(principal: Principal, api_key) -> bool:
    own = principal.user is not None and api_key.created_by_id == principal.user.pk
    return api_key.revoked_at is None and (own or ADMIN in principal.scopes)


def _keys_context(principal: Principal, **extra) -> dict:
    keys = key_selectors.api_key_list(organization=principal.organization)[:200]
    return {"rows": [{"key": k, "can_revoke": _can_revoke(principal, k)} for k in keys],
            "can_create": TRAIN in principal.scopes,
            "scopes": [s for s in ALL_SCOPES if s in principal.scopes],
            "checked": [s for s in ALL_SCOPES if s in principal.scopes and s != ADMIN], **extra}


@login_required
def api_keys(request):
    principal = principal_of(request)
    if request.method != "POST":
        return render(request, "frontend/api_keys.html", _keys_context(principal))
    principal = principal_of(request, TRAIN)
    name = request.POST.get("name", "").strip()
    scopes = request.POST.getlist("scopes")
    days = request.POST.get("expires_in_days", "").strip()
    try:
        if not name or len(name) > 200:
            raise ApiError("Give the key a name (at most 200 characters).", code="invalid_name",
                           param="name")
        expires_at = None
        if days:
            if not days.isdigit() or not 1 <= int(days) <= MAX_KEY_DAYS:
                raise ApiError(f"Expiry must be a whole number of days from 1 to {MAX_KEY_DAYS}.",
                               code="invalid_expiry", param="expires_in_days")
            expires_at = timezone.now() + timedelta(days=int(days))
        created = api_key_create(organization=principal.organization, actor=principal, name=name,
                                 scopes=scopes, expires_at=expires_at)
    except ApiError as exc:
        return render(request, "frontend/api_keys.html", _keys_context(
            principal, create_error=exc.message, error_param=exc.param, values=request.POST,
            checked=scopes),
            status=exc.status)
    # The secret is in this response only; it is never stored or shown again.
    response = render(request, "frontend/api_keys.html", _keys_context(
        principal, created=created.plaintext, created_key=created.api_key))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def api_key_revoke_view(request, id: str):
    principal = principal_of(request)
    api_key = get_or_404(key_selectors.api_key_get, organization=principal.organization, key_id=id)
    error = ""
    try:
        api_key = api_key_revoke(organization=principal.organization, actor=principal,
                                 api_key=api_key)
    except ApiError as exc:
        if exc.status == 403:  # forged: the button is not shown to those who cannot revoke
            raise PermissionDenied(exc.message) from None
        error = exc.message
    return render(request, "frontend/api_keys.html#key-row", {
        "row": {"key": api_key, "can_revoke": _can_revoke(principal, api_key)}, "row_error": error})


# --- audit log -------------------------------------------------------------------------------------


@login_required
def audit_log(request):
    principal = principal_of(request, ADMIN)
    events = audit_event_list(organization=principal.organization).select_related("actor_user")
    page = Paginator(events, AUDIT_PAGE).get_page(request.GET.get("page"))
    return render(request, "frontend/audit.html", {"page": page})
