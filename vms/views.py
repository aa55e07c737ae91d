"""Dashboard pages. Reads come from selectors; writes go through services (forms) or the
JSON API (buttons, with the session's CSRF token).

Pages render only the controls the user's rights allow, and enable only the actions the VM's
state allows (``vms.transitions``; the page follows state changes with the same table, passed
as ``state_actions``). The server still refuses everything else."""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from guardian.core import ObjectPermissionChecker

from accounts import selectors as account_selectors
from accounts.roles import user_is_operator
from accounts.services import project_grants, user_has_perm
from sandbox_site.errors import ApplicationError
from vms import selectors, services
from vms.events import operation_step
from vms.forms import VmCreateForm
from vms.hooks import hook_run
from vms.models import Image, Operation, VmState
from vms.transitions import TRANSITIONS, vm_actions_allowed

VM_RIGHTS = ("change", "delete", "power", "console", "exec", "snapshot")
ROW_RIGHTS = ("power",)  # the list's buttons (start/stop)


def state_actions() -> dict[str, list[str]]:
    """What each state allows (the API's ``actions``), for pages that follow live state."""
    return {state: vm_actions_allowed(state) for state in VmState.values}


def vm_addresses(vm_ids) -> dict[str, list[str]]:
    """IP addresses by VM id, from the apps that give VMs addresses (networking's hook)."""
    found: dict[str, list[str]] = {}
    for result in hook_run("vm_addresses", vm_ids=[str(i) for i in vm_ids]):
        for vm_id, ips in (result or {}).items():
            found.setdefault(vm_id, []).extend(ips)
    return found


def vm_rights(user, vms, rights=VM_RIGHTS) -> dict[str, set[str]]:
    """The rights ``user`` holds on each VM (global or per object), by VM id: one query for
    the object permissions of all of them."""
    checker = ObjectPermissionChecker(user)
    checker.prefetch_perms(list(vms))
    held_globally = {r for r in rights if user.has_perm(f"vms.{r}_vm")}
    return {
        str(vm.pk): held_globally
        | {r for r in rights if checker.has_perm(f"{r}_vm", vm) or project_grants(user, f"vms.{r}_vm", vm.project_id)}
        for vm in vms
    }


CURRENT_PROJECT = "current_project"  # session key: the project the dashboard shows and creates in


def current_project(request):
    """The dashboard's current project (the switcher's choice, kept in the session), or None
    for "all projects". ``?project=<slug>`` switches; ``?project=`` shows all again. A project
    the user can no longer see is forgotten."""
    if "project" in request.GET:
        ref = request.GET["project"]
        request.session[CURRENT_PROJECT] = ref[:63] if ref else None
    ref = request.session.get(CURRENT_PROJECT)
    if not ref:
        return None
    project = account_selectors.project_by_ref(ref)
    if project is None or not account_selectors.project_visible_to(request.user, project):
        request.session[CURRENT_PROJECT] = None
        return None
    return project


def resize_live(vm) -> bool:
    """Whether ``vm`` can be resized while it runs (its driver hotplugs CPUs and memory)."""
    from vms.hypervisor import driver_capabilities

    try:
        return bool(driver_capabilities(vm.driver).live_resize)
    except Exception:  # an unknown or unavailable driver: offer resize only when stopped
        return False


@login_required
def home(request):
    project = current_project(request)
    visible = selectors.vm_list_visible(request.user)
    vms = list(visible.filter(project=project) if project is not None else visible)
    rights = vm_rights(request.user, vms, ROW_RIGHTS) if vms else {}
    addresses = vm_addresses(vm.pk for vm in vms) if vms else {}
    for vm in vms:
        vm.can_power = "power" in rights.get(str(vm.pk), ())
        vm.addresses = addresses.get(str(vm.pk), [])
        vm.actions = vm_actions_allowed(vm.state)
    return render(
        request,
        "vms/home.html",
        {
            "vms": vms,
            "can_create": user_has_perm(request.user, "vms.add_vm"),
            "state_actions": state_actions(),
            "projects": account_selectors.project_list_for(request.user).filter(memberships__user=request.user),
            "current_project": project,
        },
    )


