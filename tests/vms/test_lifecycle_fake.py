"""The VM state machine on the fake driver: every row of ``vms.transitions.TRANSITIONS``
asked from every state (allowed -> transitional state + operation, refused -> 409 and
nothing changed), what the worker makes of each, failures, and the personas."""

from __future__ import annotations

import pytest
from guardian.shortcuts import assign_perm

from sandbox_site.errors import ConflictError, NotPermitted
from tests.factories import TemplateFactory
from tests.vms.conftest import fake_vm_in
from vms import services
from vms.models import VM, Operation, VmState
from vms.transitions import PREVIOUS, TRANSITIONS, vm_transition
from vms.vmm.base import RuntimeState, VmmError

pytestmark = pytest.mark.django_db

S = VmState
VM_ACTIONS = ("start", "stop", "reboot", "pause", "resume", "delete")


def _op(vm) -> Operation:
    return Operation.objects.filter(vm_ref=vm.pk).order_by("-created_at").first()


# --- requests: every action from every state --------------------------------------------------


@pytest.mark.parametrize("state", S.values)
@pytest.mark.parametrize("action", VM_ACTIONS)
def test_it_allows_exactly_the_transitions_of_the_table(fake, owner, action, state):
    vm = fake_vm_in(state, owner=owner)
    rule = TRANSITIONS[action]
    if state in rule.allowed_from:
        op = services.vm_action(vm=vm, action=action, actor=owner)
        vm.refresh_from_db()
        assert vm.state == rule.during
        assert op.status == Operation.Status.PENDING and op.params["previous_state"] == state
    else:
        with pytest.raises(ConflictError) as err:
            services.vm_action(vm=vm, action=action, actor=owner)
        assert err.value.status_code == 409
        assert err.value.details["state"] == state
        vm.refresh_from_db()
        assert vm.state == state
        assert not Operation.objects.filter(vm_ref=vm.pk).exists()


@pytest.mark.parametrize("state", S.values)
def test_it_resizes_only_from_the_table_states(fake, owner, state):
    vm = fake_vm_in(state, owner=owner)
    if state == S.STOPPED:
        result = services.vm_resize(vm=vm, actor=owner, vcpus=2)
        assert isinstance(result, VM) and result.vcpus == 2 and result.state == S.STOPPED
        assert not Operation.objects.filter(vm_ref=vm.pk).exists()
    elif state in TRANSITIONS["resize"].allowed_from:
        op = services.vm_resize(vm=vm, actor=owner, vcpus=2, memory_mib=256)
        vm.refresh_from_db()
        assert vm.state == S.RESIZING and op.params["previous_state"] == state
    else:
        with pytest.raises(ConflictError):
            services.vm_resize(vm=vm, actor=owner, vcpus=2)
        vm.refresh_from_db()
        assert vm.state == state and vm.vcpus == 1


