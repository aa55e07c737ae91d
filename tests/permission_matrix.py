"""One reusable permission matrix (NetBox's API test case, table-driven).

A table subclasses ``PermissionMatrix`` (HTTP) or ``WebsocketPermissionMatrix``, declares its
``endpoints`` and the rights on its object, and builds its objects in ``target``. Every endpoint
then runs for every persona:

- ``owner``: the owner's rights (``owner_rights``, all by default);
- ``grantee``: exactly ``view`` + the right the endpoint needs;
- ``grantee_without``: every right except the one the endpoint needs (not for ``view``);
- ``viewer``: the viewer role, holding ``view`` only;
- ``operator``: the operator role (global rights, nothing per object);
- ``stranger``: a user with no right on the object;
- ``anonymous``: not signed in;
- ``project_owner``, ``project_member``, ``project_viewer``: members of a team project the
  target's objects are moved into (before the call), with that role: owners and members hold
  the owner's rights through it, viewers ``view`` only. Objects of no project (images): 404.

Expected: allowed -> the endpoint's ``status`` (2xx, or 409 when the request passes the check
and is then refused by the object's state) and its audit row; visible but not allowed -> 403
and a ``denied`` audit row; invisible -> 404 and no audit row; anonymous -> 401. 401, 403 and
404 change nothing in the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from django.apps import apps
from guardian.models import GroupObjectPermission, UserObjectPermission

from accounts.models import AuditEvent, Role
from tests.factories import UserFactory

PROJECT_PERSONAS = {"project_owner": "owner", "project_member": "member", "project_viewer": "viewer"}
PERSONAS = ("owner", "grantee", "grantee_without", "viewer", "operator", "stranger", "anonymous", *PROJECT_PERSONAS)
# Target objects that belong to a project (endpoint ``obj`` names).
PROJECT_OBJECTS = {"vm", "snapshot", "network"}
WS_CLOSE = {401: 4401, 403: 4403, 404: 4404}
ACCEPTED = 0  # a websocket endpoint's "allowed": connected, or closed for a reason other than rights


@dataclass(frozen=True)
class Endpoint:
    """One endpoint and method. ``path`` names objects of the target in braces (``{vm}``)."""

    name: str
    method: str  # get / post / put / patch / delete, or ws
    path: str
    perm: str  # the right needed on ``obj``: view, change, power, exec, ...
    body: Any = None
    status: int = 200  # when allowed
    audit: str | None = None  # the audit action (result ok) an allowed call writes
    obj: str = "vm"  # the target object the rights are on and a refusal is recorded against
    state: str | None = None  # the VM's state before the call
    content_type: str | None = None  # a raw body (file upload) instead of JSON


@dataclass
class Target:
    """The objects of one test, owned by ``owner``; ``objects["vm"]`` etc. fill the path and body."""

    owner: Any
    objects: dict[str, Any] = field(default_factory=dict)

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.format(**{name: obj.pk for name, obj in self.objects.items()})
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value


# Everything a refused request must leave alone.
_WATCHED = [
    "vms.VM",
    "vms.Image",
    "vms.Operation",
    "snapshots.Snapshot",
    "snapshots.RetentionPolicy",
    "networking.Network",
    "networking.Nic",
    "networking.PortForward",
    "networking.EgressRule",
]


def db_state() -> dict[str, list]:
    state = {label: list(apps.get_model(label).objects.order_by("pk").values()) for label in _WATCHED}
    for model in (UserObjectPermission, GroupObjectPermission):
        state[model.__name__] = sorted(model.objects.values_list("pk", "permission_id", "object_pk"))
    return state


def audit_ids() -> set[int]:
    return set(AuditEvent.objects.values_list("id", flat=True))


def new_audit(before: set[int]):
    return AuditEvent.objects.exclude(id__in=before).exclude(action__startswith="auth.")


class PermissionMatrix:
    """Base of an HTTP endpoint table. Subclasses set ``endpoints`` and ``rights`` and provide
    the ``target`` fixture (objects owned by the ``owner`` fixture) and ``grant``."""

    endpoints: ClassVar[tuple[Endpoint, ...]] = ()
    rights: ClassVar[tuple[str, ...]] = ()
    owner_rights: ClassVar[tuple[str, ...] | None] = None  # None: all of ``rights``

    def pytest_generate_tests(self, metafunc):
        if {"endpoint", "persona"} <= set(metafunc.fixturenames):
            cases = [
                (e, p) for e in self.endpoints for p in PERSONAS if not (p == "grantee_without" and e.perm == "view")
            ]
            metafunc.parametrize(("endpoint", "persona"), cases, ids=[f"{e.name}-{p}" for e, p in cases])

    # --- to declare -------------------------------------------------------------------

    @pytest.fixture
    def target(self, owner) -> Target:
        raise NotImplementedError

    def grant(self, user, rights: set[str], target: Target) -> None:
        raise NotImplementedError

    # --- the matrix -------------------------------------------------------------------

    def granted(self, persona: str, endpoint: Endpoint) -> set[str]:
        """The rights shared with ``persona`` on the object (owners and operators hold theirs
        through ownership and role)."""
        return {
            "grantee": {"view", endpoint.perm},
            "grantee_without": set(self.rights) - {endpoint.perm},
            "viewer": {"view"},
        }.get(persona, set())

    def expected(self, endpoint: Endpoint, persona: str) -> int:
        """The status ``persona`` must get: the endpoint's status when allowed, else 401/403/404."""
        if persona == "anonymous":
            return 401
        if persona == "stranger":
            return 404
        if persona in PROJECT_PERSONAS:
            if endpoint.obj not in PROJECT_OBJECTS:
                return 404
            if PROJECT_PERSONAS[persona] == "viewer":
                return endpoint.status if endpoint.perm == "view" else 403
            persona = "owner"
        held = {
            "owner": set(self.owner_rights if self.owner_rights is not None else self.rights),
            "operator": set(self.rights),
        }.get(persona) or self.granted(persona, endpoint)
        return endpoint.status if endpoint.perm in held else 403

    def user_for(self, persona: str, endpoint: Endpoint, target: Target):
        if persona == "anonymous":
            return None
        if persona == "owner":
            return target.owner
        if persona in PROJECT_PERSONAS:
            from accounts.models import ProjectMembership

            user = UserFactory(username=persona, role=Role.USER)
            team = self.team_project(target)
            ProjectMembership.objects.create(project=team, user=user, role=PROJECT_PERSONAS[persona])
            return user
        role = {"viewer": Role.VIEWER, "operator": Role.OPERATOR}.get(persona, Role.USER)
        user = UserFactory(username=persona, role=role)
        if rights := self.granted(persona, endpoint):
            self.grant(user, rights, target)
        return user

    def team_project(self, target: Target):
        """The team project of this test, with every target object that has a project in it."""
        from accounts.models import Project

        team, _ = Project.objects.get_or_create(slug="matrix-team", defaults={"name": "Matrix team"})
        for obj in target.objects.values():
            if hasattr(obj, "project_id") and obj.project_id != team.pk:
                type(obj).objects.filter(pk=obj.pk).update(project=team)
                obj.project_id = team.pk
        return team

    def prepare(self, endpoint: Endpoint, target: Target) -> None:
        if endpoint.state is not None and "vm" in target.objects:
            from vms.models import VM

            VM.objects.filter(pk=target.objects["vm"].pk).update(state=endpoint.state)

    def call(self, api, endpoint: Endpoint, target: Target):
        path = target.fill(endpoint.path)
        if endpoint.content_type:
            return getattr(api, endpoint.method)(path, endpoint.body, content_type=endpoint.content_type)
        return getattr(api, endpoint.method)(path, target.fill(endpoint.body), format="json")

    def test_endpoint(self, api, target, endpoint, persona):
        self.prepare(endpoint, target)
        user = self.user_for(persona, endpoint, target)
        api.force_authenticate(user=user)
        expected = self.expected(endpoint, persona)
        before_audit, before_db = audit_ids(), db_state()

        response = self.call(api, endpoint, target)

        assert response.status_code == expected, (persona, response.status_code, response.content[:500])
        self.check_outcome(endpoint, target, user, expected, before_audit, before_db, response.json)

    def check_outcome(self, endpoint, target, user, expected, before_audit, before_db, body) -> None:
        events = new_audit(before_audit)
        code = {401: "not_authenticated", 403: "permission_denied", 404: "not_found"}.get(expected)
        if code is not None:
            if body is not None:
                assert body()["error"]["code"] == code
            assert db_state() == before_db, "a refused request changed the database"
            if expected == 403:
                assert events.exists() and not events.exclude(result="denied").exists(), list(events.values())
                obj = target.objects[endpoint.obj]
                assert events.filter(actor_id=user.pk, object_id=str(obj.pk)).exists()
            else:
                assert not events.exists(), list(events.values())
            return
        assert not events.filter(result="denied").exists(), list(events.values())
        if endpoint.audit:
            assert events.filter(action=endpoint.audit, result="ok", actor_id=user.pk).exists(), list(events.values())