@login_required
def vm_create(request):
    from vms.images import images_visible

    project = current_project(request)
    templates = selectors.template_list_active(project)

    images = images_visible(request.user).filter(status=Image.Status.READY, deprecated_at__isnull=True)
    initial = {"start": True}
    # The fields show the first template's defaults (the page follows the choice); preferably
    # one whose own image can boot.
    first = next((t for t in templates if services.template_image_refusal(t) is None), templates.first())
    if first is not None:
        initial.update(template=first.name, vcpus=first.vcpus, memory_mib=first.memory_mib, disk_gib=first.disk_gib)
    form = VmCreateForm(request.POST or None, templates=templates, images=images, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = {k: v for k, v in form.cleaned_data.items() if v not in (None, "")}
        try:
            vm, _ = services.vm_create(owner=request.user, actor=request.user, project=project, **data)
        except ApplicationError as exc:
            form.add_error(None, exc.message)
            for field, message in (exc.details or {}).items() if isinstance(exc.details, dict) else ():
                if field in form.fields:
                    form.add_error(field, str(message))
        else:
            return redirect("dashboard:vm-detail", vm_id=vm.pk)
    if project is not None:
        quota, usage = account_selectors.quota_of_project(project), selectors.usage_of_project(project)
    else:
        quota, usage = selectors.quota_for(request.user), selectors.usage_of(request.user)
    defaults = {
        t.name: {
            "vcpus": t.vcpus,
            "memory_mib": t.memory_mib,
            "disk_gib": t.disk_gib,
            "max_vcpus": t.max_vcpus,
            "max_memory_mib": t.max_memory_mib,
            "max_disk_gib": t.max_disk_gib,
        }
        for t in templates
    }
    return render(
        request,
        "vms/create.html",
        {
            "form": form,
            "templates": templates,
            "quota": quota,
            "usage": usage,
            "template_defaults": defaults,
            "current_project": project,
        },
    )


@login_required
def vm_detail(request, vm_id):
    vm = selectors.vm_list_visible(request.user).filter(pk=vm_id).first()
    if vm is None:
        raise Http404
    held = vm_rights(request.user, [vm])[str(vm.pk)]
    perms = {p: p in held for p in VM_RIGHTS}
    events = account_selectors.audit_events_visible(request.user).filter(object_id=str(vm.pk))[:50]
    current = (
        Operation.objects.filter(vm_id=vm.pk, status__in=[Operation.Status.PENDING, Operation.Status.RUNNING])
        .order_by("-created_at")
        .first()
    )
    resize_states = sorted(TRANSITIONS["resize"].allowed_from | {VmState.STOPPED}) if resize_live(vm) else ["stopped"]
    return render(
        request,
        "vms/detail.html",
        {
            "vm": vm,
            "perms": perms,
            "events": events,
            "addresses": vm_addresses([vm.pk]).get(str(vm.pk), []),
            "actions": vm_actions_allowed(vm.state),
            "state_actions": state_actions(),
            "resize_states": resize_states,
            "operation": current,
            "operation_elapsed": _elapsed(current),
            "operation_step": operation_step(current.log) if current else "",
            "uptime_since": vm.started_at if vm.state == VmState.RUNNING else None,
            "upload_max_bytes": settings.SANDBOX_FILE_UPLOAD_MAX_BYTES,
        },
    )


def _elapsed(op) -> float:
    if op is None:
        return 0.0
    return round((timezone.now() - (op.started_at or op.created_at)).total_seconds(), 1)


def _operator_only(request) -> None:
    if not user_is_operator(request.user):
        raise PermissionDenied


@login_required
def host_list(request):
    """Operators: each host's capacity, what its VMs use, hostd's link state, last heartbeat."""
    _operator_only(request)
    hosts = selectors.host_list_with_usage(timezone.now())
    return render(request, "vms/hosts.html", {"hosts": hosts, "down_after": settings.SANDBOX_HOST_DOWN_SECONDS})


@login_required
def system_status(request):
    """Operators: queue depths, failing and stuck operations, this web process's readiness."""
    from sandbox_site.health import readiness_checks
    from sandbox_site.metrics import queue_depths

    _operator_only(request)
    checks = readiness_checks()
    failed = selectors.operation_list_failing(since=timezone.now() - timedelta(hours=24))
    return render(
        request,
        "vms/system.html",
        {
            "checks": checks,
            "ready": all(c["ok"] for c in checks.values()),
            "queues": queue_depths(),
            "failed": failed[:50],
            "failed_count": failed.count(),
            "running": selectors.operation_list_running()[:50],
        },
    )


@login_required
def operation_list(request):
    ops = selectors.operation_list_visible(request.user)[:200]
    return render(request, "vms/operations.html", {"operations": ops})


@login_required
def audit_list(request):
    qs = account_selectors.audit_events_visible(request.user)
    error = None
    try:
        qs = account_selectors.audit_events_filter(qs, request.GET)
    except ApplicationError as exc:
        error = exc.message
        qs = qs.none()
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    params = request.GET.copy()
    params.pop("page", None)
    return render(
        request,
        "vms/audit.html",
        {
            "page": page,
            "error": error,
            "filters": request.GET,
            "query": params.urlencode(),
            "sees_all": user_is_operator(request.user),
        },
    )
