"""Fixtures for end-to-end tests against a real stack (see stack.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.system.stack import ROOT, Stack, embedded_stack_start, stack_start, stack_stop, vmm_pids  # noqa: F401


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (make test installs it)")
    log_dir = Path(os.environ.get("SANDBOX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "system"
    started = None
    # VMMs run as the unprivileged VMM user, which must reach the runtime and snapshot
    # directories: not below pytest's private (0700) tmp root.
    work_dir = Path(tempfile.mkdtemp(prefix="msbx-systest-", dir="/tmp"))
    work_dir.chmod(0o711)
    try:
        started = stack_start(work_dir, log_dir)
        yield started
    finally:
        if started is not None:
            stack_stop(started)
        shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_stack() -> Stack:
    """The embedded default (no DATABASE_URL, no REDIS_URL: SQLite and the private Redis that
    scripts/run.sh starts), as ``make run`` runs it; logs in test-artifacts/system-embedded/."""
    for binary in ("qemu-system-x86_64", "redis-server"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed (make test installs it)")
    log_dir = Path(os.environ.get("SANDBOX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "system-embedded"
    started = None
    try:
        started = embedded_stack_start(log_dir)
        yield started
    finally:
        if started is not None:
            stack_stop(started)


@pytest.fixture(scope="session")
def running_vm(stack) -> dict:
    """One booted VM shared by the tests that only need a running guest."""
    with stack.client() as client:
        response = client.post("/api/v1/vms/", json={"name": "shared", "template": "linux-small"})
        assert response.status_code == 202, response.text
        vm = response.json()
    return stack.wait_vm(vm["id"], {"running"})