class WebsocketPermissionMatrix(PermissionMatrix):
    """The same matrix for websocket endpoints (``method="ws"``): refusals are close codes
    4401/4403/4404; ``status`` is the close code when allowed, or ``ACCEPTED``. With a ``body``
    the endpoint is a message sent after connecting (a subscription): allowed answers with
    ``{"subscribed": ...}``, invisible with ``{"error": "not found"}``.

    Consumers read the database from their own threads, so these tests commit (transactional
    database, a flush per test): one test per endpoint runs the personas one after another."""

    pytestmark = pytest.mark.django_db(transaction=True)

    def pytest_generate_tests(self, metafunc):
        if "endpoint" in metafunc.fixturenames:
            metafunc.parametrize("endpoint", self.endpoints, ids=[e.name for e in self.endpoints])

    async def test_endpoint(self, target, endpoint):  # type: ignore[override]
        for persona in PERSONAS:
            if persona == "grantee_without" and endpoint.perm == "view":
                continue
            await self.check_persona(target, endpoint, persona)

    async def check_persona(self, target, endpoint, persona) -> None:
        from channels.db import database_sync_to_async

        def setup():
            self.prepare(endpoint, target)
            return self.user_for(persona, endpoint, target), audit_ids(), db_state()

        user, before_audit, before_db = await database_sync_to_async(setup)()
        expected = self.expected(endpoint, persona)

        outcome = await self.exchange(endpoint, target, user)

        if expected == 401 or endpoint.body is None:
            wanted = WS_CLOSE.get(expected, endpoint.status)
            if wanted == ACCEPTED:  # not refused: what follows (a console stream...) is not the matrix's business
                assert outcome not in WS_CLOSE.values(), (persona, outcome)
            else:
                assert outcome == wanted, (persona, outcome)
        else:
            obj_id = str(target.objects[endpoint.obj].pk)
            wanted = {"error": "not found", "vm": obj_id} if expected == 404 else {"subscribed": obj_id}
            assert outcome == wanted, (persona, outcome)
        await database_sync_to_async(self.check_outcome)(
            endpoint, target, user, expected if expected in WS_CLOSE else 200, before_audit, before_db, None
        )

    async def exchange(self, endpoint: Endpoint, target: Target, user):
        """Connect (and send the body); the close code, ``ACCEPTED``, or the JSON answer."""
        from channels.testing import WebsocketCommunicator

        from sandbox_site.asgi import application

        comm = WebsocketCommunicator(
            application, target.fill(endpoint.path), headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")]
        )
        if user is not None:
            comm.scope["user"] = user
        try:
            connected, code = await comm.connect(timeout=5)
            if not connected:
                return code
            if endpoint.body is None:
                return await self.accepted_or_closed(comm)
            await comm.send_json_to(target.fill(endpoint.body))
            return await comm.receive_json_from(timeout=5)
        finally:
            await comm.disconnect()

    @staticmethod
    async def accepted_or_closed(comm):
        """A consumer may accept and then close with its code (the console does, so browsers
        see 4401/4403/4404 rather than 1006): the close code when one follows at once."""
        try:
            while True:
                out = await comm.receive_output(timeout=2)
                if out["type"] == "websocket.close":
                    return out.get("code")
                if '"closing": true' not in (out.get("text") or ""):
                    return ACCEPTED
        except TimeoutError:
            return ACCEPTED


