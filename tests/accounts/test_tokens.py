import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiToken, AuditEvent
from tests.factories import PASSWORD


def bearer(secret):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def basic(user):
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION="Basic " + __import__("base64").b64encode(f"{user.username}:{PASSWORD}".encode()).decode()
    )
    return client


def create_token(user, **body):
    response = basic(user).post("/api/v1/tokens/", {"name": "ci", **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_it_shows_the_secret_once_and_stores_only_its_hash(owner):
    body = create_token(owner)
    secret = body["token"]
    row = ApiToken.objects.get(pk=body["id"])
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(ApiToken.objects.filter(pk=row.pk).values().first())
    listed = basic(owner).get("/api/v1/tokens/").json()["results"]
    assert listed and "token" not in listed[0]
    assert AuditEvent.objects.filter(action="token.create", object_id=str(row.pk)).exists()


def test_it_authenticates_with_a_bearer_token_and_records_last_use(owner):
    body = create_token(owner)
    response = bearer(body["token"]).get("/api/v1/users/me/")
    assert response.status_code == 200
    assert response.json()["username"] == "owner"
    assert ApiToken.objects.get(pk=body["id"]).last_used_at is not None


def test_it_rejects_unknown_tokens_with_the_error_shape(db):
    response = bearer("msb_nope").get("/api/v1/vms/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_it_rejects_expired_tokens(owner):
    body = create_token(owner, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    ApiToken.objects.filter(pk=body["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert bearer(body["token"]).get("/api/v1/users/me/").status_code == 401


def test_it_refuses_an_expiry_in_the_past(owner):
    response = basic(owner).post("/api/v1/tokens/", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, format="json")
    assert response.status_code == 400
    assert not ApiToken.objects.exists()


def test_it_rejects_revoked_tokens(owner):
    body = create_token(owner)
    assert basic(owner).delete(f"/api/v1/tokens/{body['id']}/").status_code == 204
    assert bearer(body["token"]).get("/api/v1/users/me/").status_code == 401
    assert AuditEvent.objects.filter(action="token.revoke", object_id=body["id"]).exists()


def test_it_keeps_read_only_tokens_to_safe_methods(owner, vm):
    body = create_token(owner, read_only=True)
    client = bearer(body["token"])
    assert client.get(f"/api/v1/vms/{vm.pk}/").status_code == 200
    response = client.post(f"/api/v1/vms/{vm.pk}/start/", {}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_it_never_lets_a_token_do_more_than_its_owner(owner, stranger, vm):
    body = create_token(stranger)
    client = bearer(body["token"])
    assert client.get(f"/api/v1/vms/{vm.pk}/").status_code == 404
    assert client.post(f"/api/v1/vms/{vm.pk}/start/", {}, format="json").status_code == 404
    stranger.is_active = False
    stranger.save()
    assert client.get("/api/v1/users/me/").status_code == 401


def test_it_does_not_let_a_token_mint_tokens(owner):
    body = create_token(owner)
    response = bearer(body["token"]).post("/api/v1/tokens/", {"name": "more"}, format="json")
    assert response.status_code == 403
    assert ApiToken.objects.count() == 1


def test_it_hides_other_users_tokens(owner, stranger):
    body = create_token(owner)
    assert basic(stranger).get("/api/v1/tokens/").json()["results"] == []
    assert basic(stranger).delete(f"/api/v1/tokens/{body['id']}/").status_code == 404
    assert ApiToken.objects.get(pk=body["id"]).revoked_at is None


def test_it_records_the_token_on_audit_rows(owner, vm):
    body = create_token(owner)
    bearer(body["token"]).patch(f"/api/v1/vms/{vm.pk}/", {"name": "via-token"}, format="json")
    event = AuditEvent.objects.get(action="vm.update")
    assert str(event.token_id) == body["id"]
    assert event.source_ip == "127.0.0.1"
    assert event.request_id


@pytest.mark.parametrize("header", ["Bearer", "Bearer a b", "Bearer \xff"])
def test_it_rejects_malformed_bearer_headers(db, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert client.get("/api/v1/users/me/").status_code == 401
