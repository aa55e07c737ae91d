"""The dashboard in a real browser (Debian's headless Chromium via Selenium) against the real
stack: log in, create a VM, wait for it to run, use the console from two viewers, and take
screenshots of each page into test-artifacts/screenshots/."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.browser]

PASSWORD = "system-test-password-1"


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed (make test installs them)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1366,900",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.binary_location = shutil.which("chromium")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    driver.profile_dir = profile
    return driver


@pytest.fixture
def browsers(stack):
    opened = []

    def open_one():
        driver = _browser()
        opened.append(driver)
        return driver

    yield open_one
    for driver in opened:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


@pytest.fixture
def shots(stack):
    folder = stack.log_dir.parent / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver, condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    folder = Path(__import__("os").environ.get("SANDBOX_TEST_ARTIFACTS", "test-artifacts")) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / ("failed-" + what.replace(" ", "-")[:40] + ".png")))
    text = driver.execute_script("return window.sandboxConsole ? window.sandboxConsole.text() : ''") or ""
    raise AssertionError(f"timed out waiting for {what}; page: {driver.current_url}; terminal tail: {text[-600:]!r}")


def _login(driver, stack, username):
    from selenium.webdriver.common.by import By

    driver.get(stack.url + "/login/")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    _wait(driver, lambda: driver.current_url.rstrip("/") == stack.url, what="login redirect")


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_login_create_run_and_use_the_console_from_two_viewers(stack, browsers, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browsers()
    driver.get(stack.url + "/login/")
    driver.save_screenshot(str(shots / "login.png"))
    _login(driver, stack, "owner")
    driver.save_screenshot(str(shots / "vm-list.png"))

    driver.get(stack.url + "/vms/new/")
    driver.find_element(By.ID, "id_name").send_keys("browser-vm")
    Select(driver.find_element(By.ID, "id_template")).select_by_value("linux-small")
    driver.save_screenshot(str(shots / "vm-create.png"))
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    _wait(driver, lambda: "/vms/" in driver.current_url and "new" not in driver.current_url, what="detail page")
    _wait(
        driver,
        lambda: driver.find_element(By.ID, "vm-state").text == "running",
        timeout=240,
        what="VM running (live state, no reload)",
    )
    driver.save_screenshot(str(shots / "vm-detail.png"))

    driver.find_element(By.ID, "tab-console").click()
    _wait(driver, lambda: driver.execute_script("return window.sandboxConsole.writer"), what="console writer role")
    driver.find_element(By.CSS_SELECTOR, "#console-term textarea").send_keys("\n")
    time.sleep(1)
    driver.find_element(By.CSS_SELECTOR, "#console-term textarea").send_keys("echo browser-$((6*7))\n")
    _wait(
        driver,
        lambda: "browser-42" in driver.execute_script("return window.sandboxConsole.text()"),
        what="command output in the terminal",
    )
    driver.save_screenshot(str(shots / "vm-console.png"))

    second = browsers()
    _login(second, stack, "owner")
    second.get(driver.current_url.split("#")[0] + "#console")
    _wait(
        second,
        lambda: (
            "browser-42" in second.execute_script("return window.sandboxConsole ? window.sandboxConsole.text() : ''")
        ),
        what="the same output in the second viewer",
    )
    assert second.execute_script("return window.sandboxConsole.writer") is False
    second.find_element(By.ID, "console-takeover").click()
    _wait(second, lambda: second.execute_script("return window.sandboxConsole.writer"), what="takeover")
    _wait(driver, lambda: not driver.execute_script("return window.sandboxConsole.writer"), what="first viewer demoted")
    second.find_element(By.CSS_SELECTOR, "#console-term textarea").send_keys("echo second-$((7*6))\n")
    _wait(
        driver,
        lambda: "second-42" in driver.execute_script("return window.sandboxConsole.text()"),
        what="the second viewer's command seen by the first",
    )
    second.save_screenshot(str(shots / "vm-console-second-viewer.png"))

    driver.find_element(By.ID, "tab-exec").click()
    driver.find_element(By.ID, "exec-command").send_keys("for i in 1 2 3; do echo exec-line-$i; done; echo oops >&2")
    driver.find_element(By.CSS_SELECTOR, "#exec-form button[type=submit]").click()
    _wait(driver, lambda: driver.execute_script("return window.sandboxExec.lastExit"), what="exec exit")
    text = driver.execute_script("return window.sandboxExec.text()")
    assert "exec-line-1\nexec-line-2\nexec-line-3" in text and "oops" in text
    assert "exit code 0" in driver.find_element(By.ID, "exec-status").text
    driver.save_screenshot(str(shots / "vm-exec.png"))

    driver.find_element(By.ID, "tab-snapshots").click()
    driver.find_element(By.ID, "snapshot-name").send_keys("from-browser")
    driver.find_element(By.CSS_SELECTOR, "#snapshot-form button[type=submit]").click()
    _wait(
        driver,
        lambda: (
            "from-browser\nready" in driver.find_element(By.ID, "snapshot-list").text.replace(" ", "\n")
            or (
                "from-browser" in driver.find_element(By.ID, "snapshot-list").text
                and "ready" in driver.find_element(By.ID, "snapshot-list").text
            )
        ),
        timeout=120,
        what="snapshot ready",
    )
    driver.save_screenshot(str(shots / "vm-snapshots.png"))

    driver.find_element(By.ID, "tab-network").click()
    _wait(driver, lambda: "10.231." in driver.find_element(By.ID, "nic-list").text, what="NIC listed")
    driver.find_element(By.ID, "pf-guest").send_keys("8080")
    driver.find_element(By.CSS_SELECTOR, "#pf-form button[type=submit]").click()
    _wait(driver, lambda: "tcp 8080" in driver.find_element(By.ID, "pf-list").text, what="port forward listed")
    driver.save_screenshot(str(shots / "vm-network.png"))

    for page, name in (("/operations/", "operations"), ("/audit/", "audit"), ("/tokens/", "tokens")):
        driver.get(stack.url + page)
        driver.save_screenshot(str(shots / f"{name}.png"))
    assert _console_errors(driver) == []
