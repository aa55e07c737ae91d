"""Dashboard pages. Reads come from selectors; writes go through services (forms) or the
JSON API (buttons, with the session's CSRF token)."""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone

from accounts import selectors as account_selectors
from accounts.roles import user_is_operator
from accounts.services import user_has_perm
from sandbox_site.errors import ApplicationError
from vms import selectors, services
from vms.forms import VmCreateForm
from vms.models import Image


@login_required
def home(request):
    vms = selectors.vm_list_visible(request.user)
    return render(request, "vms/home.html", {"vms": vms, "can_create": user_has_perm(request.user, "vms.add_vm")})


@login_required
def vm_create(request):
    templates = selectors.template_list_active()
    from vms.images import images_visible

    images = images_visible(request.user).filter(status=Image.Status.READY, deprecated_at__isnull=True)
    form = VmCreateForm(request.POST or None, templates=templates, images=images, initial={"start": True})
    if request.method == "POST" and form.is_valid():
        data = {k: v for k, v in form.cleaned_data.items() if v not in (None, "")}
        try:
            vm, _ = services.vm_create(owner=request.user, actor=request.user, **data)
        except ApplicationError as exc:
            form.add_error(None, exc.message)
            for field, message in (exc.details or {}).items() if isinstance(exc.details, dict) else ():
                if field in form.fields:
                    form.add_error(field, str(message))
        else:
            return redirect("dashboard:vm-detail", vm_id=vm.pk)
    quota = selectors.quota_for(request.user)
    usage = selectors.usage_of(request.user)
    return render(request, "vms/create.html", {"form": form, "templates": templates, "quota": quota, "usage": usage})


@login_required
def vm_detail(request, vm_id):
    vm = selectors.vm_list_visible(request.user).filter(pk=vm_id).first()
    if vm is None:
        raise Http404
    perms = {
        p: user_has_perm(request.user, f"vms.{p}_vm", vm)
        for p in ("change", "delete", "power", "console", "exec", "snapshot")
    }
    events = account_selectors.audit_events_visible(request.user).filter(object_id=str(vm.pk))[:50]
    return render(request, "vms/detail.html", {"vm": vm, "perms": perms, "events": events})


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
