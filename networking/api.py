"""Networks (``/api/v1/networks/``, ``ObjectPermissionViewSet``) and the network side of a VM
(``/api/v1/vms/{vm_id}/port-forwards/``, ``/nics/``, ``/egress/``, ``VmNestedViewSet``):
invisible -> 404, visible but not allowed -> 403 + audit."""

import re

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from accounts.permissions import ObjectPermissionViewSet, VmNestedViewSet
from networking import selectors, services
from networking.models import Network, PortForward
from networking.serializers import (
    NetworkCreateSerializer,
    NetworkSerializer,
    NetworkUpdateSerializer,
    NicSerializer,
    PortForwardCreateSerializer,
    PortForwardSerializer,
    VmEgressResultSerializer,
    VmEgressSerializer,
)


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
    action_perms = {"nics": "view", "egress": "change"}

    @extend_schema(responses={200: NicSerializer(many=True)})
    def nics(self, request, vm_id=None):
        return Response(NicSerializer(selectors.nics_of(self.vm), many=True).data)

    @extend_schema(request=VmEgressSerializer, responses={200: VmEgressResultSerializer})
    def egress(self, request, vm_id=None):
        vm = self.vm
        data = VmEgressSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        result = services.vm_egress_set(
            vm=vm, actor=request.user, mode=data.validated_data["mode"], rules=data.validated_data.get("rules")
        )
        return Response(result)
