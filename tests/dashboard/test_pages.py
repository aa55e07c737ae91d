"""Server-rendered dashboard pages (the browser tests drive them for real in tests/browser)."""

from django.test import Client
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from tests.factories import PASSWORD, TemplateFactory
from vms.models import VM


def _client(user):
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_every_page_renders_for_a_user(owner, vm):
    client = _client(owner)
    for url in ("/", "/vms/new/", f"/vms/{vm.pk}/", "/operations/", "/audit/", "/tokens/"):
        response = client.get(url)
        assert response.status_code == 200, url


def test_strangers_get_404_on_a_vm_page(stranger, vm):
    assert _client(stranger).get(f"/vms/{vm.pk}/").status_code == 404


def test_the_detail_page_shows_only_allowed_controls(grantee, vm):
    assign_perm("vms.view_vm", grantee, vm)
    page = _client(grantee).get(f"/vms/{vm.pk}/").content.decode()
    assert 'data-action="start"' not in page
    assert "You may not use this VM's console." in page
    assign_perm("vms.power_vm", grantee, vm)
    page = _client(grantee).get(f"/vms/{vm.pk}/").content.decode()
    assert 'data-action="start"' in page
    assert 'data-action="delete"' not in page


def test_the_create_form_shows_errors_inline_and_creates_nothing(owner):
    TemplateFactory()
    response = _client(owner).post("/vms/new/", {"name": "Bad Name!", "template": "test-template"})
    assert response.status_code == 200
    assert b"lowercase" in response.content.lower()
    response = _client(owner).post("/vms/new/", {"name": "big", "template": "test-template", "vcpus": 9})
    assert b"must be between 1 and 2" in response.content
    assert not VM.objects.exists()


def test_the_create_form_creates_a_vm(owner, django_capture_on_commit_callbacks):
    TemplateFactory()
    with django_capture_on_commit_callbacks(execute=False):
        response = _client(owner).post("/vms/new/", {"name": "web", "template": "test-template", "start": "on"})
    vm = VM.objects.get(name="web")
    assert response.status_code == 302 and response["Location"] == f"/vms/{vm.pk}/"
    assert AuditEvent.objects.filter(action="vm.create", object_id=str(vm.pk)).exists()


def test_viewers_see_no_create_button(viewer):
    assert b"New VM" not in _client(viewer).get("/").content


def test_the_audit_page_filters_and_reports_bad_input(owner, vm):
    client = Client()
    client.post("/login/", {"username": owner.username, "password": PASSWORD})
    assert b"auth.login" in client.get("/audit/?action=auth.*").content
    assert b"must be an ISO 8601" in client.get("/audit/?since=nope").content
