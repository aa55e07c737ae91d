"""``/api/v1/hosts/``: operators list the hypervisor hosts (capacity, what VMs hold, heartbeat)
cordon or uncordon one, and remove an empty one. Thin: a write is one ``vms.hosts`` service call."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import mixins
from rest_framework.decorators import action
from rest_framework.response import Response

from accounts.permissions import ObjectPermissionViewSet
from vms import hosts, selectors
from vms.models import Host
from vms.serializers import HostDrainSerializer, HostSerializer


class HostViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, ObjectPermissionViewSet):
    """Visible to holders of ``vms.view_host`` (the operator role); users see an empty list.
    Removed (inactive) hosts are listed too, marked ``is_active: false``."""

    queryset = Host.objects.all()
    serializer_class = HostSerializer
    audit_prefix = "host"
    pagination_class = None
    action_perms = {"cordon": "change", "uncordon": "change", "drain": "change"}

    def list(self, request):
        rows = selectors.host_list_with_usage(timezone.now(), hosts=self.get_queryset())
        return Response(HostSerializer(rows, many=True).data)

    def retrieve(self, request, id=None):
        host = self.get_object()
        row = selectors.host_list_with_usage(timezone.now(), hosts=Host.objects.filter(pk=host.pk))[0]
        return Response(HostSerializer(row).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request, id=None):
        hosts.host_remove(host=self.get_object(), actor=request.user)
        return Response(status=204)

    @extend_schema(request=None, responses={200: HostSerializer})
    @action(detail=True, methods=["post"])
    def cordon(self, request, id=None):
        hosts.host_cordon(host=self.get_object(), cordoned=True, actor=request.user)
        return self.retrieve(request, id=id)

    @extend_schema(request=None, responses={200: HostSerializer})
    @action(detail=True, methods=["post"])
    def uncordon(self, request, id=None):
        hosts.host_cordon(host=self.get_object(), cordoned=False, actor=request.user)
        return self.retrieve(request, id=id)

    @extend_schema(request=None, responses={202: HostDrainSerializer})
    @action(detail=True, methods=["post"])
    def drain(self, request, id=None):
        """Cordon the host and move its VMs away; ``stays`` lists the VMs that fit nowhere."""
        result = hosts.host_drain(host=self.get_object(), actor=request.user)
        return Response(HostDrainSerializer(result).data, status=202)
