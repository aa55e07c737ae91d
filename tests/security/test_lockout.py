"""Lockout as a weapon: wrong passwords from one address lock only that (account, address)
pair; the account as a whole is only slowed down; attempts are counted atomically (parallel
guesses cannot exceed the limit); operators and the console can unlock."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from accounts.models import AuditEvent, LoginThrottle
from tests.factories import PASSWORD


def _login(username, password, address="10.0.0.1"):
    return Client(REMOTE_ADDR=address).post("/login/", {"username": username, "password": password})


def test_an_attacker_cannot_lock_the_admin_out_from_another_address(admin_user, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 3
    for _ in range(10):
        _login("root", "wrong", address="203.0.113.9")
    assert b"locked" in _login("root", PASSWORD, address="203.0.113.9").content  # the attacker's pair is locked
    assert _login("root", PASSWORD, address="198.51.100.7").status_code == 302  # the admin still gets in


def test_many_addresses_only_slow_the_account_down(owner, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 100
    settings.SANDBOX_LOGIN_ACCOUNT_CEILING = 5
    settings.SANDBOX_LOGIN_BACKOFF_MAX_SECONDS = 30
    for i in range(5):
        _login("owner", "wrong", address=f"203.0.113.{i}")
    account = LoginThrottle.objects.get(username="owner", address="")
    assert account.next_attempt_at is not None and account.next_attempt_at <= timezone.now() + timedelta(seconds=30)
    assert account.locked_until is None  # never locked, only delayed
    response = _login("owner", PASSWORD, address="198.51.100.7")
    assert response.status_code == 200 and b"Try again in" in response.content  # during the back-off
    LoginThrottle.objects.filter(username="owner", address="").update(next_attempt_at=timezone.now())
    assert _login("owner", PASSWORD, address="198.51.100.7").status_code == 302  # the delay passed: in


@pytest.mark.django_db(transaction=True)
def test_parallel_guesses_never_exceed_the_limit(owner, settings):
    if connection.vendor != "postgresql":
        pytest.skip("parallel connections need PostgreSQL")
    settings.SANDBOX_LOCKOUT_THRESHOLD = 3
    from django.contrib.auth import authenticate

    checked = []
    barrier = threading.Barrier(20)

    def guess():
        try:
            barrier.wait(10)
            request = type("R", (), {"META": {"REMOTE_ADDR": "203.0.113.50"}})()
            authenticate(request, username="owner", password="wrong")
        finally:
            connection.close()

    from django.contrib.auth.backends import ModelBackend

    original = ModelBackend.authenticate

    def counting(self, request, **kwargs):
        checked.append(1)
        return original(self, request, **kwargs)

    ModelBackend.authenticate = counting
    try:
        threads = [threading.Thread(target=guess) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        ModelBackend.authenticate = original
    assert len(checked) == 3  # exactly THRESHOLD passwords were checked, however parallel
    assert LoginThrottle.objects.get(username="owner", address="203.0.113.50").locked_until is not None


def test_operators_unlock_through_the_api(api, owner, operator, stranger, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 1
    _login("owner", "wrong")
    assert LoginThrottle.objects.filter(username="owner").exists()
    assert api.as_user(stranger).post(f"/api/v1/users/{owner.pk}/unlock/").status_code == 404
    assert api.as_user(owner).post(f"/api/v1/users/{owner.pk}/unlock/").status_code == 403
    assert AuditEvent.objects.filter(action="auth.unlock", result="denied").exists()
    assert api.as_user(operator).post(f"/api/v1/users/{owner.pk}/unlock/").status_code == 200
    assert not LoginThrottle.objects.filter(username="owner").exists()
    assert AuditEvent.objects.get(action="auth.unlock", result="ok").actor_id == operator.pk
    assert _login("owner", PASSWORD).status_code == 302


def test_operators_unlock_in_the_admin(operator, owner, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 1
    _login("owner", "wrong")
    client = Client()
    client.login(username="operator", password=PASSWORD)
    ids = list(LoginThrottle.objects.filter(username="owner").values_list("pk", flat=True))
    response = client.post(
        "/admin/accounts/loginthrottle/", {"action": "unlock", "_selected_action": ids}, follow=False
    )
    assert response.status_code in (200, 302), response.content[:500]
    assert not LoginThrottle.objects.filter(username="owner").exists()


def test_the_admin_can_always_unlock_from_the_console(admin_user, settings):
    settings.SANDBOX_LOCKOUT_THRESHOLD = 1
    settings.SANDBOX_LOGIN_ACCOUNT_CEILING = 1
    _login("root", "wrong", address="10.0.0.5")
    _login("root", "wrong", address="10.0.0.6")
    call_command("unlock_user", "root")
    assert _login("root", PASSWORD, address="10.0.0.5").status_code == 302
    row = AuditEvent.objects.get(action="auth.unlock")
    assert row.actor_id is None and "console" in row.message
