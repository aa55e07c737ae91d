"""Every object endpoint of the API and the websockets, declared as tables for the one
permission matrix (tests/permission_matrix.py): owner, grantee (exactly the right needed),
grantee without it, viewer role, operator, stranger and anonymous on each endpoint+method.
``test_every_object_endpoint_has_a_matrix_row`` fails when a route is added without a row."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from tests.factories import SnapshotFactory, UserFactory, VmFactory
from tests.hostd.runner import Hostd
from tests.permission_matrix import (
    ACCEPTED,
    Endpoint,
    PermissionMatrix,
    Target,
    WebsocketPermissionMatrix,
    covered_routes,
    object_routes,
)
from vms.models import VM, Operation

VM_RIGHTS = ("view", "change", "delete", "power", "console", "exec", "snapshot")


class VmRights:
    """Tables whose rights are the VM's (snapshots, exec, files, port forwards follow their VM)."""

    rights = VM_RIGHTS

    def grant(self, user, rights, target):
        for right in rights:
            assign_perm(f"vms.{right}_vm", user, target.objects["vm"])


# --- VMs and consoles --------------------------------------------------------------------

E = Endpoint
V = "/api/v1/vms/{vm}/"


class TestVmEndpoints(VmRights, PermissionMatrix):
    endpoints = (
        E("retrieve", "get", V, "view"),
        E("operations", "get", V + "operations/", "view"),
        E("permissions", "get", V + "permissions/", "view"),
        E("samples", "get", V + "samples/", "view"),
        E("agent", "get", V + "agent/", "view", status=409),  # allowed; the VM is stopped
        E("console-ticket", "post", V + "console-ticket/", "view", {}, status=201, audit="console.ticket"),
        E("console-log", "get", V + "console/log/", "view"),
        E("rename", "patch", V, "change", {"name": "renamed"}, audit="vm.update"),
        E("resize", "patch", V, "change", {"vcpus": 2}, audit="vm.resize", state="stopped"),
        E("start", "post", V + "start/", "power", {}, status=202, audit="vm.start", state="stopped"),
        E("stop", "post", V + "stop/", "power", {}, status=202, audit="vm.stop", state="running"),
        E("reboot", "post", V + "reboot/", "power", {}, status=202, audit="vm.reboot", state="running"),
        E("pause", "post", V + "pause/", "power", {}, status=202, audit="vm.pause", state="running"),
        E("resume", "post", V + "resume/", "power", {}, status=202, audit="vm.resume", state="paused"),
        E(
            "grant",
            "post",
            V + "permissions/",
            "change",
            {"user": "other", "permissions": ["view_vm"]},
            audit="permission.grant",
        ),
        E("revoke", "delete", V + "permissions/", "change", {"user": "other"}, audit="permission.revoke"),
        E("delete", "delete", V, "delete", status=202, audit="vm.delete", state="stopped"),
    )

    @pytest.fixture
    def target(self, owner, settings):
        vm = VmFactory(owner=owner, name="owned-vm")
        UserFactory(username="other")
        root = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))  # hostd's socket path is short
        settings.SANDBOX_RUNTIME_DIR = root
        settings.SANDBOX_HOSTD_SOCKET = root / "hostd.sock"
        (root / str(vm.pk)).mkdir()
        (root / str(vm.pk) / "serial.log").write_bytes(b"login: ")
        hostd = Hostd(root).start()  # the console log download comes from the VM's host's hostd
        yield Target(owner, {"vm": vm})
        hostd.stop()
        shutil.rmtree(root, ignore_errors=True)


class TestVmMoveEndpoint(PermissionMatrix):
    """Moving a VM to another host is an operator's action: the VM's own rights (even all of
    them) are not enough; ``move`` here is the global ``vms.change_host`` of the operator role."""

    rights = (*VM_RIGHTS, "move")
    owner_rights = VM_RIGHTS
    endpoints = (
        E("move", "post", V + "move/", "move", {"host": "matrix-target"}, status=202, audit="vm.move", state="stopped"),
    )

    @pytest.fixture
    def target(self, owner):
        from django.utils import timezone

        from tests.factories import HostFactory

        now = timezone.now()
        HostFactory(name="matrix-target", cpus=4, memory_mib=8192, last_seen_at=now, hostd_seen_at=now)
        vm = VmFactory(owner=owner, name="owned-vm")
        return Target(owner, {"vm": vm})

    def grant(self, user, rights, target):
        for right in rights:
            if right == "move":
                assign_perm("vms.change_host", user)
            else:
                assign_perm(f"vms.{right}_vm", user, target.objects["vm"])


