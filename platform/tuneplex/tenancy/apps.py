from django.apps import AppConfig
from django.db.models.signals import post_save, pre_delete


def _revoke_keys_of_inactive_user(sender, instance, **kwargs) -> None:
    """A deactivated or deleted user's API keys are revoked, in every organization."""
    from tuneplex.tenancy.services import api_keys_revoke_of_user

    if kwargs.get("raw"):
        return
    if not instance.is_active or kwargs.get("signal") is pre_delete:
        api_keys_revoke_of_user(user=instance)


class TenancyConfig(AppConfig):
    name = "tuneplex.tenancy"
    label = "tenancy"

    def ready(self) -> None:
        from tuneplex.tenancy.models import User

        post_save.connect(_revoke_keys_of_inactive_user, sender=User,
                          dispatch_uid="tuneplex.tenancy.revoke_keys_on_deactivation")
        pre_delete.connect(_revoke_keys_of_inactive_user, sender=User,
                           dispatch_uid="tuneplex.tenancy.revoke_keys_on_delete")
