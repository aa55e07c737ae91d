from django.apps import AppConfig


class GuestAgentsConfig(AppConfig):
    name = "guest_agents"
    default_auto_field = "django.db.models.BigAutoField"
