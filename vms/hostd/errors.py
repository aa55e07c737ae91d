"""The errors of the host daemon and of its clients (no Django): one type, ``HostdError``.

``code`` is the error code as it travels on the wire (``{"code", "message"}``, see
docs/hostd.md): hostd's own codes or, for forwarded agent requests, the agent's
(guest_agents/PROTOCOL.md). The daemon raises ``HostdError`` and answers with its code;
clients raise the subclasses.
"""

from __future__ import annotations


class HostdError(Exception):
    """hostd, or the guest agent behind it, could not do what was asked."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HostdUnavailable(HostdError):
    """hostd is not running (or its socket is not reachable), or the connection was lost."""

    def __init__(self, message: str) -> None:
        super().__init__("hostd_unavailable", message)


class HostdTimeout(HostdError):
    """hostd did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class HostdRequestError(HostdError):
    """hostd or the guest agent answered with an error; ``code`` says which."""