def test_it_lets_exactly_one_of_two_requests_win(fake, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    other = VM.objects.get(pk=vm.pk)  # a second request holding the same stale row
    services.vm_action(vm=vm, action="stop", actor=owner)
    with pytest.raises(ConflictError):
        services.vm_action(vm=other, action="pause", actor=owner)
    assert Operation.objects.filter(vm_ref=vm.pk).count() == 1


def test_it_compare_and_sets_only_from_the_expected_states(fake, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    assert not vm_transition(vm, expected={S.STOPPED}, new=S.STARTING)
    assert vm_transition(vm, expected={S.RUNNING}, new=S.PAUSING)
    assert vm.state == S.PAUSING


# --- workers: what each action ends in ---------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "state"),
    [(action, state) for action in VM_ACTIONS for state in sorted(TRANSITIONS[action].allowed_from)],
)
def test_it_ends_each_allowed_transition_in_its_outcome(fake, owner, run_ops, action, state):
    vm = fake_vm_in(state, owner=owner)
    services.vm_action(vm=vm, action=action, actor=owner)
    (op,) = run_ops()
    rule = TRANSITIONS[action]
    if rule.done is None:  # delete
        assert op.status == Operation.Status.SUCCEEDED
        assert not VM.objects.filter(pk=vm.pk).exists()
        assert not (fake.runtime / str(vm.pk)).exists()
        assert fake.vmm.fake_vm(str(vm.pk)) is None
        return
    vm.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED, op.log
    expected = state if rule.done == PREVIOUS else rule.done
    assert vm.state == expected
    runtime = fake.vmm.fake_vm(str(vm.pk))
    want = {
        S.RUNNING: RuntimeState.RUNNING,
        S.PAUSED: RuntimeState.PAUSED,
        S.STOPPED: RuntimeState.GONE,
    }[vm.state]
    assert runtime.state == want


def test_it_creates_and_boots_a_vm_through_the_fake_driver(fake, owner, run_ops):
    template = TemplateFactory()
    vm, op = services.vm_create(owner=owner, actor=owner, name="fresh", template=template)
    assert vm.state == S.CREATING and op.action == "create"
    (done,) = run_ops()
    vm.refresh_from_db()
    assert done.status == Operation.Status.SUCCEEDED, done.log
    assert vm.state == S.RUNNING and vm.driver == "fake" and vm.vmm_pid and vm.started_at
    assert "guest agent answered" in done.log
    assert fake.vmm.fake_calls(str(vm.pk))[:3] == ["prepare", "info", "prepare"]
    assert fake.agent.ops(vm.pk) == ["wait"]


def test_it_creates_a_stopped_vm_when_asked_not_to_start(fake, owner, run_ops):
    vm, _ = services.vm_create(owner=owner, actor=owner, name="cold", template=TemplateFactory(), start=False)
    run_ops()
    vm.refresh_from_db()
    assert vm.state == S.STOPPED
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.GONE


def test_it_marks_a_failed_create_error_and_leaves_no_runtime_dir(fake, owner, run_ops):
    fake.vmm.fake_fail("prepare")
    vm, _ = services.vm_create(owner=owner, actor=owner, name="broken", template=TemplateFactory())
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert vm.state == S.ERROR and "create failed" in vm.last_error
    assert not (fake.runtime / str(vm.pk)).exists()


def test_it_marks_a_failed_boot_error_and_kills_the_vmm(fake, owner, run_ops):
    vm = fake_vm_in(S.STOPPED, owner=owner)
    fake.agent.fail_wait = "agent never answered"
    services.vm_action(vm=vm, action="start", actor=owner)
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert vm.state == S.ERROR and "boot failed" in vm.last_error
    assert "Linux version" in vm.last_console
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.GONE


def test_it_does_not_launch_a_second_vmm_when_a_start_is_redelivered(fake, owner, run_ops):
    vm = fake_vm_in(S.STOPPED, owner=owner)
    services.vm_action(vm=vm, action="start", actor=owner)
    fake.vmm.FakeDriver().launch(fake_spec(vm))  # the first delivery got this far
    run_ops()
    vm.refresh_from_db()
    assert vm.state == S.RUNNING
    assert fake.vmm.fake_calls(str(vm.pk)).count("launch") == 1


def fake_spec(vm):
    from vms import hypervisor

    return hypervisor.vm_spec(vm)


@pytest.mark.parametrize("action", ["pause", "reboot"])
def test_it_puts_the_vm_back_when_an_in_place_action_fails(fake, owner, run_ops, action):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    fake.vmm.fake_fail(action, VmmError("QMP said no"))
    services.vm_action(vm=vm, action=action, actor=owner)
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "QMP said no" in op.error
    assert vm.state == S.RUNNING and vm.last_error == ""


def test_it_marks_the_vm_error_when_its_vmm_died_during_an_in_place_action(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    services.vm_action(vm=vm, action="pause", actor=owner)
    fake.vmm.fake_vmm_die(str(vm.pk))
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert vm.state == S.ERROR and "pause failed" in vm.last_error


def test_it_resizes_a_running_vm_and_refuses_a_size_the_vmm_cannot_take(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    services.vm_resize(vm=vm, actor=owner, vcpus=2, memory_mib=256)
    run_ops()
    vm.refresh_from_db()
    assert (vm.state, vm.vcpus, vm.memory_mib) == (S.RUNNING, 2, 256)
    services.vm_resize(vm=vm, actor=owner, memory_mib=300)  # not a multiple of the 128 MiB step
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert (vm.state, vm.memory_mib) == (S.RUNNING, 256)


def test_it_says_a_restart_is_needed_when_the_driver_cannot_hotplug(fake, owner):
    fake.vmm.fake_capabilities_set(live_resize=False)
    vm = fake_vm_in(S.RUNNING, owner=owner)
    with pytest.raises(ConflictError) as err:
        services.vm_resize(vm=vm, actor=owner, vcpus=2)
    assert err.value.code == "restart_required"
    vm.refresh_from_db()
    assert vm.state == S.RUNNING


def test_it_leaves_a_vm_stopped_during_its_boot_to_the_stop(fake, owner, run_ops):
    vm = fake_vm_in(S.STOPPED, owner=owner)
    services.vm_action(vm=vm, action="start", actor=owner)
    vm.refresh_from_db()
    services.vm_action(vm=vm, action="stop", actor=owner, force=True)  # while still "starting"
    start, stop = run_ops()
    vm.refresh_from_db()
    assert start.status == Operation.Status.SUCCEEDED  # nothing to do: the VM is stopping
    assert stop.status == Operation.Status.SUCCEEDED
    assert vm.state == S.STOPPED


# --- personas ---------------------------------------------------------------------------------


def test_it_lets_the_owner_act_through_the_api(fake, api, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    response = api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/pause/")
    assert response.status_code == 202, response.content
    vm.refresh_from_db()
    assert vm.state == S.PAUSING
    assert api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/pause/").status_code == 409


def test_it_lets_a_grantee_with_power_act_and_refuses_one_without(fake, owner, grantee):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    assign_perm("vms.view_vm", grantee, vm)
    with pytest.raises(NotPermitted):
        services.vm_action(vm=vm, action="stop", actor=grantee)
    assign_perm("vms.power_vm", grantee, vm)
    services.vm_action(vm=vm, action="stop", actor=grantee)
    vm.refresh_from_db()
    assert vm.state == S.STOPPING
    with pytest.raises(NotPermitted):
        services.vm_action(vm=vm, action="delete", actor=grantee)


def test_it_hides_the_vm_from_a_stranger(fake, api, owner, stranger):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    assert api.as_user(stranger).post(f"/api/v1/vms/{vm.pk}/stop/").status_code == 404
    vm.refresh_from_db()
    assert vm.state == S.RUNNING


# --- hooks other apps join the lifecycle with ---------------------------------------------------


def test_it_runs_the_lifecycle_hooks_in_order(fake, owner, run_ops, monkeypatch):
    from vms import hooks

    seen = []
    registry = {name: [] for name in hooks.HOOK_NAMES}
    monkeypatch.setattr(hooks, "_hooks", registry)
    for name in ("vm_created", "vm_before_launch", "vm_vmm_gone", "vm_row_deleting"):
        hooks.hook_register(name, lambda name=name, **kwargs: seen.append(name) or [])
    vm, _ = services.vm_create(owner=owner, actor=owner, name="hooked", template=TemplateFactory())
    run_ops()
    vm.refresh_from_db()
    services.vm_action(vm=vm, action="stop", actor=owner)
    run_ops()
    vm.refresh_from_db()
    services.vm_action(vm=vm, action="delete", actor=owner)
    run_ops()
    assert seen == ["vm_created", "vm_before_launch", "vm_vmm_gone", "vm_vmm_gone", "vm_row_deleting"]


def test_it_has_networking_registered_on_the_hooks():
    from networking import services as net_services
    from vms import hooks

    assert net_services.vm_hook_before_launch in hooks._hooks["vm_before_launch"]
    assert net_services.vm_hook_nics in hooks._hooks["vm_nics"]
    assert net_services.vm_hook_row_deleting in hooks._hooks["vm_row_deleting"]
