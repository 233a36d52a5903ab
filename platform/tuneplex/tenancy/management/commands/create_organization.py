"""Onboard a team: a new organization and its first owner (an operator's command)."""

import secrets
import sys

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tuneplex.tenancy.models import User
from tuneplex.tenancy.services import organization_create


class Command(BaseCommand):
    help = ("Create an organization and its first owner. A new owner account gets a generated "
            "password, printed once (or --password-stdin); --existing-owner makes an existing "
            "user the owner instead. The owner then invites the rest of the team.")

    def add_arguments(self, parser):
        parser.add_argument("name", help="the organization's name")
        parser.add_argument("--owner", required=True, help="the owner's username")
        parser.add_argument("--email", default="", help="the owner's email address (new owner)")
        parser.add_argument("--existing-owner", action="store_true",
                            help="the owner's account exists already")
        parser.add_argument("--password-stdin", action="store_true",
                            help="read the new owner's password from standard input")

    def handle(self, *args, name: str, owner: str, email: str, existing_owner: bool,
               password_stdin: bool, **options):
        name = name.strip()
        if not name or len(name) > 200:
            raise CommandError("The organization's name must be 1 to 200 characters.")
        password = None
        with transaction.atomic():
            user = User.objects.filter(username=owner).first()
            if existing_owner:
                if user is None:
                    raise CommandError(f"No user named {owner!r}.")
            else:
                if user is not None:
                    raise CommandError(f"A user named {owner!r} exists; pass --existing-owner to "
                                       "make them the owner.")
                password = (sys.stdin.readline().rstrip("\n") if password_stdin
                            else secrets.token_urlsafe(15))
                user = User(username=owner, email=email.strip().lower())
                try:
                    user.full_clean(exclude=["password"])
                    validate_password(password, user)
                except ValidationError as exc:
                    raise CommandError(" ".join(exc.messages)) from None
                user.set_password(password)
                user.save()
            organization = organization_create(name=name, owner=user)
        self.stdout.write(f"organization: {organization.name} ({organization.id}, "
                          f"slug {organization.slug})")
        self.stdout.write(f"owner:        {user.username}")
        if password is not None and not password_stdin:
            self.stdout.write(f"password:     {password}   (shown once; change it after "
                              "signing in)")
