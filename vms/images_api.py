"""``/api/v1/images/``: list and read the images a user may pick; operators upload, register,
update, deprecate and delete them. Thin: every write is one ``vms.images`` service call."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response

from accounts.permissions import ObjectPermissionViewSet
from vms import images
from vms.models import Image
from vms.serializers import (
    ImageCreateSerializer,
    ImageDeprecateSerializer,
    ImageSerializer,
    ImageUpdateSerializer,
)


class ImageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ObjectPermissionViewSet):
    """Public images are visible to every signed-in user; private ones to those holding
    ``view_image`` (shared, or the operator role). ``?all=1`` lists deprecated ones too."""

    queryset = Image.objects.select_related("created_by")
    serializer_class = ImageSerializer
    audit_prefix = "image"
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    action_perms = {"deprecate": "change"}

    def get_queryset(self):
        qs = images.images_visible(self.request.user).select_related("created_by")
        if self.action == "list" and self.request.query_params.get("all") not in ("1", "true"):
            qs = qs.filter(deprecated_at__isnull=True)
        return qs

    @extend_schema(request=ImageCreateSerializer, responses={201: ImageSerializer})
    def create(self, request):
        data = ImageCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        upload = fields.pop("file", None)
        path = fields.pop("path", None)
        if upload is not None:
            image = images.image_upload(actor=request.user, chunks=upload.chunks(), **fields)
        else:
            image = images.image_register(actor=request.user, path=path, **fields)
        return Response(ImageSerializer(image).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ImageUpdateSerializer, responses={200: ImageSerializer})
    def partial_update(self, request, id=None):
        data = ImageUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        image = images.image_update(image=self.get_object(), actor=request.user, **data.validated_data)
        return Response(ImageSerializer(image).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request, id=None):
        images.image_delete(image=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=ImageDeprecateSerializer, responses={200: ImageSerializer})
    @action(detail=True, methods=["post"])
    def deprecate(self, request, id=None):
        data = ImageDeprecateSerializer(data=request.data or {})
        data.is_valid(raise_exception=True)
        image = images.image_deprecate(image=self.get_object(), actor=request.user, **data.validated_data)
        return Response(ImageSerializer(image).data)
