"""Rate limits: one budget per user (all tokens together), per client address for anonymous
calls, separate budgets for expensive actions; 429 with Retry-After in the error shape; a
pagination maximum; and fair scheduling of operations between owners."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from accounts.services import token_create
from tests.factories import TemplateFactory, VmFactory


@pytest.fixture(autouse=True)
def _fresh_budgets(settings):
    cache.clear()
    yield
    cache.clear()


def _token_client(user, name="t"):
    _, secret = token_create(user=user, name=name, actor=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def _assert_throttled(response):
    assert response.status_code == 429, response.content
    assert int(response["Retry-After"]) >= 1
    body = response.json()
    assert body["error"]["code"] == "throttled" and body["error"]["details"]["retry_after"] >= 1


def test_one_budget_per_user_whatever_the_token(owner, stranger, settings):
    settings.SANDBOX_RATE_LIMITS = {"user": "3/min"}
    first, second = _token_client(owner, "a"), _token_client(owner, "b")
    assert [first.get("/api/v1/vms/").status_code for _ in range(2)] == [200, 200]
    assert second.get("/api/v1/vms/").status_code == 200
    _assert_throttled(second.get("/api/v1/vms/"))  # a second token does not get a fresh budget
    _assert_throttled(first.get("/api/v1/vms/"))
    assert _token_client(stranger).get("/api/v1/vms/").status_code == 200  # other users are unaffected


def test_anonymous_calls_are_limited_per_client_address(settings):
    settings.SANDBOX_RATE_LIMITS = {"anon": "2/min"}
    here, there = APIClient(REMOTE_ADDR="203.0.113.1"), APIClient(REMOTE_ADDR="203.0.113.2")
    assert [here.get("/api/v1/vms/").status_code for _ in range(2)] == [401, 401]
    _assert_throttled(here.get("/api/v1/vms/"))
    _assert_throttled(here.get("/api/v1/vms/", HTTP_X_FORWARDED_FOR="198.51.100.99"))  # not the client's to choose
    assert there.get("/api/v1/vms/").status_code == 401


def test_expensive_actions_have_their_own_budget(owner, settings):
    settings.SANDBOX_RATE_LIMITS = {"user": "100/min", "create": "2/min"}
    settings.SANDBOX_NETWORKING = False
    template = TemplateFactory()
    client = _token_client(owner)
    for i in range(2):
        response = client.post(
            "/api/v1/vms/", {"name": f"v{i}", "template": template.name, "start": False}, format="json"
        )
        assert response.status_code == 202, response.content
    _assert_throttled(
        client.post("/api/v1/vms/", {"name": "v9", "template": template.name, "start": False}, format="json")
    )
    assert client.get("/api/v1/vms/").status_code == 200  # cheap calls still go through


@pytest.mark.parametrize(
    ("budget", "method", "path"),
    [
        ("exec", "post", "/api/v1/vms/{vm}/exec/"),
        ("upload", "put", "/api/v1/vms/{vm}/files/?path=/tmp/x"),
        ("snapshot", "post", "/api/v1/vms/{vm}/snapshots/"),
    ],
)
def test_each_expensive_action_is_limited(owner, settings, budget, method, path):
    settings.SANDBOX_RATE_LIMITS = {budget: "1/min"}
    vm = VmFactory(owner=owner, state="stopped")
    client = _token_client(owner)
    url = path.format(vm=vm.pk)
    first = getattr(client, method)(url, {}, format="json")
    assert first.status_code != 429
    _assert_throttled(getattr(client, method)(url, {}, format="json"))


def test_clone_is_limited(owner, settings):
    from tests.factories import SnapshotFactory

    settings.SANDBOX_RATE_LIMITS = {"clone": "1/min"}
    snapshot = SnapshotFactory(vm=VmFactory(owner=owner))
    client = _token_client(owner)
    assert client.post(f"/api/v1/snapshots/{snapshot.pk}/clone/", {"count": 0}, format="json").status_code != 429
    _assert_throttled(client.post(f"/api/v1/snapshots/{snapshot.pk}/clone/", {"count": 0}, format="json"))


def test_the_expensive_action_table_names_real_routes():
    from django.urls import get_resolver

    from sandbox_site.throttling import EXPENSIVE_ACTIONS

    found = set()

    def walk(patterns):
        for pattern in patterns:
            if hasattr(pattern, "url_patterns"):
                walk(pattern.url_patterns)
                continue
            cls = getattr(pattern.callback, "cls", None)
            for action in (getattr(pattern.callback, "actions", None) or {}).values():
                found.add((cls.__name__, action))

    walk(get_resolver().url_patterns)
    assert set(EXPENSIVE_ACTIONS) <= found


def test_limit_has_a_maximum(owner, settings):
    settings.SANDBOX_PAGE_MAX = 5
    for _ in range(7):
        VmFactory(owner=owner)
    client = _token_client(owner)
    body = client.get("/api/v1/vms/?limit=1000000").json()
    assert len(body["results"]) == 5 and body["count"] == 7


def test_a_refused_request_uses_up_no_budget(owner, settings):
    # Every budget of a request is checked, and charged only when all have room (one Redis
    # script): the refused create below costs nothing from the user's budget.
    settings.SANDBOX_RATE_LIMITS = {"user": "3/min", "create": "1/min"}
    settings.SANDBOX_NETWORKING = False
    template = TemplateFactory()
    client = _token_client(owner)
    body = {"name": "v1", "template": template.name, "start": False}
    assert client.post("/api/v1/vms/", body, format="json").status_code == 202
    _assert_throttled(client.post("/api/v1/vms/", {**body, "name": "v2"}, format="json"))
    assert [client.get("/api/v1/vms/").status_code for _ in range(2)] == [200, 200]
    _assert_throttled(client.get("/api/v1/vms/"))


def test_retry_after_is_when_the_oldest_request_leaves_the_window(owner, settings):
    settings.SANDBOX_RATE_LIMITS = {"user": "2/h"}
    client = _token_client(owner)
    assert [client.get("/api/v1/vms/").status_code for _ in range(2)] == [200, 200]
    refused = client.get("/api/v1/vms/")
    _assert_throttled(refused)
    assert 3500 <= int(refused["Retry-After"]) <= 3601
