"""Error pages: styled, with the request id and a way back; the 500 page touches no database."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied
from django.test import Client
from django.urls import path

from sandbox_site import urls as site_urls


def _boom(request):
    raise RuntimeError("boom")


def _denied(request):
    raise PermissionDenied


urlpatterns = [path("boom/", _boom), path("api/v1/boom/", _boom), path("denied/", _denied), *site_urls.urlpatterns]
handler403 = "sandbox_site.views.permission_denied"
handler404 = "sandbox_site.views.not_found"
handler500 = "sandbox_site.views.server_error"

pytestmark = pytest.mark.urls(__name__)


def test_it_shows_a_styled_500_page_with_the_request_id_and_a_way_back_without_the_database():
    # No database access is allowed in this test: pytest-django makes any query fail it.
    response = Client(raise_request_exception=False).get("/boom/?x=1")
    assert response.status_code == 500
    html = response.content.decode()
    request_id = response["X-Request-ID"]
    assert request_id and f'id="request-id">{request_id}<' in html
    assert "css/app.css" in html and "Something went wrong" in html
    assert 'href="/boom/?x=1"' in html and 'href="/"' in html  # try again, back to the VMs


def test_the_request_id_is_ours_and_a_clients_is_kept_apart():
    response = Client(raise_request_exception=False).get("/boom/", headers={"X-Request-ID": "abc123"})
    assert response["X-Request-ID"] != "abc123" and response["X-Request-ID"] in response.content.decode()
    assert response["X-Client-Request-ID"] == "abc123"


def test_the_api_answers_500_in_its_error_shape_with_the_request_id():
    response = Client(raise_request_exception=False).get("/api/v1/boom/")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "server_error" and error["details"]["request_id"] == response["X-Request-ID"]


@pytest.mark.django_db
def test_404_and_403_pages_say_why_and_lead_back():
    client = Client()
    for url, status, title in (("/no-such-page/", 404, "Not found"), ("/denied/", 403, "Not allowed")):
        response = client.get(url)
        html = response.content.decode()
        assert response.status_code == status and title in html
        assert response["X-Request-ID"] in html and 'href="/"' in html
    assert Client().get("/api/v1/nothing/").json()["error"]["code"] == "not_found"
