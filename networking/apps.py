from django.apps import AppConfig
from django.db.models.signals import post_migrate

# Global permissions operators hold on networks. Interim: they belong in
# accounts.roles.ROLE_GLOBAL_PERMS[Role.OPERATOR]; until they are there, this handler adds
# them after accounts' roles_sync (which runs first: accounts is earlier in INSTALLED_APPS,
# and post_migrate receivers run in connection order for every app).
OPERATOR_NETWORK_PERMS = ("add_network", "change_network", "delete_network", "view_network", "use_network")


def _grant_operator_network_perms(sender, **kwargs):
    from django.contrib.auth.models import Group, Permission

    from accounts.models import Role

    group = Group.objects.filter(name=Role.OPERATOR).first()
    if group is None:
        return
    perms = Permission.objects.filter(content_type__app_label="networking", codename__in=OPERATOR_NETWORK_PERMS)
    group.permissions.add(*perms)


class NetworkingConfig(AppConfig):
    name = "networking"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        post_migrate.connect(_grant_operator_network_perms, dispatch_uid="networking.operator_perms")
