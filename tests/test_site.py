import os
import subprocess
import sys
from pathlib import Path

from django.test import Client

from tests.factories import PASSWORD

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args, env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG")}
    env.update(SANDBOX_ENV_FILE="/nonexistent", **env_overrides)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off():
    result = _manage("check", env_overrides={"DEBUG": "0"})
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_check_deploy_is_clean_in_the_production_configuration():
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env_overrides={"DEBUG": "0", "SECRET_KEY": "x" * 64 + "-production-like-secret-key", "SANDBOX_HTTPS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_the_openapi_schema_and_docs_are_served(api, owner):
    client = api.as_user(owner)
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/api/v1/vms/" in schema.content
    docs = Client()
    docs.login(username="owner", password=PASSWORD)
    page = docs.get("/api/docs/")
    assert page.status_code == 200
    assert b"cdn" not in page.content.lower()  # served locally: no internet needed


def test_unknown_api_paths_get_the_json_error_shape(db):
    response = Client().get("/api/v1/nothing-here/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_the_dashboard_needs_a_login_and_lists_vms(owner, vm):
    client = Client()
    assert client.get("/").status_code == 302
    response = client.post("/login/", {"username": "owner", "password": PASSWORD})
    assert response.status_code == 302
    page = client.get("/")
    assert b"owned-vm" in page.content


def test_the_tokens_page_creates_shows_once_and_revokes(owner):
    from accounts.models import ApiToken

    client = Client()
    client.login(username="owner", password=PASSWORD)
    page = client.post("/tokens/", {"name": "laptop"})
    token = ApiToken.objects.get(name="laptop")
    assert b"msb_" in page.content and b"shown only this once" in page.content
    again = client.get("/tokens/")
    assert b"shown only this once" not in again.content
    client.post(f"/tokens/{token.pk}/revoke/")
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_no_model_change_lacks_a_migration():
    result = _manage("makemigrations", "--check", "--dry-run", env_overrides={"DEBUG": "0", "SECRET_KEY": "x" * 50})
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_admin_page_renders_for_an_admin(admin_user, vm):
    from django.contrib import admin
    from django.urls import reverse

    client = Client()
    client.login(username=admin_user.username, password=PASSWORD)
    assert client.get("/admin/").status_code == 200
    for model in admin.site._registry:
        meta = model._meta
        url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        response = client.get(url)
        assert response.status_code == 200, url
    assert client.get(reverse("admin:vms_vm_change", args=[vm.pk])).status_code == 200


def test_browsers_asking_for_favicon_ico_get_the_dashboards_icon(client, admin_user):
    """The admin and the API docs name no icon, so browsers ask for /favicon.ico: no 404."""
    from django.contrib.staticfiles import finders
    from django.templatetags.static import static

    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"] == static("favicon.svg")
    assert finders.find("favicon.svg") is not None
    client.force_login(admin_user)
    assert f'<link rel="icon" href="{static("favicon.svg")}"' in client.get("/").content.decode()
