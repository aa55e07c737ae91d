"""The dashboard's console (static/js/console.js, xterm.js) in headless Chromium against a
small real stack without QEMU (benchmarks/standin.py: daphne, hostd and the stand-in VMM's
serial port, tests/hostd/fake_vmm.py). A flood four times the flow-control window arrives
whole and in order: the page acknowledges as xterm takes the bytes, a quarter window at a
time, so the stream never stalls."""

from __future__ import annotations

import os
import shutil
import tempfile
from urllib.parse import urlparse

import pytest

from benchmarks.standin import ROOT, standin_stack
from tests.waiting import wait_until

pytestmark = pytest.mark.browser

FLOOD = 8 << 20  # bytes; the window is 2 MiB


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed (make test installs them)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1366,900",
                 f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    opts.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    driver.profile_dir = profile
    return driver


@pytest.fixture
def stack(monkeypatch):
    if not shutil.which("chromium"):
        pytest.skip("chromium is not installed (make test installs it)")
    if not (ROOT / "static" / "vendor" / "xterm.js").exists():
        pytest.skip("static/vendor is not installed (make static-vendor)")
    monkeypatch.setenv("SANDBOX_BENCH_REDIS_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
    db = urlparse(os.environ.get("DATABASE_URL", "postgres:///msbx")).path.lstrip("/") + "_console_browser"
    with standin_stack(db) as running:
        yield running


def test_a_flood_larger_than_the_window_reaches_the_terminal_whole(stack):
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get(stack.url + "/login/")
        driver.find_element(By.ID, "id_username").send_keys("owner")
        driver.find_element(By.ID, "id_password").send_keys("bench-password-1")
        driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
        wait_until(lambda: "/login" not in driver.current_url, 60, message="login")
        driver.get(f"{stack.url}/vms/{stack.vm_id}/#console")
        wait_until(lambda: driver.execute_script("return window.sandboxConsole.writer"), 60, message="the writer role")
        driver.find_element(By.CSS_SELECTOR, "#console-term textarea").send_keys(f"flood {FLOOD}\n")
        flood_json = stack.vm_dir / "flood.json"
        wait_until(flood_json.exists, 60, message="the guest's flood to end")
        log = stack.vm_dir / "serial.log"
        end = log.stat().st_size
        page_offset = lambda: driver.execute_script("return window.sandboxConsole.offset")  # noqa: E731
        wait_until(lambda: page_offset() >= end, 120, message="the page to catch up")
        # The stand-in prints bare LFs, so xterm shows a staircase wrapping at the terminal's
        # width: look for the flood's last line in the text with the line breaks taken out.
        text = "".join(driver.execute_script("return window.sandboxConsole.text()").splitlines())
        assert f"{FLOOD // 100 - 1:09d} " in text  # the last of 8 MiB of lines
        assert "no longer exist" not in text  # no gap: the page kept up through its acks
    finally:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)