class TestConsoleWebsocket(VmRights, WebsocketPermissionMatrix):
    endpoints = (
        # Connecting needs the view right (typing needs console: tests/vms/test_console_consumer.py).
        E("console", "ws", "/ws/vms/{vm}/console/", "view", status=ACCEPTED, state="running"),
        # Allowed, then refused because the VM is stopped (4409).
        E("exec-attach", "ws", "/ws/vms/{vm}/execs/abc/", "exec", status=4409, state="stopped"),
        E("events-subscribe", "ws", "/ws/vms/events/", "view", {"subscribe": "{vm}"}),
    )

    @pytest.fixture
    def target(self, owner, settings, tmp_path):
        from django.core.cache import cache

        cache.clear()
        vm = VmFactory(owner=owner, name="owned-vm")
        settings.SANDBOX_RUNTIME_DIR = tmp_path
        (tmp_path / str(vm.pk)).mkdir()
        return Target(owner, {"vm": vm})


# --- exec and files ----------------------------------------------------------------------

OCTETS = "application/octet-stream"


class TestExecAndFileEndpoints(VmRights, PermissionMatrix):
    """Allowed requests pass the check and are refused because the VM is stopped (409): the
    rights are checked before anything reaches the guest."""

    endpoints = tuple(
        E(name, method, V + suffix, "exec", body, status=409, state="stopped", content_type=ctype)
        for name, method, suffix, body, ctype in (
            ("exec", "post", "exec/", {"command": "true"}, None),
            ("execs", "get", "execs/", None, None),
            ("exec-detail", "get", "execs/abc/", None, None),
            ("stdin", "post", "execs/abc/stdin/", {"data": "x"}, None),
            ("signal", "post", "execs/abc/signal/", {"signal": "TERM"}, None),
            ("file-put", "put", "files/?path=/root/x", b"data", OCTETS),
            ("file-get", "get", "files/?path=/etc/hostname", None, None),
            ("file-delete", "delete", "files/?path=/tmp/x", None, None),
            ("file-stat", "get", "files/stat/?path=/", None, None),
            ("file-list", "get", "files/list/?path=/", None, None),
            ("file-mkdir", "post", "files/mkdir/", {"path": "/tmp/d"}, None),
        )
    )

    @pytest.fixture
    def target(self, owner):
        return Target(owner, {"vm": VmFactory(owner=owner, name="owned-vm")})


# --- snapshots ---------------------------------------------------------------------------

S = "/api/v1/snapshots/{snapshot}/"


class TestSnapshotEndpoints(VmRights, PermissionMatrix):
    endpoints = (
        E("vm-snapshots", "get", V + "snapshots/", "view"),
        E(
            "vm-snapshot-create",
            "post",
            V + "snapshots/",
            "snapshot",
            {"name": "s2", "include_memory": False},
            status=202,
            audit="snapshot.create",
            state="stopped",
        ),
        E("vm-retention", "get", V + "snapshot-retention/", "view"),
        E(
            "vm-retention-set",
            "put",
            V + "snapshot-retention/",
            "snapshot",
            {"keep_last": 3},
            audit="snapshot.retention_set",
        ),
        E("retrieve", "get", S, "view", obj="snapshot"),
        E(
            "restore",
            "post",
            S + "restore/",
            "snapshot",
            status=202,
            audit="snapshot.restore",
            obj="snapshot",
            state="stopped",
        ),
        E("clone", "post", S + "clone/", "snapshot", {"count": 1}, status=202, audit="snapshot.clone", obj="snapshot"),
        E("delete", "delete", S, "snapshot", status=202, audit="snapshot.delete", obj="snapshot"),
    )

    @pytest.fixture
    def target(self, owner):
        vm = VmFactory(owner=owner, name="owned-vm")
        snapshot = SnapshotFactory(vm=vm, name="s1")
        return Target(owner, {"vm": vm, "snapshot": snapshot})


# --- networks, port forwards, NICs, egress -----------------------------------------------


