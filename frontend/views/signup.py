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

from tuneplex.tenancy.models import User
from tuneplex.tenancy.services import organization_create


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

    def clean(self):
        data = super().clean()
        if "password" in data and "username" in data:
            try:
                validate_password(data["password"], User(username=data["username"],
                                                         email=data.get("email", "")))
            except ValidationError as exc:
                self.add_error("password", exc)
        return data


def signup(request):
    if not settings.SIGNUP_ENABLED:
        raise Http404("Sign-up is off on this server; ask an operator or an admin to invite you.")
    if request.user.is_authenticated:
        return redirect("frontend:home")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        with transaction.atomic():
            user = User.objects.create_user(data["username"], email=data["email"].lower(),
                                            password=data["password"])
            organization = organization_create(name=data["organization"].strip(), owner=user)
            user.selected_organization = organization
            user.save(update_fields=["selected_organization"])
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("frontend:home")
    return render(request, "frontend/signup.html", {"form": form},
                  status=400 if request.method == "POST" else 200)
