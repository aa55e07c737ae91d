"""API for exec and files in a VM (docs/exec-and-files.md). Thin: every endpoint needs the
``exec`` permission on the VM (declared in ``action_perms``, enforced by ``VmNestedViewSet``
before the handler runs) and calls one service."""

from __future__ import annotations

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from accounts.permissions import VmNestedViewSet
from sandbox_site.validation import int_checked
from vms import exec_services as services

UPLOAD_READ_CHUNK = 256 << 10


class ExecCreateSerializer(serializers.Serializer):
    command = serializers.JSONField(help_text="list of strings (argv) or a string run by /bin/sh -c")
    env = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False, default=dict)
    cwd = serializers.CharField(required=False, allow_blank=True, default="", max_length=4096)
    user = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    timeout = serializers.FloatField(required=False, allow_null=True, default=None, min_value=0.001, max_value=604800)
    stdin = serializers.CharField(required=False, allow_null=True, default=None, trim_whitespace=False)
    stdin_open = serializers.BooleanField(required=False, default=False)
    wait = serializers.BooleanField(required=False, default=True)
    tag = serializers.CharField(required=False, allow_blank=True, default="", max_length=128)
    pty = serializers.DictField(required=False, allow_null=True, default=None)
    buffer_bytes = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=4096, max_value=16 << 20
    )


class StdinSerializer(serializers.Serializer):
    data = serializers.CharField(required=False, allow_blank=True, default="", trim_whitespace=False)
    eof = serializers.BooleanField(required=False, default=False)


class SignalSerializer(serializers.Serializer):
    signal = serializers.CharField(
        required=False, default="TERM", max_length=16, help_text="a number 1-64 or a name like TERM or SIGKILL"
    )


class MkdirSerializer(serializers.Serializer):
    path = serializers.CharField(max_length=4096)
    mode = serializers.IntegerField(required=False, default=0o755, min_value=0, max_value=0o7777)
    parents = serializers.BooleanField(required=False, default=True)


_PATH = OpenApiParameter("path", str, required=True, description="absolute path in the guest", pattern="^/")


