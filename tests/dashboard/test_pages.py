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
    assert "you see the console but cannot type" in page
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


# --- pages that follow state and rights (issue 11) ----------------------------------------


def _buttons(page: str) -> dict[str, bool]:
    """{action: enabled} of the page's action buttons (the first button of each action)."""
    import re

    found: dict[str, bool] = {}
    for attrs in re.findall(r"<button ([^>]*data-action=[^>]*)>", page):
        action = re.search(r'data-action="([^"]+)"', attrs).group(1)
        found.setdefault(action, " disabled" not in attrs)
    return found


def test_it_enables_only_the_actions_the_state_allows_in_the_list(owner):
    from tests.factories import VmFactory

    VmFactory(owner=owner, name="up", state="running")
    page = _client(owner).get("/").content.decode()
    assert _buttons(page) == {"start": False, "stop": True}
    VM.objects.filter(name="up").update(state="stopped")
    assert _buttons(_client(owner).get("/").content.decode()) == {"start": True, "stop": False}
    VM.objects.filter(name="up").update(state="snapshotting")
    assert _buttons(_client(owner).get("/").content.decode()) == {"start": False, "stop": False}


def test_it_shows_no_row_actions_without_the_power_right(grantee, vm):
    assign_perm("vms.view_vm", grantee, vm)
    page = _client(grantee).get("/").content.decode()
    assert vm.name in page and 'data-action="start"' not in page
    assert 'data-shared="1"' in page  # the page subscribes to shared VMs' events


def test_the_list_and_the_overview_show_the_ip_address(owner, settings):
    from networking.services import nic_allocate
    from tests.factories import VmFactory

    settings.SANDBOX_NETWORKING = True
    vm = VmFactory(owner=owner, name="net", state="running")
    nic = nic_allocate(vm=vm)
    ip = str(vm.nics.get().ip)
    assert ip and nic
    assert f"<code>{ip}</code>" in _client(owner).get("/").content.decode()
    assert f"<code>{ip}</code>" in _client(owner).get(f"/vms/{vm.pk}/").content.decode()


def test_the_list_renders_the_state_table_for_live_updates(owner, vm):
    import json
    import re

    page = _client(owner).get("/").content.decode()
    table = json.loads(re.search(r'<script id="state-actions" type="application/json">(.*?)</script>', page).group(1))
    assert "start" in table["stopped"] and "start" not in table["running"]
    assert table["snapshotting"] == []


def test_the_detail_page_enables_actions_by_state(owner):
    from tests.factories import VmFactory

    vm = VmFactory(owner=owner, name="run", state="running")
    buttons = _buttons(_client(owner).get(f"/vms/{vm.pk}/").content.decode())
    assert buttons == {
        "start": False,
        "stop": True,
        "reboot": True,
        "pause": True,
        "resume": False,
        "delete": True,
    }
    VM.objects.filter(pk=vm.pk).update(state="creating")
    buttons = _buttons(_client(owner).get(f"/vms/{vm.pk}/").content.decode())
    assert buttons["start"] is False and buttons["reboot"] is False and buttons["delete"] is True


def test_resize_is_offered_on_a_running_vm_only_when_the_driver_can_live_resize(owner):
    from tests.factories import VmFactory

    qemu = VmFactory(owner=owner, name="q", state="running", driver="qemu")
    page = _client(owner).get(f"/vms/{qemu.pk}/").content.decode()
    assert '<fieldset id="resize-fields" class="bare" disabled>' in page
    assert 'data-states="stopped"' in page and "cannot resize a running VM" in page
    VM.objects.filter(pk=qemu.pk).update(state="stopped")
    assert '<fieldset id="resize-fields" class="bare">' in _client(owner).get(f"/vms/{qemu.pk}/").content.decode()
    fake = VmFactory(owner=owner, name="f", state="running", driver="fake")  # live_resize=True
    page = _client(owner).get(f"/vms/{fake.pk}/").content.decode()
    assert '<fieldset id="resize-fields" class="bare">' in page
    assert {"running", "paused", "stopped"} <= set(page.split('data-states="', 1)[1].split('"', 1)[0].split(","))


