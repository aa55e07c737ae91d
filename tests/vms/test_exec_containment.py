"""The web tier never trusts the guest: ``wait: true`` collection is bounded by host-side
limits (bytes, pages, time), waits hold no database connection, and each user has a cap
on concurrent waits. The agent is replaced by a fake answering whatever a hostile guest
would (monkeypatched gateway); no VM boots."""

from __future__ import annotations

import contextlib
import threading

import pytest
from django.db import connection

from sandbox_site.errors import ApplicationError
from vms import agent_gateway, exec_services
from vms.models import VM

BUFFER = 2 << 20


class HostileAgent:
    """Answers exec_start/exec_wait normally, then claims endless output on exec_read."""

    def __init__(self, *, page_bytes: int = 1 << 20, step: int | None = None) -> None:
        self.page_bytes = page_bytes
        self.step = step  # how far next_offset advances per page (default: the data returned)
        self.reads = 0
        self.in_wait = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.db_open_during_wait: bool | None = None

    def __call__(self, vm, op, args=None, data=b"", *, timeout=30.0):
        if op == "exec_start":
            return {"exec_id": "e1", "pid": 1, "tag": ""}, b""
        if op == "exec_wait":
            self.db_open_during_wait = connection.connection is not None
            self.in_wait.set()
            assert self.release.wait(10)
            return {"exec_id": "e1", "running": False, "base_offset": 0, "end_offset": 1 << 60}, b""
        assert op == "exec_read"
        self.reads += 1
        if self.reads > 2000:
            raise AssertionError("the web tier kept reading an endless exec output")
        offset = args["offset"]
        blob = b"A" * self.page_bytes  # ignores the "max" the host asked for
        page = {
            "exec_id": "e1",
            "running": True,
            "base_offset": 0,
            "offset": offset,
            "next_offset": offset + (self.step if self.step is not None else len(blob)),
            "end_offset": 1 << 60,
            "chunks": [["stdout", len(blob) * 4]],  # and lies about the chunk's length
        }
        return page, blob


def _agent_is(monkeypatch, fake) -> None:
    """Every agent request of the exec services (single ones and sessions) goes to ``fake``."""

    @contextlib.contextmanager
    def session(vm, *, timeout=30.0):
        def call(op, args=None, data=b"", *, timeout=30.0, meanwhile=None):
            if meanwhile is not None:
                meanwhile()
            return fake(vm, op, args, data, timeout=timeout)

        yield call

    def capped(vm, args, stdin=b"", *, max_running, timeout=30.0):  # wait=false starts (hostd's cap)
        return fake(vm, "exec_start", args, stdin, timeout=timeout)[0]

    monkeypatch.setattr(exec_services, "agent_call", fake)
    monkeypatch.setattr(exec_services, "agent_session", session)
    monkeypatch.setattr(agent_gateway, "exec_start_capped", capped)


@pytest.fixture
def running_vm(vm):
    VM.objects.filter(pk=vm.pk).update(state="running")
    vm.refresh_from_db()
    return vm


@pytest.mark.parametrize(("step", "limit"), [(None, "bytes"), (1, "iterations")])
def test_it_stops_collecting_when_the_agent_claims_endless_output(running_vm, owner, monkeypatch, step, limit) -> None:
    fake = HostileAgent(step=step, page_bytes=1 << 20 if step is None else 0)
    _agent_is(monkeypatch, fake)
    result = exec_services.vm_exec_start(vm=running_vm, actor=owner, command="yes", buffer_bytes=BUFFER)
    assert result["truncated"] is True and result["collect_limit"] == limit
    assert len(result["stdout"]) <= BUFFER
    assert fake.reads <= BUFFER // exec_services.COLLECT_PAGE_BYTES + 8


def test_it_stops_collecting_after_its_time_limit(running_vm, owner, monkeypatch) -> None:
    fake = HostileAgent(page_bytes=1)
    _agent_is(monkeypatch, fake)
    monkeypatch.setattr(exec_services, "COLLECT_SECONDS", 0.0)
    result = exec_services.vm_exec_start(vm=running_vm, actor=owner, command="yes", buffer_bytes=BUFFER)
    assert result["collect_limit"] == "time" and fake.reads == 1


def test_it_refuses_an_agent_page_that_is_not_well_formed(running_vm, owner, monkeypatch) -> None:
    def broken(vm, op, args=None, data=b"", *, timeout=30.0):
        if op == "exec_start":
            return {"exec_id": "e1", "pid": 1, "tag": ""}, b""
        if op == "exec_wait":
            return {"exec_id": "e1", "running": False}, b""
        return {"next_offset": "1e99", "end_offset": 5, "chunks": "no"}, b""

    _agent_is(monkeypatch, broken)
    with pytest.raises(ApplicationError) as err:
        exec_services.vm_exec_start(vm=running_vm, actor=owner, command="true")
    assert (err.value.code, err.value.status_code) == ("agent_error", 502)


@pytest.mark.django_db(transaction=True)
def test_a_waiting_exec_holds_no_database_connection(running_vm, owner, monkeypatch) -> None:
    fake = HostileAgent(page_bytes=0, step=0)
    _agent_is(monkeypatch, fake)
    exec_services.vm_exec_start(vm=running_vm, actor=owner, command="sleep 100")
    assert fake.db_open_during_wait is False


@pytest.mark.django_db(transaction=True)
def test_concurrent_waits_are_capped_per_user(running_vm, owner, settings, monkeypatch) -> None:
    settings.SANDBOX_EXEC_WAITS_PER_USER = 1
    fake = HostileAgent(page_bytes=0, step=0)
    fake.release.clear()
    _agent_is(monkeypatch, fake)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            exec_services.vm_exec_start(vm=running_vm, actor=owner, command="sleep 100")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert fake.in_wait.wait(10)
        with pytest.raises(ApplicationError) as err:
            exec_services.vm_exec_start(vm=running_vm, actor=owner, command="true")
        assert (err.value.code, err.value.status_code) == ("too_many", 429)
        # wait=false is not capped
        assert exec_services.vm_exec_start(vm=running_vm, actor=owner, command="true", wait=False)["running"]
    finally:
        fake.release.set()
        thread.join(10)
    assert not errors
    exec_services.vm_exec_start(vm=running_vm, actor=owner, command="true")  # the slot is free again
