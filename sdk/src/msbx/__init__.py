"""microvm-sandbox SDK: ``Sandbox.create(...)``, ``sb.exec(...)``, ``sb.files``, snapshots,
port forwards and the console, over the public REST API (docs/sdk.md). ``msbx.aio`` has the
same surface for asyncio."""

__version__ = "0.1.0"

from msbx._flows import OutputChunk  # noqa: E402
from msbx.client import (  # noqa: E402
    Client,
    Console,
    Files,
    Operation,
    PortForwards,
    Process,
    PtySession,
    Sandbox,
    Snapshot,
)
from msbx.config import ConfigError, Credentials, credentials_resolve  # noqa: E402
from msbx.errors import (  # noqa: E402
    ApiError,
    AuthenticationError,
    CommandFailed,
    Conflict,
    IntegrityError,
    NotFound,
    OperationFailed,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    SandboxError,
    ServerError,
    ServiceUnavailable,
    Timeout,
    TooLarge,
    TransportError,
    ValidationError,
)
from msbx.models import ExecResult, TransferResult  # noqa: E402

__all__ = [
    "ApiError",
    "AuthenticationError",
    "Client",
    "CommandFailed",
    "ConfigError",
    "Conflict",
    "Console",
    "Credentials",
    "ExecResult",
    "Files",
    "IntegrityError",
    "NotFound",
    "Operation",
    "OperationFailed",
    "OutputChunk",
    "PermissionDenied",
    "PortForwards",
    "Process",
    "PtySession",
    "QuotaExceeded",
    "RateLimited",
    "Sandbox",
    "SandboxError",
    "ServerError",
    "ServiceUnavailable",
    "Snapshot",
    "Timeout",
    "TooLarge",
    "TransferResult",
    "TransportError",
    "ValidationError",
    "credentials_resolve",
]
