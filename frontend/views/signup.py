"""Self-service sign-up (TUNEPLEX_SIGNUP, off by default): a new user and a new organization."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme

from tuneplex.core.errors import ApiError
from tuneplex.tenancy.models import User
from tuneplex.tenancy.selectors import email_in_use
from tuneplex.tenancy.services import EMAIL_TAKEN, organization_create, user_create


class SignupForm(forms.Form):
    username = forms.RegexField(regex=r"^[\w.@+-]+\Z", max_length=150,
                                error_messages={"invalid": "Letters, digits and @ . + - _ only."})
    email = forms.EmailField(max_length=254)
    password = forms.CharField(widget=forms.PasswordInput, max_length=256, strip=False)
    organization = forms.CharField(max_length=200, label="Organization name")

    def clean_username(self) -> str:
        username = self.cleaned_data["username"]
        if User.objects.filter(username__iexact=username).exists():
            raise ValidationError("That username is taken.")
        return username

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip().lower()
        if email_in_use(email):
            raise ValidationError(EMAIL_TAKEN, code="email_taken")
        return email

    def clean(self):
        data = super().clean()
        if "password" in data and "username" in data:
            try:
                validate_password(data["password"], User(username=data["username"],
                                                         email=data.get("email", "")))
            except ValidationError as exc:
                self.add_error("password", exc)
        return data


def _next_url(request) -> str | None:
    """Where to go after signing up (an invitation link, say): a path on this site only."""
    wanted = request.POST.get("next") or request.GET.get("next") or ""
    if wanted and url_has_allowed_host_and_scheme(wanted, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return wanted
    return None


def signup(request):
    if not settings.SIGNUP_ENABLED:
        raise Http404("Sign-up is off on this server; ask an operator or an admin to invite you.")
    if request.user.is_authenticated:
        return redirect(_next_url(request) or "frontend:home")
    form = SignupForm(request.POST or None)
    context = {"form": form, "next": _next_url(request) or ""}
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            with transaction.atomic():
                user = user_create(username=data["username"], email=data["email"],
                                   password=data["password"])
                organization = organization_create(name=data["organization"].strip(), owner=user)
                user.selected_organization = organization
                user.save(update_fields=["selected_organization"])
        except ApiError as exc:  # taken meanwhile by another sign-up
            form.add_error(exc.param, exc.message)
            return render(request, "frontend/signup.html", context, status=exc.status)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect(_next_url(request) or "frontend:home")
    return render(request, "frontend/signup.html", context,
                  status=400 if request.method == "POST" else 200)