class TestVmNetworkEndpoints(VmRights, PermissionMatrix):
    endpoints = (
        E("port-forwards", "get", V + "port-forwards/", "view"),
        E(
            "port-forward-create",
            "post",
            V + "port-forwards/",
            "change",
            {"guest_port": 8080},
            status=201,
            audit="portforward.create",
        ),
        E("port-forward-delete", "delete", V + "port-forwards/{pf}/", "change", status=204, audit="portforward.delete"),
        E("nics", "get", V + "nics/", "view"),
        E("nic-add", "post", V + "nics/", "change", {"network": "default"}, status=201, audit="vm.nic_attach"),
        E("nic-remove", "delete", V + "nics/{nic}/", "change", status=204, audit="vm.nic_detach"),
        E("egress", "put", V + "egress/", "change", {"mode": "deny"}, audit="vm.egress_update"),
    )

    @pytest.fixture
    def target(self, owner):
        from networking import services
        from networking.models import Nic

        vm = VmFactory(owner=owner, name="owned-vm")
        services.nic_allocate(vm=vm)
        second = services.nic_allocate(vm=vm)
        pf = services.port_forward_create(vm=vm, actor=owner, guest_port=22)
        return Target(owner, {"vm": vm, "pf": pf, "nic": Nic.objects.get(tap=second.tap)})


class TestNetworkEndpoints(PermissionMatrix):
    """A private network of the owner, who holds view, change and use on it (not delete)."""

    rights = ("view", "change", "delete", "use")
    owner_rights = ("view", "change", "use")
    N = "/api/v1/networks/{network}/"
    endpoints = (
        E("retrieve", "get", N, "view", obj="network"),
        E("update", "patch", N, "change", {"egress_mode": "deny"}, audit="network.update", obj="network"),
        E("delete", "delete", N, "delete", status=204, audit="network.delete", obj="network"),
    )

    @pytest.fixture
    def target(self, owner):
        from networking import services

        network = services.network_create(name="private", cidr="10.231.30.0/24", owner=owner, actor=None)
        return Target(owner, {"network": network})

    def grant(self, user, rights, target):
        for right in rights:
            assign_perm(f"networking.{right}_network", user, target.objects["network"])


class TestImageEndpoints(PermissionMatrix):
    """A private image the owner was given view, change and delete on (operators hold them
    through their role); public images are visible to everyone (tests/vms/test_images.py)."""

    rights = ("view", "change", "delete")
    I = "/api/v1/images/{image}/"  # noqa: E741
    endpoints = (
        E("retrieve", "get", I, "view", obj="image"),
        E("update", "patch", I, "change", {"description": "mine"}, audit="image.update", obj="image"),
        E("deprecate", "post", I + "deprecate/", "change", {}, audit="image.deprecate", obj="image"),
        E("delete", "delete", I, "delete", status=204, audit="image.delete", obj="image"),
    )

    @pytest.fixture
    def target(self, owner):
        from tests.factories import ImageFactory

        image = ImageFactory(name="private-image", is_public=False, boot_mode="uefi", disk_format="qcow2")
        self.grant(owner, set(self.rights), Target(owner, {"image": image}))
        return Target(owner, {"image": image})

    def grant(self, user, rights, target):
        for right in rights:
            assign_perm(f"vms.{right}_image", user, target.objects["image"])


class TestHostEndpoints(PermissionMatrix):
    """A host; operators hold view and change on hosts through their role (placement and
    the hosts list itself: tests/vms/test_placement.py)."""

    rights = ("view", "change", "delete")
    H = "/api/v1/hosts/{host}/"
    endpoints = (
        E("retrieve", "get", H, "view", obj="host"),
        E("cordon", "post", H + "cordon/", "change", {}, audit="host.cordon", obj="host"),
        E("uncordon", "post", H + "uncordon/", "change", {}, obj="host"),
        E("remove", "delete", H, "delete", status=204, audit="host.remove", obj="host"),
        E("drain", "post", H + "drain/", "change", {}, status=202, audit="host.drain", obj="host"),
    )

    @pytest.fixture
    def target(self, owner):
        from tests.factories import HostFactory

        host = HostFactory(name="matrix-host")
        self.grant(owner, set(self.rights), Target(owner, {"host": host}))
        return Target(owner, {"host": host})

    def grant(self, user, rights, target):
        for right in rights:
            assign_perm(f"vms.{right}_host", user, target.objects["host"])


