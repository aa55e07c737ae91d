from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from guardian.shortcuts import get_groups_with_perms, get_users_with_perms
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from accounts import services as account_services
from accounts.permissions import ObjectPermissionViewSet, project_or_404, vm_for
from sandbox_site.pagination import RowsCountedBy
from vms import migration, moves, selectors, services
from vms.models import VM, VM_ROW_RELATED, Operation, VmState
from vms.serializers import (
    OPERATION_ROWS,
    VM_DETAIL,
    VM_ROWS,
    GrantSerializer,
    OperationSerializer,
    RevokeSerializer,
    TemplateSerializer,
    VmActionSerializer,
    VmCreatedSerializer,
    VmCreateSerializer,
    VmMigrateSerializer,
    VmMoveSerializer,
    VmSerializer,
    VmUpdateSerializer,
)

_PERMISSIONS = inline_serializer(
    "VmPermissions",
    {
        "users": inline_serializer(
            "VmUserPermissions",
            {"user": serializers.CharField(), "permissions": serializers.ListField(child=serializers.CharField())},
            many=True,
        ),
        "groups": inline_serializer(
            "VmGroupPermissions",
            {"group": serializers.CharField(), "permissions": serializers.ListField(child=serializers.CharField())},
            many=True,
        ),
    },
)
_GRANTED = inline_serializer(
    "VmPermissionsGranted", {"permissions": serializers.ListField(child=serializers.CharField())}
)


def _operation_response(op) -> Response:
    return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)


class VmViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ObjectPermissionViewSet):
    queryset = VM.objects.select_related(*VM_ROW_RELATED)
    serializer_class = VmSerializer
    audit_prefix = "vm"
    action_perms = {
        "start": "power",
        "stop": "power",
        "reboot": "power",
        "pause": "power",
        "resume": "power",
        "permissions": "view",
        "grant": "change",
        "revoke": "change",
        "operations": "view",
        "agent": "view",
        "samples": "view",
        "console_ticket": "view",
        "console_log": "view",
        "move": "view",  # and the operator's vms.change_host (vms.moves)
        "migrate": "view",  # seeing it; vms.migration.vm_migrate checks the operator's right
    }

    def _checked_object(self):
        # The one VM lookup of every VM endpoint (same 404/403 + audit as the base's).
        return vm_for(self.request.user, self.kwargs["id"], self.required_perm(), action=self.audit_action())

    def get_queryset(self):
        qs = super().get_queryset()
        if self.action != "list":  # the filters narrow the list only, never a lookup by id
            return qs
        state = self.request.query_params.get("state")
        if state:
            qs = qs.filter(state=state)
        name = self.request.query_params.get("name")
        if name:
            qs = qs.filter(name__icontains=name[:63])
        return qs

    @extend_schema(
        parameters=[
            OpenApiParameter("state", str, enum=VmState.values, description="only VMs in this state"),
            OpenApiParameter(
                "name",
                str,
                description="only VMs whose name contains this (case-insensitive; the first 63 characters "
                "count). Clients resolve a VM name with it and keep the exact match.",
            ),
        ]
    )
    def list(self, request, *args, **kwargs):
        # values() rows rendered with VmSerializer's fields: no model instances (sandbox_site/api_rows.py).
        visible = self.filter_queryset(self.get_queryset())
        rows = selectors.vm_list_rows(visible, VM_ROWS.values)
        return self.get_paginated_response(VM_ROWS.render_many(self.paginate_queryset(RowsCountedBy(rows, visible))))

    def retrieve(self, request, *args, **kwargs):
        return Response(VM_DETAIL.render(self.get_object()))  # VmSerializer's output (sandbox_site/api_rows.py)

    @extend_schema(request=VmCreateSerializer, responses={202: VmCreatedSerializer})
    def create(self, request):
        data = VmCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        if "project" in values:
            values["project"] = project_or_404(request.user, values["project"])
        vm, op = services.vm_create(owner=request.user, actor=request.user, **values)
        body = VmSerializer(vm).data
        body["operation"] = str(op.pk)
        return Response(body, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=VmUpdateSerializer, responses={200: VmSerializer, 202: OperationSerializer})
    def partial_update(self, request, id=None):
        vm = self.get_object()
        data = VmUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        if "name" in values or "metadata" in values:
            vm = services.vm_update(vm=vm, actor=request.user, name=values.get("name"), metadata=values.get("metadata"))
        if "vcpus" in values or "memory_mib" in values:
            result = services.vm_resize(
                vm=vm, actor=request.user, vcpus=values.get("vcpus"), memory_mib=values.get("memory_mib")
            )
            if not isinstance(result, VM):
                return _operation_response(result)
            vm = result
        return Response(VmSerializer(vm).data)

    @extend_schema(request=None, responses={202: OperationSerializer})
    def destroy(self, request, id=None):
        return _operation_response(services.vm_action(vm=self.get_object(), action="delete", actor=request.user))

    def _act(self, request, name: str) -> Response:
        vm = self.get_object()
        data = VmActionSerializer(data=request.data or {})
        data.is_valid(raise_exception=True)
        return _operation_response(services.vm_action(vm=vm, action=name, actor=request.user, **data.validated_data))

    @extend_schema(request=VmActionSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request, id=None):
        return self._act(request, "start")

    @extend_schema(request=VmActionSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request, id=None):
        return self._act(request, "stop")

    @extend_schema(request=VmActionSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def reboot(self, request, id=None):
        return self._act(request, "reboot")

    @extend_schema(request=VmActionSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def pause(self, request, id=None):
        return self._act(request, "pause")

    @extend_schema(request=VmActionSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def resume(self, request, id=None):
        return self._act(request, "resume")

    @extend_schema(request=VmMoveSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def move(self, request, id=None):
        """Operators: move the VM (stopped or running) to another host (docs/scale-out.md)."""
        vm = self.get_object()
        data = VmMoveSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return _operation_response(moves.vm_move_to(vm=vm, host_name=data.validated_data["host"], actor=request.user))

    @extend_schema(request=VmMigrateSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def migrate(self, request, id=None):
        vm = self.get_object()
        data = VmMigrateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return _operation_response(migration.vm_migrate(vm=vm, host=data.validated_data["host"], actor=request.user))

    @extend_schema(responses={200: OperationSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def operations(self, request, id=None):
        vm = self.get_object()
        rows = vm.operations.values(*OPERATION_ROWS.values)
        return self.get_paginated_response(OPERATION_ROWS.render_many(self.paginate_queryset(rows)))

    @extend_schema(
        request=None,
        responses={
            201: inline_serializer(
                "ConsoleTicket",
                {
                    "ticket": serializers.CharField(),
                    "expires_in": serializers.IntegerField(),
                    "url": serializers.CharField(),
                },
            )
        },
    )
    @action(detail=True, methods=["post"], url_path="console-ticket")
    def console_ticket(self, request, id=None):
        """A short-lived single-use ticket for ``/ws/vms/{id}/console/?ticket=`` (non-browser clients).
        View rights give a read-only console; the console right allows typing."""
        from django.conf import settings

        from vms.consoles import console_ticket_mint

        vm = self.get_object()
        ticket = console_ticket_mint(vm=vm, actor=request.user)
        return Response(
            {
                "ticket": ticket,
                "expires_in": settings.SANDBOX_CONSOLE_TICKET_SECONDS,
                "url": f"/ws/vms/{vm.pk}/console/?ticket={ticket}",
            },
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(responses={(200, "text/plain"): OpenApiTypes.BINARY})
    @action(detail=True, methods=["get"], url_path="console/log")
    def console_log(self, request, id=None):
        """Everything the guest wrote to its serial console, as a text download."""
        from django.http import StreamingHttpResponse

        from vms.consoles import console_log_download

        vm = self.get_object()
        try:
            # From the VM's host's hostd, from the oldest byte kept (the log is capped).
            pieces, start = console_log_download(vm)
        except FileNotFoundError:
            raise NotFound("This VM has no console log (yet).") from None
        response = StreamingHttpResponse(pieces, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{vm.name}-console.log"'
        response["X-Console-Log-Offset"] = str(start)
        return response

    @extend_schema(
        parameters=[OpenApiParameter("minutes", int, description="1-360, default 30")],
        responses={
            200: inline_serializer(
                "VmSamples",
                {"vm": serializers.UUIDField(), "points": serializers.ListField(child=serializers.DictField())},
            )
        },
    )
    @action(detail=True, methods=["get"])
    def samples(self, request, id=None):
        """Resource usage over time: CPU %, RSS, disk and network rates (``?minutes=``, max 360)."""
        vm = self.get_object()
        try:
            minutes = min(max(int(request.query_params.get("minutes", 30)), 1), 360)
        except ValueError:
            minutes = 30
        from vms.consoles import console_log_bytes

        points = selectors.vm_samples_rates(vm=vm, minutes=minutes)
        return Response({"vm": str(vm.pk), "points": points, "console_log_bytes": console_log_bytes(vm.pk)})

    @extend_schema(
        responses={
            200: OpenApiResponse(
                OpenApiTypes.OBJECT, description="agent_version, protocol, boot_id, uptime_s, hostname"
            )
        }
    )
    @action(detail=True, methods=["get"])
    def agent(self, request, id=None):
        """Ping the guest agent: its version, boot id and uptime (409 unless running)."""
        return Response(services.vm_agent_ping(vm=self.get_object()))

    @extend_schema(responses={200: _PERMISSIONS})
    @action(detail=True, methods=["get"])
    def permissions(self, request, id=None):
        """Who holds which rights on this VM."""
        vm = self.get_object()
        users = get_users_with_perms(vm, attach_perms=True, with_group_users=False)
        groups = get_groups_with_perms(vm, attach_perms=True)
        return Response(
            {
                "users": [{"user": u.username, "permissions": sorted(p)} for u, p in users.items()],
                "groups": [{"group": g.name, "permissions": sorted(p)} for g, p in groups.items()],
            }
        )

    @extend_schema(request=GrantSerializer, responses={200: _GRANTED})
    @permissions.mapping.post
    def grant(self, request, id=None):
        vm = self.get_object()
        data = GrantSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user, group = _grantee(data.validated_data)
        perms = account_services.object_perms_grant(
            obj=vm, perms=data.validated_data["permissions"], actor=request.user, user=user, group=group
        )
        return Response({"permissions": perms})

    @extend_schema(request=RevokeSerializer, responses={200: _GRANTED})
    @permissions.mapping.delete
    def revoke(self, request, id=None):
        vm = self.get_object()
        data = RevokeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user, group = _grantee(data.validated_data)
        perms = account_services.object_perms_revoke(
            obj=vm, perms=data.validated_data.get("permissions"), actor=request.user, user=user, group=group
        )
        return Response({"permissions": perms})


def _grantee(values):
    if values.get("user"):
        user = get_user_model().objects.filter(username=values["user"], is_active=True).first()
        if user is None:
            raise NotFound("No such user.")
        return user, None
    group = Group.objects.filter(name=values["group"]).first()
    if group is None:
        raise NotFound("No such group.")
    return None, group


class OperationViewSet(viewsets.ReadOnlyModelViewSet):
    """Operations on VMs the user may view, or that the user asked for."""

    queryset = Operation.objects.all()
    serializer_class = OperationSerializer
    lookup_field = "id"
    lookup_value_converter = "uuid"

    def get_queryset(self):
        qs = selectors.operation_list_visible(self.request.user)
        vm = self.request.query_params.get("vm")
        if vm:
            qs = qs.filter(vm_ref=vm) if _is_uuid(vm) else qs.none()
        return qs

    def list(self, request, *args, **kwargs):
        # values() rows rendered with OperationSerializer's fields (sandbox_site/api_rows.py).
        visible = self.filter_queryset(self.get_queryset())
        rows = RowsCountedBy(visible.values(*OPERATION_ROWS.values), visible)
        return self.get_paginated_response(OPERATION_ROWS.render_many(self.paginate_queryset(rows)))


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class TemplateViewSet(viewsets.ReadOnlyModelViewSet):
    """Templates are managed by operators in the admin; everyone signed in can read them."""

    serializer_class = TemplateSerializer
    lookup_field = "name"

    def get_queryset(self):
        """``?project=<id or slug>``: the templates that project may use."""
        from accounts import selectors as account_selectors

        ref = self.request.query_params.get("project")
        project = account_selectors.project_by_ref(ref) if ref else None
        if ref and (project is None or not account_selectors.project_visible_to(self.request.user, project)):
            return selectors.template_list_active().none()
        return selectors.template_list_active(project)
