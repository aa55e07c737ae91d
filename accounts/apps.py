from django.apps import AppConfig
from django.db.models.signals import post_migrate, post_save


def _sync_roles(sender, **kwargs):
    from accounts.roles import roles_sync

    roles_sync()


def _personal_project(sender, instance, created, raw=False, **kwargs):
    if created and not raw:
        from accounts.services import project_personal_ensure

        project_personal_ensure(instance)


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        post_migrate.connect(_sync_roles, dispatch_uid="accounts.roles_sync")
        from django.contrib.auth import get_user_model

        # Every user has a personal project from the start, however the user was made
        # (accounts.services.user_create, bootstrap_admin, createsuperuser, the admin site).
        post_save.connect(_personal_project, sender=get_user_model(), dispatch_uid="accounts.personal_project")