class TestVmMigrateEndpoint(VmRights, PermissionMatrix):
    """Moving a VM between hosts is the operators' (their role's ``vms.change_host``): no right
    on the VM grants it, so everyone else who sees the VM gets 403 (tests/vms/test_migration.py
    runs the operation)."""

    endpoints = (
        E("migrate", "post", V + "migrate/", "migrate", {"host": "matrix-h2"}, status=202, audit="vm.migrate",
          state="running"),
    )  # fmt: skip

    def granted(self, persona, endpoint):
        return {"grantee": {"view"}, "grantee_without": set(VM_RIGHTS), "viewer": {"view"}}.get(persona, set())

    def expected(self, endpoint, persona):
        if persona in ("anonymous", "stranger"):
            return super().expected(endpoint, persona)
        return endpoint.status if persona == "operator" else 403

    @pytest.fixture
    def target(self, owner):
        from django.utils import timezone

        from tests.factories import HostFactory

        now = timezone.now()
        vm = VmFactory(owner=owner, name="owned-vm", driver="fake")
        HostFactory(
            name="matrix-h2", last_seen_at=now, hostd_seen_at=now, cpus=8, memory_mib=16384, tunnel_address="10.0.9.2"
        )
        return Target(owner, {"vm": vm})


# --- every route has a row ----------------------------------------------------------------

TABLES = (
    TestVmEndpoints,
    TestVmMoveEndpoint,
    TestExecAndFileEndpoints,
    TestSnapshotEndpoints,
    TestVmNetworkEndpoints,
    TestNetworkEndpoints,
    TestImageEndpoints,
    TestHostEndpoints,
    TestVmMigrateEndpoint,
)
# Collections, not objects: what they list or create is checked by the tests below.
COLLECTIONS = {
    ("VmViewSet", "get", "list"),
    ("VmViewSet", "post", "create"),
    ("SnapshotViewSet", "get", "list"),
    ("NetworkViewSet", "get", "list"),
    ("NetworkViewSet", "post", "create"),
    ("ImageViewSet", "get", "list"),  # tests/vms/test_images.py
    ("ImageViewSet", "post", "create"),
    ("HostViewSet", "get", "list"),  # tests/vms/test_placement.py
}


def test_every_object_endpoint_has_a_matrix_row():
    missing = object_routes() - covered_routes(TABLES) - COLLECTIONS
    assert not missing, f"endpoints without a permission-matrix row: {sorted(missing)}"


def test_every_declared_action_has_a_permission_rule():
    from django.urls import URLResolver, get_resolver

    from accounts.permissions import ObjectPermissionViewSet, VmNestedViewSet

    def walk(patterns):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns)
            else:
                yield pattern

    for pattern in walk(get_resolver().url_patterns):
        cls = getattr(pattern.callback, "cls", None)
        if cls is not None and issubclass(cls, (ObjectPermissionViewSet, VmNestedViewSet)):
            rules = {**cls.base_action_perms, **cls.action_perms}
            for action in pattern.callback.actions.values():
                assert action in rules, f"{cls.__name__}.{action} has no permission rule"


# --- collections --------------------------------------------------------------------------


@pytest.fixture
def shared_vm(vm, grantee):
    for perm in ("view", "power"):
        assign_perm(f"vms.{perm}_vm", grantee, vm)
    return vm


def test_it_lists_only_permitted_vms(api, owner, grantee, stranger, shared_vm):
    VmFactory(owner=stranger, name="strangers-vm")
    assert [v["name"] for v in api.as_user(owner).get("/api/v1/vms/").json()["results"]] == ["owned-vm"]
    assert [v["name"] for v in api.as_user(grantee).get("/api/v1/vms/").json()["results"]] == ["owned-vm"]
    assert [v["name"] for v in api.as_user(stranger).get("/api/v1/vms/").json()["results"]] == ["strangers-vm"]


def test_it_lists_only_snapshots_of_visible_vms(api, owner, stranger, vm):
    SnapshotFactory(vm=vm, name="s1")
    assert [s["name"] for s in api.as_user(owner).get("/api/v1/snapshots/").json()["results"]] == ["s1"]
    assert api.as_user(stranger).get("/api/v1/snapshots/").json()["results"] == []


