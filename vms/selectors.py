"""Reads about VMs, templates and operations."""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.db.models import Count, F, Func, IntegerField, OuterRef, Q, Subquery, Sum
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce

from accounts.context import current_context
from accounts.permissions import visible_queryset
from accounts.roles import user_is_operator
from accounts.selectors import quota_of_user
from sandbox_site import sql_rows
from vms.models import VM, VM_ROW_RELATED, HostImage, Operation, Template, VmState

# States whose VM holds its vCPUs and memory on its host (``creating``: a create boots).
HOST_LOAD_STATES = (
    "creating", "running", "paused", "starting", "pausing", "resuming", "rebooting", "resizing", "snapshotting",
    "stopping", "unknown", "moving", "migrating",
)  # fmt: skip


def host_heartbeat_age(host, now) -> float | None:
    """Seconds since the host last answered (the older of its worker's and hostd's
    heartbeat), or None when it never did."""
    if host.last_seen_at is None or host.hostd_seen_at is None:
        return None
    return (now - min(host.last_seen_at, host.hostd_seen_at)).total_seconds()


def host_is_up(host, now) -> bool:
    """Whether the host's worker and hostd answered within ``SANDBOX_HOST_DOWN_SECONDS``."""
    age = host_heartbeat_age(host, now)
    return age is not None and age <= settings.SANDBOX_HOST_DOWN_SECONDS


def hosts_with_load(hosts, *, exclude_vm_id=None):
    """``hosts`` (a Host queryset) annotated with what the VMs holding their size there add up
    to: ``vcpus_used``, ``memory_used_mib`` (guest RAM) and ``vms_holding``. A VM holds its size
    on its host in ``HOST_LOAD_STATES`` and, a running VM being moved or live-migrated, on its
    ``move_target`` too (it boots or is received there; ``vms.moves``, ``vms.migration``). The
    one place a host's load is computed (admission, placement, the hosts page, metrics);
    ``exclude_vm_id``: a VM not counted (the one being admitted)."""
    incoming = (VmState.MOVING, VmState.MIGRATING)

    def total(expression: str, column: str):
        holding = VM.objects.filter(
            Q(host=OuterRef("pk"), state__in=HOST_LOAD_STATES) | Q(move_target=OuterRef("pk"), state__in=incoming)
        )
        if exclude_vm_id is not None:
            holding = holding.exclude(pk=exclude_vm_id)
        summed = holding.order_by().annotate(total=Func(F(column), function=expression)).values("total")
        return Coalesce(Subquery(summed, output_field=IntegerField()), 0)

    return hosts.annotate(
        vcpus_used=total("SUM", "vcpus"), memory_used_mib=total("SUM", "memory_mib"), vms_holding=total("COUNT", "pk")
    )


def host_list_with_usage(now, hosts=None):
    """Hosts (all, or the ``hosts`` queryset) with ``up``, ``heartbeat_age``, VM counts, the
    images they hold (``image_copies``: ``HostImage`` rows), vCPUs/memory given to VMs and
    ``room`` (what admission allows and what VMs hold,
    ``vms.admission.host_room``)."""
    from vms.admission import host_room_of
    from vms.models import Host

    hosts = list(
        hosts_with_load(Host.objects.all() if hosts is None else hosts).order_by("name").annotate(vm_count=Count("vms"))
    )
    states: dict[int, dict[str, int]] = {}
    for host_id, state, n in (
        VM.objects.filter(host__isnull=False).values_list("host_id", "state").annotate(n=Count("pk")).order_by()
    ):
        states.setdefault(host_id, {})[state] = n
    held: dict = {}
    for row in (
        HostImage.objects.filter(host__in=[host.pk for host in hosts]).select_related("image").order_by("image__name")
    ):
        held.setdefault(row.host_id, []).append(row)
    for host in hosts:
        host.up = host_is_up(host, now)
        host.image_copies = held.get(host.pk, [])
        host.heartbeat_age = host_heartbeat_age(host, now)
        host.vm_states = states.get(host.pk, {})
        host.room = host_room_of(host, vcpus=host.vcpus_used, memory_mib=host.memory_used_mib, vms=host.vms_holding)
        host.vcpus_percent = (
            round(100 * host.room.vcpus_used / host.room.vcpus_allowed) if host.room.vcpus_allowed else 0
        )
        host.memory_percent = (
            round(100 * host.room.memory_used_mib / host.room.memory_allowed_mib) if host.room.memory_allowed_mib else 0
        )
    return hosts


def operation_list_failing(*, since):
    """Operations that failed since ``since``, newest first (operator pages)."""
    return Operation.objects.filter(status=Operation.Status.FAILED, finished_at__gte=since).select_related(
        "vm", "requested_by"
    )


def operation_list_running():
    """Operations pending or running, oldest first (operator pages)."""
    return (
        Operation.objects.filter(status__in=[Operation.Status.PENDING, Operation.Status.RUNNING])
        .select_related("vm", "requested_by")
        .order_by("created_at")
    )


