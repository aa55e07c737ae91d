"""Networks (``/api/v1/networks/``, ``ObjectPermissionViewSet``) and the network side of a VM
(``/api/v1/vms/{vm_id}/port-forwards/``, ``/nics/``, ``/egress/``, ``VmNestedViewSet``):
invisible -> 404, visible but not allowed -> 403 + audit."""

import re
import uuid

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from accounts.permissions import ObjectPermissionViewSet, VmNestedViewSet
from networking import selectors, services
from networking.models import Network, Nic, PortForward
from networking.serializers import (
    NetworkCreateSerializer,
    NetworkSerializer,
    NetworkUpdateSerializer,
    NicAddedSerializer,
    NicAddSerializer,
    NicSerializer,
    PortForwardCreateSerializer,
    PortForwardSerializer,
    VmEgressResultSerializer,
    VmEgressSerializer,
)
from vms.serializers import OperationSerializer


class NetworkViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ObjectPermissionViewSet):
    queryset = Network.objects.select_related("owner")
    serializer_class = NetworkSerializer
    audit_prefix = "network"

    def get_queryset(self):
        # Shared networks are visible to everyone signed in, which guardian alone cannot express.
        return selectors.network_list_visible(self.request.user)

    def has_object_perm(self, perm: str, obj) -> bool:
        return selectors.network_user_can(self.request.user, perm, obj)

    @extend_schema(request=NetworkCreateSerializer, responses={201: NetworkSerializer})
    def create(self, request):
        data = NetworkCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        network = services.network_create(actor=request.user, **data.validated_data)
        return Response(NetworkSerializer(network).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=NetworkUpdateSerializer, responses={200: NetworkSerializer})
    def partial_update(self, request, id=None):
        network = self.get_object()
        data = NetworkUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        network = services.network_update(network=network, actor=request.user, **data.validated_data)
        return Response(NetworkSerializer(network).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request, id=None):
        services.network_delete(network=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class VmPortForwardViewSet(VmNestedViewSet):
    serializer_class = PortForwardSerializer
    audit_prefix = "portforward"
    action_perms = {"list": "view", "create": "change", "destroy": "change"}

    @extend_schema(responses={200: PortForwardSerializer(many=True)})
    def list(self, request, vm_id=None):
        return Response(PortForwardSerializer(selectors.port_forwards_of(self.vm), many=True).data)

    @extend_schema(request=PortForwardCreateSerializer, responses={201: PortForwardSerializer})
    def create(self, request, vm_id=None):
        vm = self.vm
        data = PortForwardCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        pf = services.port_forward_create(vm=vm, actor=request.user, **data.validated_data)
        return Response(PortForwardSerializer(pf).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request, vm_id=None, pk=None):
        vm = self.vm
        wellformed = re.fullmatch(r"[0-9]{1,18}", str(pk), re.ASCII)  # "²" and 40 digits are 404s, not 500s
        pf = PortForward.objects.filter(vm=vm, pk=pk).select_related("vm__host").first() if wellformed else None
        if pf is None:
            raise NotFound()
        services.port_forward_delete(port_forward=pf, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class VmNetworkViewSet(VmNestedViewSet):
    serializer_class = NicSerializer
    audit_prefix = "vm"
    action_perms = {"nics": "view", "nic_add": "change", "nic_remove": "change", "egress": "change"}

    @extend_schema(responses={200: NicSerializer(many=True)})
    def nics(self, request, vm_id=None):
        return Response(NicSerializer(selectors.nics_of(self.vm), many=True).data)

    @extend_schema(request=NicAddSerializer, responses={201: NicAddedSerializer, 202: NicAddedSerializer})
    def nic_add(self, request, vm_id=None):
        """Add a NIC: at once on a stopped VM (201), by a hot-plug operation on a running one
        whose driver can (202), else 409 ``restart_required``."""
        vm = self.vm
        data = NicAddSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        spec, op = services.vm_nic_add(vm=vm, actor=request.user, **data.validated_data)
        nic = Nic.objects.select_related("network").get(tap=spec.tap)
        body = NicAddedSerializer(nic).data
        body["operation"] = str(op.pk) if op is not None else None
        return Response(body, status=status.HTTP_202_ACCEPTED if op is not None else status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None, 202: OperationSerializer})
    def nic_remove(self, request, vm_id=None, nic_id=None):
        """Remove a NIC: at once from a stopped VM (204), by a hot-unplug operation from a
        running one whose driver can (202), else 409 ``restart_required``."""
        try:
            uuid.UUID(str(nic_id))
        except ValueError:
            raise NotFound() from None
        op = services.vm_nic_remove(vm=self.vm, actor=request.user, nic_id=nic_id)
        if op is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=VmEgressSerializer, responses={200: VmEgressResultSerializer})
    def egress(self, request, vm_id=None):
        vm = self.vm
        data = VmEgressSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        result = services.vm_egress_set(
            vm=vm, actor=request.user, mode=data.validated_data["mode"], rules=data.validated_data.get("rules")
        )
        return Response(result)