def test_it_hides_malformed_ids(api, owner):
    client = api.as_user(owner)
    for path in ("/api/v1/vms/not-a-uuid/", "/api/v1/vms/not-a-uuid/execs/", "/api/v1/snapshots/nope/"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path


def test_options_describe_only_what_the_user_may_see(api, owner, stranger, vm):
    for path in (f"/api/v1/vms/{vm.pk}/", f"/api/v1/vms/{vm.pk}/execs/", f"/api/v1/vms/{vm.pk}/port-forwards/"):
        assert api.as_user(owner).options(path).status_code == 200, path
        assert api.as_user(stranger).options(path).status_code == 404, path


def test_it_refuses_creation_to_viewers(api, viewer):
    from tests.factories import TemplateFactory

    TemplateFactory()
    response = api.as_user(viewer).post("/api/v1/vms/", {"name": "x", "template": "test-template"}, format="json")
    assert response.status_code == 403
    assert not VM.objects.exists()
    assert AuditEvent.objects.filter(action="vm.create", result="denied", actor_id=viewer.pk).exists()


def test_it_creates_a_vm_with_owner_rights_and_an_operation(api, owner, django_capture_on_commit_callbacks):
    from tests.factories import TemplateFactory

    TemplateFactory()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.as_user(owner).post(
            "/api/v1/vms/", {"name": "web-1", "template": "test-template", "start": False}, format="json"
        )
    assert response.status_code == 202, response.content
    vm = VM.objects.get(pk=response.json()["id"])
    assert vm.state == "creating"
    assert owner.has_perm("vms.exec_vm", vm)
    assert Operation.objects.get(pk=response.json()["operation"]).action == "create"
    assert AuditEvent.objects.filter(action="vm.create", object_id=str(vm.pk), actor_id=owner.pk).exists()
    assert len(callbacks) >= 1  # the task is enqueued only after commit


def test_it_checks_template_limits_and_quota(api, owner, settings):
    from tests.factories import TemplateFactory

    TemplateFactory()
    too_big = api.as_user(owner).post(
        "/api/v1/vms/", {"name": "big", "template": "test-template", "vcpus": 9}, format="json"
    )
    assert too_big.status_code == 400
    assert "vcpus" in too_big.json()["error"]["details"]
    settings.SANDBOX_DEFAULT_QUOTA = {**settings.SANDBOX_DEFAULT_QUOTA, "max_vms": 0}
    over = api.as_user(owner).post("/api/v1/vms/", {"name": "one", "template": "test-template"}, format="json")
    assert over.status_code == 403
    assert over.json()["error"]["code"] == "quota_exceeded"
    assert not VM.objects.exists()


def test_it_refuses_a_transition_from_the_wrong_state(api, owner, vm):
    response = api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/pause/", {}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["details"]["state"] == "stopped"


def test_it_only_shares_rights_the_sharer_holds(api, grantee, shared_vm):
    UserFactory(username="other")
    assign_perm("vms.change_vm", grantee, shared_vm)
    response = api.as_user(grantee).post(
        f"/api/v1/vms/{shared_vm.pk}/permissions/", {"user": "other", "permissions": ["exec_vm"]}, format="json"
    )
    assert response.status_code == 403


def test_it_lets_a_grantee_use_exactly_the_shared_rights(api, owner, vm):
    other = UserFactory(username="other")
    response = api.as_user(owner).post(
        f"/api/v1/vms/{vm.pk}/permissions/", {"user": "other", "permissions": ["view_vm"]}, format="json"
    )
    assert response.status_code == 200
    assert api.as_user(other).get(f"/api/v1/vms/{vm.pk}/").status_code == 200
    assert api.as_user(other).post(f"/api/v1/vms/{vm.pk}/start/", {}, format="json").status_code == 403


def test_services_refuse_and_audit_on_their_own(owner, grantee, vm):
    """The services re-check the right (callers other than the API: tasks, the dashboard)."""
    from networking import services as net_services
    from sandbox_site.errors import NotPermitted
    from snapshots import services as snap_services
    from vms import exec_services, services

    assign_perm("vms.view_vm", grantee, vm)
    calls = [
        (lambda: services.vm_action(vm=vm, action="start", actor=grantee), "vm.start"),
        (lambda: services.vm_update(vm=vm, actor=grantee, name="x"), "vm.update"),
        (lambda: exec_services.vm_exec_list(vm=vm, actor=grantee), "vm.exec_list"),
        (lambda: snap_services.snapshot_create(vm=vm, actor=grantee, name="s"), "snapshot.create"),
        (lambda: net_services.vm_egress_set(vm=vm, actor=grantee, mode="deny"), "vm.egress_update"),
    ]
    for call, action in calls:
        with pytest.raises(NotPermitted):
            call()
        assert AuditEvent.objects.filter(action=action, result="denied", actor_id=grantee.pk).exists(), action


@pytest.mark.django_db
def test_it_answers_405_for_a_method_a_route_does_not_have(client):
    owner = UserFactory()
    vm = VmFactory(owner=owner)
    client.force_login(owner)
    assert client.post(f"/api/v1/vms/{vm.pk}/").status_code == 405
    assert client.delete(f"/api/v1/vms/{vm.pk}/nics/").status_code == 405