def vm_list_rows(queryset, fields):
    """``queryset``'s VMs as values() rows of ``fields`` (``vms.serializers.VM_ROWS.values``),
    with the names of their related rows: ``owner_username``, ``project_slug``,
    ``template_name``, ``host_name`` (None without a host) and ``boot_image_name``, the name
    of the image the VM boots (its own, else its template's, as ``VM.boot_image``).

    The names are scalar subqueries on the related rows' primary keys, not joins: PostgreSQL
    planned the page's seven-table join in 3-6 ms on every request (ten times the time it
    took to run it, and more CPU than the web process spent on the page), the subqueries in
    a fraction of a millisecond (issue 15)."""
    return queryset.annotate(**_vm_row_names()).values(*fields)


def _vm_row_names() -> dict[str, RawSQL]:
    vm = VM._meta
    outer = f'"{vm.db_table}"'  # the list's own table: Django leaves the query's base table unaliased

    def name_of(fk: str, column: str) -> str:
        field = vm.get_field(fk)
        target = field.related_model._meta
        return (
            f'(SELECT r."{target.get_field(column).column}" FROM "{target.db_table}" r '  # noqa: S608
            f'WHERE r."{field.target_field.column}" = {outer}."{field.column}")'
        )

    template, image = vm.get_field("template"), Template._meta.get_field("image")
    templates_image = (
        f'(SELECT i."name" FROM "{template.related_model._meta.db_table}" t '  # noqa: S608
        f'JOIN "{image.related_model._meta.db_table}" i ON i."{image.target_field.column}" = t."{image.column}" '
        f'WHERE t."{template.target_field.column}" = {outer}."{template.column}")'
    )
    # Only table and column names from the models' metadata are formatted in; there are no values.
    return {
        "owner_username": RawSQL(name_of("owner", "username"), ()),  # noqa: S611
        "project_slug": RawSQL(name_of("project", "slug"), ()),  # noqa: S611
        "template_name": RawSQL(name_of("template", "name"), ()),  # noqa: S611
        "host_name": RawSQL(name_of("host", "name"), ()),  # noqa: S611
        "boot_image_name": RawSQL(f"COALESCE({name_of('image', 'name')}, {templates_image})", ()),  # noqa: S611
    }


def vm_row(vm_id, related: tuple[str, ...] = ()) -> VM | None:
    """The VM ``vm_id`` with the rows of ``related`` (forward foreign-key paths, as
    ``select_related`` takes them), or None when there is none or ``vm_id`` is malformed. Plain
    SQL (``sandbox_site.sql_rows``): every request on a VM reads it (``accounts.permissions.vm_for``),
    and compiling the ORM's seven-table join cost more CPU than the query. The related rows are
    cached on the instances as ``select_related`` caches them."""
    pk = sql_rows.pk_param(VM, vm_id)
    if pk is None:
        return None
    sql, joined = _vm_row_sql(related)
    row = sql_rows.first_row(sql, [pk])
    if row is None:
        return None
    vm = sql_rows.instance(VM, "v", row)
    objects: dict[str, Any] = {"": vm}
    start = sql_rows.width(VM)
    for path, parent, field, alias in joined:
        model = field.related_model
        owner = objects[parent]
        if owner is None or row[start + _pk_index(model)] is None:  # a null key: no row, as select_related
            objects[path] = None
        else:
            objects[path] = sql_rows.instance(model, alias, row, start)
        if owner is not None:
            field.set_cached_value(owner, objects[path])
        start += sql_rows.width(model)
    return vm


def _pk_index(model) -> int:
    return model._meta.concrete_fields.index(model._meta.pk)


@functools.cache
def _vm_row_sql(related: tuple[str, ...]) -> tuple[str, tuple[tuple[str, str, Any, str], ...]]:
    """``vm_row``'s query for ``related`` (param: the VM's key) and its joins, parents first:
    (path, parent path, foreign key, alias). A nullable key, or one under a nullable key, is a
    LEFT JOIN; only the models' table and column names are formatted in."""
    paths: list[str] = []
    for path in related:
        parts = path.split("__")
        paths += ["__".join(parts[: i + 1]) for i in range(len(parts)) if "__".join(parts[: i + 1]) not in paths]
    joined: list[tuple[str, str, Any, str]] = []
    selected, joins = [sql_rows.columns(VM, "v")], []
    models: dict[str, Any] = {"": VM}
    aliases, outer = {"": "v"}, {"": False}
    for n, path in enumerate(paths):
        parent, _, name = path.rpartition("__")
        field = models[parent]._meta.get_field(name)
        if not field.many_to_one:
            raise ValueError(f"{path}: not a forward foreign key")
        model, alias = field.related_model, f"r{n}"
        models[path], aliases[path] = model, alias
        outer[path] = outer[parent] or field.null
        target = field.target_field.column
        joins.append(
            f'{"LEFT JOIN" if outer[path] else "JOIN"} "{model._meta.db_table}" {alias} '
            f'ON {alias}."{target}" = {aliases[parent]}."{field.column}"'
        )
        selected.append(sql_rows.columns(model, alias))
        joined.append((path, parent, field, alias))
    sql = (
        f'SELECT {", ".join(selected)} FROM "{VM._meta.db_table}" v {" ".join(joins)} '  # noqa: S608
        f'WHERE v."{VM._meta.pk.column}" = %s'
    )
    return sql, tuple(joined)


