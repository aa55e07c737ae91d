"""Every REST endpoint the SDK calls, in one table.

The contract test (tests/sdk/test_contract.py) walks this table against the server's OpenAPI
schema (``/api/schema/``): each path and method must exist there, each body field and query
parameter must be declared, and each response field the SDK reads (``reads``) must be in the
response schema when the schema describes it. Nothing in the SDK builds an API URL elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # placeholders in braces, e.g. /api/v1/vms/{id}/
    body: tuple[str, ...] = ()  # JSON body fields the SDK may send
    query: tuple[str, ...] = ()  # query parameters the SDK may send
    reads: tuple[str, ...] = ()  # response fields the SDK relies on
    paginated: bool = False  # {"count", "next", "previous", "results"} with limit/offset
    raw_body: bool = False  # application/octet-stream request body

    def url(self, **params: object) -> str:
        path = self.path
        for key, value in params.items():
            path = path.replace("{" + key + "}", _quote(str(value)))
        if "{" in path:
            raise ValueError(f"missing path parameter in {path}")
        return path


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


_VM_FIELDS = ("id", "name", "state", "vcpus", "memory_mib", "template", "last_error", "owner", "created_at")
_OP_FIELDS = ("id", "vm", "action", "status", "progress", "error", "log")
_SNAPSHOT_FIELDS = ("id", "name", "vm", "state", "include_memory", "size_bytes", "created_at")
_PAGE = ("limit", "offset")

ENDPOINTS: dict[str, Endpoint] = {
    # VMs
    "vm_list": Endpoint("GET", "/api/v1/vms/", query=(*_PAGE, "state", "name"), reads=_VM_FIELDS, paginated=True),
    "vm_create": Endpoint(
        "POST",
        "/api/v1/vms/",
        body=(
            "name",
            "template",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "metadata",
            "start",
            "host",
            "anti_affinity",
            "project",
        ),
        reads=_VM_FIELDS,
    ),
    "vm_get": Endpoint("GET", "/api/v1/vms/{id}/", reads=_VM_FIELDS),
    "vm_update": Endpoint("PATCH", "/api/v1/vms/{id}/", body=("name", "metadata", "vcpus", "memory_mib")),
    "vm_delete": Endpoint("DELETE", "/api/v1/vms/{id}/", reads=_OP_FIELDS),
    "vm_start": Endpoint("POST", "/api/v1/vms/{id}/start/", body=("force",), reads=_OP_FIELDS),
    "vm_stop": Endpoint("POST", "/api/v1/vms/{id}/stop/", body=("force",), reads=_OP_FIELDS),
    "vm_reboot": Endpoint("POST", "/api/v1/vms/{id}/reboot/", body=("force",), reads=_OP_FIELDS),
    "vm_pause": Endpoint("POST", "/api/v1/vms/{id}/pause/", body=("force",), reads=_OP_FIELDS),
    "vm_resume": Endpoint("POST", "/api/v1/vms/{id}/resume/", body=("force",), reads=_OP_FIELDS),
    "vm_move": Endpoint("POST", "/api/v1/vms/{id}/move/", body=("host",), reads=_OP_FIELDS),
    "vm_operations": Endpoint("GET", "/api/v1/vms/{id}/operations/", query=_PAGE, reads=_OP_FIELDS, paginated=True),
    "vm_agent": Endpoint("GET", "/api/v1/vms/{id}/agent/"),
    "vm_console_ticket": Endpoint("POST", "/api/v1/vms/{id}/console-ticket/"),
    "vm_console_log": Endpoint("GET", "/api/v1/vms/{id}/console/log/"),
    # Operations and templates
    "operation_list": Endpoint("GET", "/api/v1/operations/", query=_PAGE, reads=_OP_FIELDS, paginated=True),
    "operation_get": Endpoint("GET", "/api/v1/operations/{id}/", reads=_OP_FIELDS),
    "template_list": Endpoint("GET", "/api/v1/templates/", query=_PAGE, reads=("name",), paginated=True),
    "user_me": Endpoint("GET", "/api/v1/users/me/", reads=("username",)),
    # Exec
    "exec_create": Endpoint(
        "POST",
        "/api/v1/vms/{id}/exec/",
        body=("command", "env", "cwd", "user", "timeout", "stdin", "stdin_open", "wait", "tag", "pty", "buffer_bytes"),
    ),
    "exec_list": Endpoint("GET", "/api/v1/vms/{id}/execs/", query=("tag",)),
    "exec_output": Endpoint(
        "GET", "/api/v1/vms/{id}/execs/{exec_id}/", query=("offset", "limit", "encoding"), reads=()
    ),
    "exec_stdin": Endpoint("POST", "/api/v1/vms/{id}/execs/{exec_id}/stdin/", body=("data", "eof")),
    "exec_signal": Endpoint("POST", "/api/v1/vms/{id}/execs/{exec_id}/signal/", body=("signal",)),
    # Files
    "file_upload": Endpoint(
        "PUT", "/api/v1/vms/{id}/files/", query=("path", "mode", "owner", "overwrite"), raw_body=True
    ),
    "file_download": Endpoint("GET", "/api/v1/vms/{id}/files/", query=("path",)),
    "file_remove": Endpoint("DELETE", "/api/v1/vms/{id}/files/", query=("path", "recursive")),
    "file_stat": Endpoint("GET", "/api/v1/vms/{id}/files/stat/", query=("path",)),
    "file_list": Endpoint("GET", "/api/v1/vms/{id}/files/list/", query=("path", "limit")),
    "file_mkdir": Endpoint("POST", "/api/v1/vms/{id}/files/mkdir/", body=("path", "mode", "parents")),
    # Snapshots
    "vm_snapshot_list": Endpoint("GET", "/api/v1/vms/{vm_id}/snapshots/", reads=_SNAPSHOT_FIELDS),
    "vm_snapshot_create": Endpoint(
        "POST", "/api/v1/vms/{vm_id}/snapshots/", body=("name", "description", "include_memory"), reads=_SNAPSHOT_FIELDS
    ),
    "snapshot_list": Endpoint("GET", "/api/v1/snapshots/", query=_PAGE, reads=_SNAPSHOT_FIELDS, paginated=True),
    "snapshot_get": Endpoint("GET", "/api/v1/snapshots/{id}/", reads=_SNAPSHOT_FIELDS),
    "snapshot_delete": Endpoint("DELETE", "/api/v1/snapshots/{id}/"),
    "snapshot_restore": Endpoint("POST", "/api/v1/snapshots/{id}/restore/", reads=_OP_FIELDS),
    "snapshot_clone": Endpoint("POST", "/api/v1/snapshots/{id}/clone/", body=("count", "name_prefix")),
    # Networking
    "port_forward_list": Endpoint(
        "GET", "/api/v1/vms/{vm_id}/port-forwards/", reads=("id", "protocol", "host_port", "guest_port", "address")
    ),
    "port_forward_create": Endpoint(
        "POST",
        "/api/v1/vms/{vm_id}/port-forwards/",
        body=("protocol", "guest_port", "host_port"),
        reads=("id", "protocol", "host_port", "guest_port", "address"),
    ),
    "port_forward_delete": Endpoint("DELETE", "/api/v1/vms/{vm_id}/port-forwards/{id}/"),
}

# Websocket paths (not in the OpenAPI schema): the exec stream and the console (via a ticket,
# whose URL the console-ticket endpoint returns).
WS_EXEC = "/ws/vms/{id}/execs/{exec_id}/"
WS_EXEC_START = "/ws/vms/{id}/exec/"  # the socket starts the command (a ``start`` frame first)
