import base64

from django.test import Client
from rest_framework.test import APIClient

from accounts.models import AuditEvent, LoginThrottle
from tests.factories import PASSWORD


def _login(username, password):
    return Client().post("/login/", {"username": username, "password": password})


def test_it_locks_an_account_after_repeated_failures(owner, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 3
    for _ in range(3):
        assert _login("owner", "wrong").status_code == 200  # form shown again
    response = _login("owner", PASSWORD)
    assert response.status_code == 200
    assert b"locked" in response.content
    assert LoginThrottle.objects.get(username="owner", address="127.0.0.1").locked_until is not None
    assert AuditEvent.objects.filter(action="auth.login_failed", result="denied").count() == 3
    assert AuditEvent.objects.filter(action="auth.login_locked").exists()


def test_lockout_also_stops_http_basic(owner, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 2
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"owner:wrong").decode())
    client.get("/api/v1/users/me/")
    client.get("/api/v1/users/me/")
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(f"owner:{PASSWORD}".encode()).decode())
    assert client.get("/api/v1/users/me/").status_code == 401


def test_it_unlocks_after_the_lockout_period(owner, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 1
    _login("owner", "wrong")
    from datetime import timedelta

    from django.utils import timezone

    LoginThrottle.objects.filter(username="owner").update(locked_until=timezone.now() - timedelta(seconds=1))
    response = _login("owner", PASSWORD)
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action="auth.login", actor_id=owner.pk).exists()


def test_a_successful_login_resets_the_count(owner, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 3
    _login("owner", "wrong")
    _login("owner", "wrong")
    assert _login("owner", PASSWORD).status_code == 302
    assert not LoginThrottle.objects.filter(username="owner").exists()


def test_admins_create_users_with_a_role(api, admin_user):
    response = api.as_user(admin_user).post(
        "/api/v1/users/", {"username": "newbie", "password": "a-long-enough-pass-42", "role": "viewer"}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["role"] == "viewer"
    assert AuditEvent.objects.filter(action="user.create", object_repr="newbie").exists()


def test_non_admins_cannot_create_users(api, operator, owner):
    for user in (operator, owner):
        response = api.as_user(user).post(
            "/api/v1/users/", {"username": "x", "password": "a-long-enough-pass-42", "role": "admin"}, format="json"
        )
        assert response.status_code == 403
    from django.contrib.auth import get_user_model

    assert not get_user_model().objects.filter(username="x").exists()


def test_it_rejects_weak_passwords_and_unknown_roles(api, admin_user):
    weak = api.as_user(admin_user).post(
        "/api/v1/users/", {"username": "w", "password": "123", "role": "user"}, format="json"
    )
    assert weak.status_code == 400
    assert "password" in weak.json()["error"]["details"]
    role = api.as_user(admin_user).post(
        "/api/v1/users/", {"username": "w", "password": "a-long-enough-pass-42", "role": "god"}, format="json"
    )
    assert role.status_code == 400


def test_me_shows_the_current_user(api, owner):
    body = api.as_user(owner).get("/api/v1/users/me/").json()
    assert body["username"] == "owner"
    assert body["role"] == "user"


def test_users_list_shows_only_yourself_unless_operator(api, owner, stranger, operator):
    assert [u["username"] for u in api.as_user(owner).get("/api/v1/users/").json()["results"]] == ["owner"]
    assert len(api.as_user(operator).get("/api/v1/users/").json()["results"]) == 3


def test_anonymous_requests_get_401_in_the_error_shape(db):
    response = APIClient().get("/api/v1/vms/")
    assert response.status_code in (401, 403)
    assert response.json()["error"]["code"] == "not_authenticated"