def vm_list_visible(user):
    return visible_queryset(user, VM.objects.select_related(*VM_ROW_RELATED), "view")


def operation_list_visible(user):
    qs = Operation.objects.select_related("requested_by", "vm")
    if (scope := current_context().token_project_id) is not None:  # a token limited to a project
        qs = qs.filter(vm__project_id=scope)
    if user_is_operator(user):
        return qs
    # A union of three indexed lookups, not one OR: PostgreSQL cannot use an index for an OR
    # across a subquery and two columns, and scanned every operation of every user. Written as
    # SQL around the visible VMs' subquery, compiled once here: the list compiles its filter
    # twice (page and COUNT), and the ORM's union of three querysets cost more CPU than the
    # database's answer (issue 15). Only table and column names are formatted in.
    vms_sql, vms_params = visible_queryset(user, VM.objects.order_by(), "view").values("pk").query.sql_with_params()
    table = Operation._meta.db_table
    column = {name: Operation._meta.get_field(name).column for name in ("id", "vm", "requested_by", "vm_owner_id")}
    union = (
        f'SELECT o."{column["id"]}" FROM "{table}" o WHERE o."{column["vm"]}" IN ({vms_sql}) '  # noqa: S608
        f'UNION ALL SELECT o."{column["id"]}" FROM "{table}" o WHERE o."{column["requested_by"]}" = %s '
        f'UNION ALL SELECT o."{column["id"]}" FROM "{table}" o WHERE o."{column["vm_owner_id"]}" = %s'
    )
    return qs.filter(pk__in=RawSQL(union, (*vms_params, user.pk, user.pk)))  # noqa: S611 - values are parameters


def template_list_active(project=None):
    """Active templates; with ``project``, those it may use (all when it names none)."""
    templates = Template.objects.filter(is_active=True).select_related("image")
    if project is not None and project.templates.exists():
        templates = templates.filter(projects=project)
    return templates


def quota_for(user) -> dict[str, int]:
    return quota_of_user(user)


def _vms_usage(vms_qs, *, exclude_vm_id, snapshot_gib: int) -> dict[str, int]:
    """What the VMs of ``vms_qs`` (but ``exclude_vm_id``) hold, plus ``snapshot_gib`` of
    snapshot storage and their console logs: both count against the same disk limit."""
    qs = vms_qs.exclude(state=VmState.DELETING)
    if exclude_vm_id is not None:
        qs = qs.exclude(pk=exclude_vm_id)
    agg = qs.aggregate(vcpus=Sum("vcpus"), memory_mib=Sum("memory_mib"), disk_gib=Sum("disk_gib"), n=Count("pk"))
    vms = agg["n"] or 0
    return {
        "vms": vms,
        "vcpus": agg["vcpus"] or 0,
        "memory_mib": agg["memory_mib"] or 0,
        "disk_gib": (agg["disk_gib"] or 0) + snapshot_gib + console_logs_gib(vms),
    }


def usage_of(user, *, exclude_vm_id=None) -> dict[str, int]:
    return _vms_usage(
        VM.objects.filter(owner=user), exclude_vm_id=exclude_vm_id, snapshot_gib=_snapshot_storage_gib(user)
    )


def usage_of_project(project, *, exclude_vm_id=None) -> dict[str, int]:
    """What ``project``'s VMs and snapshots use (the budget its members share)."""
    from snapshots.selectors import snapshot_storage_gib_of_project

    return _vms_usage(
        VM.objects.filter(project=project),
        exclude_vm_id=exclude_vm_id,
        snapshot_gib=snapshot_storage_gib_of_project(project),
    )


def console_logs_gib(vm_count: int) -> int:
    """Disk the console logs of ``vm_count`` VMs may take, in whole GiB: hostd keeps each
    ``serial.log`` at most ``SANDBOX_CONSOLE_LOG_MAX_BYTES`` long, so each VM is counted at that cap."""
    return -(-vm_count * settings.SANDBOX_CONSOLE_LOG_MAX_BYTES // (1 << 30))


def _snapshot_storage_gib(user) -> int:
    from snapshots.selectors import snapshot_storage_gib

    return snapshot_storage_gib(user)


def vm_samples_rates(*, vm, minutes: int) -> list[dict]:
    from datetime import timedelta

    from django.utils import timezone

    from vms.models import ResourceSample
    from vms.sampling import samples_as_rates

    since = timezone.now() - timedelta(minutes=minutes)
    samples = list(ResourceSample.objects.filter(vm=vm, taken_at__gte=since).order_by("taken_at")[:5000])
    return samples_as_rates(samples)