class VmExecViewSet(VmNestedViewSet):
    """``/api/v1/vms/{vm_id}/exec/``, ``/execs/...`` and ``/files/...``."""

    serializer_class = ExecCreateSerializer  # schema default; each action declares its own
    vm_related = ()  # the exec services read the VM's own fields only (state, driver, owner_id)
    action_perms = {
        "exec_create": "exec",
        "exec_list": "exec",
        "exec_detail": "exec",
        "exec_stdin": "exec",
        "exec_signal": "exec",
        "file_put": "exec",
        "file_get": "exec",
        "file_delete": "exec",
        "file_stat": "exec",
        "file_list": "exec",
        "file_mkdir": "exec",
    }

    @extend_schema(
        operation_id="vms_exec_create",
        request=ExecCreateSerializer,
        responses={200: OpenApiTypes.OBJECT, 202: OpenApiTypes.OBJECT},
    )
    def exec_create(self, request, vm_id=None):
        vm = self.vm
        data = ExecCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        stdin = values.pop("stdin")
        result = services.vm_exec_start(
            vm=vm, actor=request.user, stdin=stdin.encode() if stdin is not None else None, **values
        )
        return Response(result, status=status.HTTP_200_OK if values["wait"] else status.HTTP_202_ACCEPTED)

    @extend_schema(
        operation_id="vms_execs_list", parameters=[OpenApiParameter("tag", str)], responses=OpenApiTypes.OBJECT
    )
    def exec_list(self, request, vm_id=None):
        vm = self.vm
        return Response(
            {"results": services.vm_exec_list(vm=vm, actor=request.user, tag=request.query_params.get("tag"))}
        )

    @extend_schema(
        operation_id="vms_execs_retrieve",
        responses={200: OpenApiTypes.OBJECT},
        parameters=[
            OpenApiParameter("offset", int),
            OpenApiParameter("limit", int),
            OpenApiParameter("encoding", str, enum=["text", "base64"]),
        ],
    )
    def exec_detail(self, request, vm_id=None, exec_id=None):
        vm = self.vm
        offset = _int_param(request, "offset", 0, maximum=1 << 62)
        limit = min(_int_param(request, "limit", 512 << 10, minimum=1), 512 << 10)
        encoding = "base64" if request.query_params.get("encoding") == "base64" else "text"
        return Response(
            services.vm_exec_output(
                vm=vm, actor=request.user, exec_id=exec_id, offset=offset, limit=limit, encoding=encoding
            )
        )

    @extend_schema(operation_id="vms_execs_stdin", request=StdinSerializer, responses=OpenApiTypes.OBJECT)
    def exec_stdin(self, request, vm_id=None, exec_id=None):
        vm = self.vm
        data = StdinSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(
            services.vm_exec_stdin(
                vm=vm,
                actor=request.user,
                exec_id=exec_id,
                data=data.validated_data["data"].encode(),
                eof=data.validated_data["eof"],
            )
        )

    @extend_schema(operation_id="vms_execs_signal", request=SignalSerializer, responses=OpenApiTypes.OBJECT)
    def exec_signal(self, request, vm_id=None, exec_id=None):
        vm = self.vm
        data = SignalSerializer(data=request.data or {})
        data.is_valid(raise_exception=True)
        return Response(
            services.vm_exec_signal(vm=vm, actor=request.user, exec_id=exec_id, signal=data.validated_data["signal"])
        )

    # ----- files ---------------------------------------------------------------------

    @extend_schema(
        parameters=[
            _PATH,
            OpenApiParameter("mode", str, description="octal, e.g. 0644", pattern="^[0-7]{1,4}$"),
            OpenApiParameter(
                "owner",
                str,
                description="user, user:group or :group",
                pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$",
            ),
            OpenApiParameter("overwrite", bool),
        ],
        request={"application/octet-stream": bytes},
        responses={201: OpenApiTypes.OBJECT},
    )
    def file_put(self, request, vm_id=None):
        """Raw body streamed into the guest file (atomic; sha256 verified end to end)."""
        vm = self.vm
        path = request.query_params.get("path")
        mode_value = services.mode_checked(request.query_params.get("mode"))
        length = request.META.get("CONTENT_LENGTH")
        size = int(length) if length and length.isascii() and length.isdigit() else None
        raw = request._request  # the Django request: its body is read as a stream, never parsed

        def chunks():
            while True:
                piece = raw.read(UPLOAD_READ_CHUNK)
                if not piece:
                    return
                yield piece

        result = services.vm_file_upload(
            vm=vm,
            actor=request.user,
            path=path,
            chunks=chunks(),
            size=size,
            mode=mode_value,
            owner=request.query_params.get("owner") or None,
            overwrite=request.query_params.get("overwrite", "true").lower() not in ("0", "false", "no"),
        )
        return Response(result, status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="vms_files_download",
        parameters=[_PATH],
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    def file_get(self, request, vm_id=None):
        """The file, streamed; ``X-Checksum-Sha256`` is computed by the guest before sending."""
        vm = self.vm
        info = services.vm_file_download_open(vm=vm, actor=request.user, path=request.query_params.get("path"))
        response = StreamingHttpResponse(
            services.file_download_chunks_async(vm, info), content_type="application/octet-stream"
        )
        response["Content-Length"] = str(info["size"])
        response["X-Checksum-Sha256"] = info["sha256"]
        response["Digest"] = "sha-256=" + _b64hex(info["sha256"])
        response["X-File-Mode"] = oct(info.get("mode", 0))
        return response

    @extend_schema(
        operation_id="vms_files_delete", parameters=[_PATH, OpenApiParameter("recursive", bool)], responses={204: None}
    )
    def file_delete(self, request, vm_id=None):
        vm = self.vm
        services.vm_file_remove(
            vm=vm,
            actor=request.user,
            path=request.query_params.get("path"),
            recursive=request.query_params.get("recursive", "").lower() in ("1", "true", "yes"),
        )
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(operation_id="vms_files_stat", parameters=[_PATH], responses=OpenApiTypes.OBJECT)
    def file_stat(self, request, vm_id=None):
        vm = self.vm
        return Response(services.vm_file_stat(vm=vm, actor=request.user, path=request.query_params.get("path")))

    @extend_schema(
        operation_id="vms_files_list", parameters=[_PATH, OpenApiParameter("limit", int)], responses=OpenApiTypes.OBJECT
    )
    def file_list(self, request, vm_id=None):
        vm = self.vm
        return Response(
            services.vm_file_list(
                vm=vm,
                actor=request.user,
                path=request.query_params.get("path"),
                limit=min(_int_param(request, "limit", 10000, minimum=1), 10000),
            )
        )

    @extend_schema(operation_id="vms_files_mkdir", request=MkdirSerializer, responses={201: OpenApiTypes.OBJECT})
    def file_mkdir(self, request, vm_id=None):
        vm = self.vm
        data = MkdirSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(
            services.vm_file_mkdir(vm=vm, actor=request.user, **data.validated_data), status=status.HTTP_201_CREATED
        )


def _int_param(request, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    return int_checked(raw, name, minimum=minimum, maximum=maximum)


def _b64hex(hexdigest: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


def exec_urlpatterns():
    from django.urls import path

    v = VmExecViewSet.as_view
    prefix = "api/v1/vms/<str:vm_id>/"
    return [
        path(prefix + "exec/", v({"post": "exec_create"}), name="vm-exec"),
        path(prefix + "execs/", v({"get": "exec_list"}), name="vm-execs"),
        path(prefix + "execs/<str:exec_id>/", v({"get": "exec_detail"}), name="vm-exec-detail"),
        path(prefix + "execs/<str:exec_id>/stdin/", v({"post": "exec_stdin"}), name="vm-exec-stdin"),
        path(prefix + "execs/<str:exec_id>/signal/", v({"post": "exec_signal"}), name="vm-exec-signal"),
        path(prefix + "files/", v({"put": "file_put", "get": "file_get", "delete": "file_delete"}), name="vm-files"),
        path(prefix + "files/stat/", v({"get": "file_stat"}), name="vm-files-stat"),
        path(prefix + "files/list/", v({"get": "file_list"}), name="vm-files-list"),
        path(prefix + "files/mkdir/", v({"post": "file_mkdir"}), name="vm-files-mkdir"),
    ]
