"""The Windows service wrapper (pywin32), NOT RUN in this project's CI. Module level so that
pywin32's ``pythonservice.exe`` can import the class by name (``windows_service.SandboxAgentService``)."""

from __future__ import annotations

import os
import sys

import servicemanager  # type: ignore[import-not-found]
import win32event  # type: ignore[import-not-found]
import win32service  # type: ignore[import-not-found]
import win32serviceutil  # type: ignore[import-not-found]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_core import AGENT_VERSION, Agent  # noqa: E402

SERVICE_NAME = "SandboxAgent"


class SandboxAgentService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
    _svc_name_ = SERVICE_NAME
    _svc_display_name_ = "microvm-sandbox guest agent"
    _svc_description_ = "Runs commands and moves files for the microvm-sandbox host (protocol v2)."

    def __init__(self, args: list) -> None:
        super().__init__(args)
        self.stop_event = win32event.CreateEvent(None, 0, 0, None)

    def SvcStop(self) -> None:  # noqa: N802 - pywin32's names
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        win32event.SetEvent(self.stop_event)
        os._exit(0)  # the port read blocks in a thread; exiting is the clean stop

    def SvcDoRun(self) -> None:  # noqa: N802
        servicemanager.LogInfoMsg(f"sandbox agent {AGENT_VERSION} starting")
        from platform_windows import WindowsPlatform
        from sandbox_agent import serve_port

        serve_port(Agent(WindowsPlatform()))


def main(argv: list) -> int:
    """``sandbox_agent.py service install|update|start|stop|remove`` (pywin32's command line)."""
    if len(argv) <= 1:
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(SandboxAgentService)
        servicemanager.StartServiceCtrlDispatcher()
        return 0
    win32serviceutil.HandleCommandLine(SandboxAgentService, argv=argv)
    return 0