def object_routes() -> set[tuple[str, str, str]]:
    """(viewset, method, action) of every API route served by one of the two permission bases."""
    from django.urls import URLResolver, get_resolver

    from accounts.permissions import ObjectPermissionViewSet, VmNestedViewSet

    found: set[tuple[str, str, str]] = set()

    def walk(patterns):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns)
                continue
            cls = getattr(pattern.callback, "cls", None)
            actions = getattr(pattern.callback, "actions", None) or {}
            if cls is not None and issubclass(cls, (ObjectPermissionViewSet, VmNestedViewSet)):
                # HEAD is served by the GET handler (DRF maps it), so it is covered with it.
                found.update((cls.__name__, method, action) for method, action in actions.items() if method != "head")

    walk(get_resolver().url_patterns)
    return found


def covered_routes(tables) -> set[tuple[str, str, str]]:
    """(viewset, method, action) reached by the HTTP endpoints of ``tables``."""
    import re
    import uuid

    from django.urls import resolve

    covered = set()
    for table in tables:
        for endpoint in table.endpoints:
            if endpoint.method == "ws":
                continue
            path = re.sub(r"\{\w+\}", lambda _: str(uuid.uuid4()), endpoint.path.split("?")[0])
            match = resolve(path)
            covered.add((match.func.cls.__name__, endpoint.method, match.func.actions[endpoint.method]))
    return covered
