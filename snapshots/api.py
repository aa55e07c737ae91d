from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import ObjectPermissionViewSet, VmNestedViewSet, project_or_404
from snapshots import selectors, services
from snapshots.models import Snapshot
from snapshots.serializers import (
    RetentionPolicyResultSerializer,
    RetentionPolicySerializer,
    SnapshotCloneSerializer,
    SnapshotCreatedSerializer,
    SnapshotCreateSerializer,
    SnapshotSerializer,
    VmRetentionPolicyResultSerializer,
    retention_body,
)
from vms.serializers import OperationSerializer, VmCreatedSerializer, VmSerializer


class SnapshotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ObjectPermissionViewSet):
    """Snapshots of the VMs the user may view (``?vm=<id>`` filters). Restore, clone and
    delete need the ``snapshot`` permission on the snapshot's VM."""

    queryset = Snapshot.objects.all()
    serializer_class = SnapshotSerializer
    audit_prefix = "snapshot"
    action_perms = {"restore": "snapshot", "clone": "snapshot", "destroy": "snapshot"}

    def perm_codename(self, perm: str) -> str:
        return f"vms.{perm}_vm"

    def get_queryset(self):
        qs = selectors.snapshot_list_visible(self.request.user)
        vm = self.request.query_params.get("vm")
        if vm:
            qs = qs.filter(vm_ref=vm) if selectors.is_uuid(vm) else qs.none()
        state = self.request.query_params.get("state")
        if state:
            qs = qs.filter(state=state)
        return qs

    def has_object_perm(self, perm: str, obj) -> bool:
        # A snapshot's rights are those of its VM (or its owner's once the VM is gone).
        return selectors.snapshot_user_can(self.request.user, perm, obj)

    @extend_schema(request=None, responses={202: SnapshotSerializer})
    def destroy(self, request, id=None):
        snapshot = services.snapshot_delete(snapshot=self.get_object(), actor=request.user)
        return Response(SnapshotSerializer(snapshot).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def restore(self, request, id=None):
        op = services.snapshot_restore(snapshot=self.get_object(), actor=request.user)
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=SnapshotCloneSerializer,
        responses={202: inline_serializer("SnapshotCloneResult", {"vms": VmCreatedSerializer(many=True)})},
    )
    @action(detail=True, methods=["post"])
    def clone(self, request, id=None):
        snapshot = self.get_object()
        data = SnapshotCloneSerializer(data=request.data or {})
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        if "project" in values:
            values["project"] = project_or_404(request.user, values["project"])
        created = services.snapshot_clone(snapshot=snapshot, actor=request.user, **values)
        body = []
        for vm, op in created:
            row = VmSerializer(vm).data
            row["operation"] = str(op.pk)
            body.append(row)
        return Response({"vms": body}, status=status.HTTP_202_ACCEPTED)


class VmSnapshotViewSet(VmNestedViewSet):
    """``/api/v1/vms/{vm_id}/snapshots/``: ``GET`` the VM's snapshots, ``POST {name,
    description, include_memory}`` take one; ``/snapshot-retention/``: ``GET``/``PUT
    {keep_last, keep_days}`` the VM's retention policy (both null removes it)."""

    serializer_class = SnapshotSerializer
    audit_prefix = "snapshot"
    action_perms = {"list": "view", "create": "snapshot", "retention": "view", "retention_set": "snapshot"}

    @extend_schema(responses={200: SnapshotSerializer(many=True)})
    def list(self, request, vm_id=None):
        qs = selectors.snapshot_list_visible(request.user).filter(vm=self.vm)
        return Response(SnapshotSerializer(qs, many=True).data)

    @extend_schema(request=SnapshotCreateSerializer, responses={202: SnapshotCreatedSerializer})
    def create(self, request, vm_id=None):
        data = SnapshotCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        snapshot, op = services.snapshot_create(vm=self.vm, actor=request.user, **data.validated_data)
        body = SnapshotSerializer(snapshot).data
        body["operation"] = str(op.pk)
        return Response(body, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={200: VmRetentionPolicyResultSerializer})
    def retention(self, request, vm_id=None):
        policy = selectors.retention_policy_for(self.vm)
        body = {**retention_body(policy), "scope": ("vm" if policy.vm_id else "user") if policy else None}
        return Response(VmRetentionPolicyResultSerializer(body).data)

    @extend_schema(request=RetentionPolicySerializer, responses={200: RetentionPolicyResultSerializer})
    def retention_set(self, request, vm_id=None):
        data = RetentionPolicySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        policy = services.retention_policy_set(
            actor=request.user,
            vm=self.vm,
            keep_last=data.validated_data.get("keep_last"),
            keep_days=data.validated_data.get("keep_days"),
        )
        return Response(RetentionPolicyResultSerializer(retention_body(policy)).data)


class MySnapshotRetentionView(APIView):
    """``GET``/``PUT`` the signed-in user's default retention policy for all their VMs."""

    @extend_schema(responses={200: RetentionPolicyResultSerializer})
    def get(self, request):
        from snapshots.models import RetentionPolicy

        policy = RetentionPolicy.objects.filter(user=request.user).first()
        return Response(RetentionPolicyResultSerializer(retention_body(policy)).data)

    @extend_schema(request=RetentionPolicySerializer, responses={200: RetentionPolicyResultSerializer})
    def put(self, request):
        data = RetentionPolicySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        policy = services.retention_policy_set(
            actor=request.user,
            user=request.user,
            keep_last=data.validated_data.get("keep_last"),
            keep_days=data.validated_data.get("keep_days"),
        )
        return Response(RetentionPolicyResultSerializer(retention_body(policy)).data)
