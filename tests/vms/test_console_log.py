"""The console log download starts at the oldest byte hostd kept (the log is capped by
punching a hole over its oldest bytes) and says at which console offset."""

from __future__ import annotations

import os


def test_the_log_download_skips_what_the_cap_dropped(api, owner, vm, settings, tmp_path) -> None:
    settings.SANDBOX_RUNTIME_DIR = tmp_path
    log = tmp_path / str(vm.pk) / "serial.log"
    log.parent.mkdir()
    with open(log, "wb") as fh:
        fh.seek(1 << 20)  # the first MiB is a hole, as after hostd capped the log
        fh.write(b"the newest console lines\n")
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/console/log/")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    start = int(response["X-Console-Log-Offset"])
    assert body.endswith(b"the newest console lines\n") and b"\x00" * 4096 not in body
    assert start + len(body) == os.stat(log).st_size


def test_the_vm_usage_reports_the_console_log_on_disk(api, owner, vm, settings, tmp_path) -> None:
    settings.SANDBOX_RUNTIME_DIR = tmp_path
    log = tmp_path / str(vm.pk) / "serial.log"
    log.parent.mkdir()
    log.write_bytes(b"x" * 100000)
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/samples/")
    assert response.status_code == 200
    assert response.json()["console_log_bytes"] == os.stat(log).st_blocks * 512 >= 100000
