"""The console log download starts at the oldest byte hostd kept (the log is capped by
punching a hole over its oldest bytes) and says at which console offset; it comes from the
VM's host's hostd (tests/vms/test_remote_host.py: from another host's)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.hostd.runner import Hostd
from vms.hostd.console import STREAM_CHUNK


@pytest.fixture
def hostd_root(settings):
    root = Path(tempfile.mkdtemp(prefix="clog-", dir="/tmp"))  # Unix socket paths are short
    settings.SANDBOX_RUNTIME_DIR = root
    settings.SANDBOX_HOSTD_SOCKET = root / "hostd.sock"
    hostd = Hostd(root).start()
    yield root
    hostd.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_the_log_download_skips_what_the_cap_dropped(api, owner, vm, hostd_root) -> None:
    log = hostd_root / str(vm.pk) / "serial.log"
    log.parent.mkdir()
    with open(log, "wb") as fh:
        fh.seek(1 << 20)  # the first MiB is a hole, as after hostd capped the log
        fh.write(b"the newest console lines\n")
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/console/log/")
    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="{vm.name}-console.log"'
    body = b"".join(response.streaming_content)
    start = int(response["X-Console-Log-Offset"])
    assert body.endswith(b"the newest console lines\n") and b"\x00" * 4096 not in body
    assert start + len(body) == os.stat(log).st_size


def test_a_log_longer_than_one_piece_arrives_whole_and_a_missing_one_is_404(api, owner, vm, hostd_root) -> None:
    log = hostd_root / str(vm.pk) / "serial.log"
    log.parent.mkdir()
    data = os.urandom(STREAM_CHUNK * 3 + 123)
    log.write_bytes(data)
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/console/log/")
    assert response.status_code == 200 and int(response["X-Console-Log-Offset"]) == 0
    assert b"".join(response.streaming_content) == data
    log.unlink()
    assert api.get(f"/api/v1/vms/{vm.pk}/console/log/").status_code == 404


def test_without_hostd_the_log_download_is_503(api, owner, vm, settings, tmp_path) -> None:
    settings.SANDBOX_HOSTD_SOCKET = tmp_path / "nothing.sock"
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/console/log/")
    assert response.status_code == 503 and response.json()["error"]["code"] == "hostd_unavailable"


def test_the_vm_usage_reports_the_console_log_on_disk(api, owner, vm, settings, tmp_path) -> None:
    settings.SANDBOX_RUNTIME_DIR = tmp_path
    log = tmp_path / str(vm.pk) / "serial.log"
    log.parent.mkdir()
    log.write_bytes(b"x" * 100000)
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/samples/")
    assert response.status_code == 200
    assert response.json()["console_log_bytes"] == os.stat(log).st_blocks * 512 >= 100000


def test_console_logs_count_against_the_owners_disk_quota(owner, settings) -> None:
    from accounts.models import UserQuota
    from sandbox_site.errors import QuotaExceeded
    from tests.factories import TemplateFactory
    from vms import selectors, services

    settings.SANDBOX_NETWORKING = False
    settings.SANDBOX_CONSOLE_LOG_MAX_BYTES = 1 << 30  # each VM's log may hold 1 GiB
    UserQuota.objects.update_or_create(
        user=owner, defaults={"max_vms": 10, "max_vcpus": 10, "max_memory_mib": 10_000, "max_disk_gib": 3}
    )
    template = TemplateFactory()  # 1 GiB disks
    services.vm_create(owner=owner, name="first", template=template, start=False, actor=owner)
    assert selectors.usage_of(owner)["disk_gib"] == 2  # its disk + its console log
    try:
        services.vm_create(owner=owner, name="second", template=template, start=False, actor=owner)
    except QuotaExceeded as exc:
        assert exc.details["disk_gib"] == "2 used + 2 asked > limit 3"
    else:
        raise AssertionError("the second VM's console log did not count")
    settings.SANDBOX_CONSOLE_LOG_MAX_BYTES = 16 << 20  # 64 logs of 16 MiB make one GiB
    assert selectors.console_logs_gib(1) == 1 and selectors.console_logs_gib(64) == 1
    assert selectors.console_logs_gib(65) == 2 and selectors.console_logs_gib(0) == 0
