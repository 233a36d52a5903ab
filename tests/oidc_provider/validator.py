import json
import os
from pathlib import Path

from oauth2_provider.oauth2_validators import OAuth2Validator


class GroupsValidator(OAuth2Validator):
    """Adds the user's name, email (and whether the provider verified it, as the test set it up
    in claims.json) and groups to the ID token and the userinfo answer."""

    oidc_claim_scope = None  # every claim, whatever the scopes asked

    def get_additional_claims(self, request):
        user = request.user
        extra = json.loads((Path(os.environ["OP_DATA_DIR"]) / "claims.json").read_text())
        return {"preferred_username": user.username, "email": user.email,
                **extra.get(user.username, {}),
                "groups": sorted(user.groups.values_list("name", flat=True))}
