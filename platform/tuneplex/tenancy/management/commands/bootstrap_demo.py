"""Create a demo organization, user and API key if none exist (README command 1 runs this)."""

import json
import os
import secrets

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from tuneplex.apikeys.selectors import api_key_list
from tuneplex.apikeys.services import api_key_create
from tuneplex.core.actors import Principal
from tuneplex.core.scopes import ALL_SCOPES
from tuneplex.tenancy.models import Membership, User
from tuneplex.tenancy.services import organization_create

DEMO_USERNAME = "demo"
DEMO_ORG = "Demo"
KEY_NAME = "demo key"


class Command(BaseCommand):
    help = ("Create the demo organization, user and API key if missing, and print how to sign in. "
            "Credentials are kept in <data dir>/demo-credentials.json (mode 0600).")

    def handle(self, *args, **options):
        path = settings.DATA_DIR / "demo-credentials.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        with transaction.atomic():
            user = User.objects.filter(username=DEMO_USERNAME).first()
            if user is None:
                password = secrets.token_urlsafe(12)
                user = User.objects.create_user(DEMO_USERNAME, password=password)
                saved = {"username": DEMO_USERNAME, "password": password}
            membership = Membership.objects.filter(user=user).select_related("organization").first()
            if membership is None:
                organization = organization_create(name=DEMO_ORG, owner=user)
                membership = Membership.objects.get(user=user, organization=organization)
            organization = membership.organization
            key_id = saved.get("api_key_id")
            key_alive = key_id and api_key_list(organization=organization).filter(
                id=key_id, revoked_at__isnull=True).exists()
            if not key_alive:
                actor = Principal.of_member(membership)
                created = api_key_create(organization=organization, actor=actor, name=KEY_NAME,
                                         scopes=list(ALL_SCOPES))
                saved.update({"api_key": created.plaintext, "api_key_id": created.api_key.id})
        path.touch(mode=0o600)
        os.chmod(path, 0o600)
        path.write_text(json.dumps(saved, indent=2))
        self.stdout.write(f"organization: {organization.name} ({organization.id})")
        self.stdout.write(f"username:     {saved.get('username', DEMO_USERNAME)}")
        self.stdout.write(f"password:     {saved.get('password', '(set earlier; see manage.py changepassword demo)')}")
        self.stdout.write(f"api key:      {saved['api_key']}")