def test_a_view_only_viewer_gets_the_read_only_console_and_no_exec_files_or_snapshot_tabs(grantee, vm):
    assign_perm("vms.view_vm", grantee, vm)
    page = _client(grantee).get(f"/vms/{vm.pk}/").content.decode()
    assert 'id="tab-console"' in page and 'id="console-term"' in page
    assert "you see the console but cannot type" in page
    for hidden in ("tab-exec", "tab-files", "tab-snapshots", "console-takeover", "console-cad", 'data-keys="ctrl-c"'):
        assert hidden not in page, hidden
    assert "You may not" not in page
    assign_perm("vms.exec_vm", grantee, vm)
    assign_perm("vms.console_vm", grantee, vm)
    page = _client(grantee).get(f"/vms/{vm.pk}/").content.decode()
    assert 'id="tab-exec"' in page and 'id="tab-files"' in page and 'id="console-takeover"' in page
    assert 'id="tab-snapshots"' not in page


def test_the_owner_sees_every_tab_and_the_file_manager(owner, vm, settings):
    settings.SANDBOX_FILE_UPLOAD_MAX_BYTES = 5 << 20
    page = _client(owner).get(f"/vms/{vm.pk}/").content.decode()
    for tab in ("overview", "console", "exec", "files", "snapshots", "network", "operations", "audit", "sharing"):
        assert f'id="tab-{tab}"' in page, tab
    assert 'data-upload-max="5242880"' in page and "5.0\xa0MB" in page
    assert 'id="files-drop"' in page and "js/files.js" in page


def test_the_overview_shows_the_running_operation(owner, vm):
    from vms.operations import operation_log, operation_new

    VM.objects.filter(pk=vm.pk).update(state="starting")
    op = operation_new(vm=vm, action="start", actor=owner)
    operation_log(op, "waiting for the guest agent", progress=60)
    page = _client(owner).get(f"/vms/{vm.pk}/").content.decode()
    assert f'data-op="{op.pk}"' in page and 'data-progress="60"' in page and 'data-action="start"' in page
    assert 'id="vm-progress" aria-labelledby="vm-progress-title" hidden' not in page


def test_the_create_form_is_filled_with_the_template_defaults(owner):
    import json
    import re

    from vms.models import Template

    Template.objects.update(is_active=False)
    TemplateFactory(vcpus=2, memory_mib=384, disk_gib=3)
    page = _client(owner).get("/vms/new/").content.decode()
    assert '<input type="number" name="vcpus" value="2"' in page
    assert '<input type="number" name="memory_mib" value="384"' in page
    assert '<input type="number" name="disk_gib" value="3"' in page
    defaults = json.loads(re.search(r'<script id="template-defaults" type="application/json">(.*?)</script>', page)[1])
    assert defaults["test-template"]["disk_gib"] == 3 and defaults["test-template"]["max_vcpus"] == 2


def test_operation_progress_is_published_to_the_vm_page(owner, vm, monkeypatch):
    from vms import events
    from vms.models import Operation
    from vms.operations import operation_log, operation_new

    sent = []
    monkeypatch.setattr(events, "_publish", lambda vm_id, owner_id, message: sent.append((vm_id, owner_id, message)))
    op = operation_new(vm=vm, action="start", actor=owner)
    Operation.objects.filter(pk=op.pk).update(status="running")
    op.refresh_from_db()
    operation_log(op, "waiting for the guest agent", progress=40)
    vm_id, owner_id, message = sent[-1]
    assert (str(vm_id), owner_id) == (str(vm.pk), owner.pk)
    assert message["kind"] == "operation" and message["vm"] == str(vm.pk)
    assert message["operation"]["step"] == "waiting for the guest agent"
    assert message["operation"]["progress"] == 40 and message["operation"]["action"] == "start"
    assert message["operation"]["elapsed"] >= 0


def test_operation_step_drops_the_time_stamp():
    from vms.events import operation_step

    assert operation_step("08:00:01 launching\n08:00:03 waiting for the guest agent\n") == "waiting for the guest agent"
    assert operation_step("") == ""


def _template_with_a_diskless_image():
    from tests.factories import ImageFactory
    from vms.models import Image

    image = ImageFactory(name="windows-like", status=Image.Status.MISSING)
    return TemplateFactory(name="a-diskless", image=image)


