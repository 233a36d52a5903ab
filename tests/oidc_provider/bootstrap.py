"""Set the provider up: RSA key, database, its users, one confidential client for Tuneplex's
callback. Prints the client's id and secret, and each user's subject (``sub``), as JSON.

    OP_DATA_DIR=... python -m tests.oidc_provider.bootstrap REDIRECT_URI USERS_JSON

USERS_JSON: [{"username", "password", "email", "email_verified", "groups": [...]}, ...]. What the
provider says about each address (``email_verified``) is kept in OP_DATA_DIR/claims.json.
"""

import json
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

data = Path(os.environ["OP_DATA_DIR"])
data.mkdir(parents=True, exist_ok=True)
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
(data / "rsa.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.oidc_provider.settings")

import django  # noqa: E402

django.setup()
from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from oauth2_provider.models import Application  # noqa: E402

redirect_uri, users = sys.argv[1], json.loads(sys.argv[2])
call_command("migrate", verbosity=0)
subjects, claims = {}, {}
for spec in users:
    user = User.objects.create_user(spec["username"], email=spec["email"],
                                    password=spec["password"])
    for name in spec.get("groups", []):
        user.groups.add(Group.objects.get_or_create(name=name)[0])
    subjects[user.username] = str(user.pk)
    claims[user.username] = {"email_verified": spec.get("email_verified", True)}
(data / "claims.json").write_text(json.dumps(claims))
secret = "tuneplex-test-secret-" + "s" * 20
app = Application.objects.create(
    name="tuneplex", client_type=Application.CLIENT_CONFIDENTIAL,
    authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE, redirect_uris=redirect_uri,
    skip_authorization=True, algorithm=Application.RS256_ALGORITHM, client_secret=secret)
print(json.dumps({"client_id": app.client_id, "client_secret": secret, "subjects": subjects}))