def test_the_create_form_marks_templates_whose_image_has_no_disk(owner):
    """The migrated windows-default template waits for an operator's disk (the API would answer
    409): its option says so, and the form starts on a template that can boot."""
    import re

    TemplateFactory()
    _template_with_a_diskless_image()  # sorts first
    page = _client(owner).get("/vms/new/").content.decode()
    assert '<option value="windows-default">windows-default — its image has no disk yet</option>' in page
    assert '<option value="a-diskless">a-diskless — its image has no disk yet</option>' in page
    selected = re.search(r'<option value="([^"]+)" selected>([^<]*)</option>', page)
    assert selected is not None and "its image" not in selected[2]


def test_the_create_form_marks_deprecated_template_images(owner):
    from django.utils import timezone

    from tests.factories import ImageFactory

    TemplateFactory(name="old", image=ImageFactory(name="old-image", deprecated_at=timezone.now()))
    page = _client(owner).get("/vms/new/").content.decode()
    assert '<option value="old">old — its image is deprecated</option>' in page


def test_the_create_form_refuses_a_diskless_template_before_the_api_does(owner):
    response = _client(owner).post("/vms/new/", {"name": "win", "template": "windows-default"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "Template windows-default&#x27;s image windows has no disk yet" in page
    assert 'class="field has-error"' in page and 'id="vm-create-form"' in page
    assert not VM.objects.exists()


def test_the_create_form_takes_a_diskless_template_with_another_image(owner, django_capture_on_commit_callbacks):
    _template_with_a_diskless_image()
    TemplateFactory()  # its image test-image is ready
    with django_capture_on_commit_callbacks(execute=False):
        response = _client(owner).post(
            "/vms/new/", {"name": "win", "template": "a-diskless", "image": "test-image", "start": "on"}
        )
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert VM.objects.filter(name="win").exists()


def test_the_network_tab_manages_nics_for_who_may_change_and_the_list_shows_the_primary_address(
    owner, grantee, operator, vm
):
    from networking import services

    lab = services.network_create(name="lab", cidr="10.231.60.0/24", actor=operator)
    services.nic_allocate(vm=vm)
    services.nic_allocate(vm=vm, network=lab)
    assert 'id="nic-form"' in _client(owner).get(f"/vms/{vm.pk}/").content.decode()
    assign_perm("vms.view_vm", grantee, vm)
    assert 'id="nic-form"' not in _client(grantee).get(f"/vms/{vm.pk}/").content.decode()
    home = _client(owner).get("/").content.decode()
    row = home[home.index("<td data-ip>") :].split("</td>")[0]
    assert "<code>10.231.0.2</code>" in row and "10.231.60.2</code>" not in row
    assert "+1" in row and 'title="10.231.0.2, 10.231.60.2"' in row


# --- projects: the switcher -----------------------------------------------------------------


def test_the_project_switcher_shows_one_project_and_creates_in_it(
    owner, grantee, vm, django_capture_on_commit_callbacks
):
    from accounts import services as account_services

    team = account_services.project_create(name="Team", slug="team", actor=grantee)
    account_services.project_member_set(project=team, user=owner, role="member", actor=grantee)
    from tests.factories import VmFactory

    VmFactory(owner=grantee, name="team-vm", project=team, state="stopped")
    client = _client(owner)
    page = client.get("/").content.decode()
    assert "owned-vm" in page and "team-vm" in page  # all projects
    assert 'data-action="start"' in page  # a member powers the project's VMs
    page = client.get("/?project=team").content.decode()
    assert "team-vm" in page and "owned-vm" not in page
    assert "team-vm" in client.get("/").content.decode()  # kept in the session
    TemplateFactory()
    assert b"Limits of project Team" in client.get("/vms/new/").content
    with django_capture_on_commit_callbacks(execute=False):
        client.post("/vms/new/", {"name": "made-in-team", "template": "test-template"})
    assert VM.objects.get(name="made-in-team").project == team
    assert "owned-vm" in client.get("/?project=").content.decode()


def test_the_switcher_forgets_a_project_the_user_cannot_see(owner, stranger):
    from accounts import services as account_services

    account_services.project_create(name="Theirs", slug="theirs", actor=stranger)
    client = _client(owner)
    assert client.get("/?project=theirs").status_code == 200
    assert client.session.get("current_project") is None
