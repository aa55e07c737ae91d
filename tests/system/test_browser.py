"""The dashboard in a real browser (Debian's headless Chromium via Selenium) against the real
stack. One VM, created through the create form, is shared by the whole module (booting under
TCG is the slow part): its boot is watched on the overview, then the tests drive the pages that
follow state and rights, the consoles (two viewers, a view-only viewer, refusals), exec, the
file manager, snapshots and network, an accessibility audit (axe-core) of every page and tab,
and last the VM's deletion seen by its open pages. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.system.stack import ROOT

pytestmark = [pytest.mark.vm, pytest.mark.browser]

PASSWORD = "system-test-password-1"
AXE = ROOT / "static" / "vendor" / "axe.min.js"


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
    opts.set_capability("unhandledPromptBehavior", "ignore")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(90)
    driver.profile_dir = profile
    return driver


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def shots(stack):
    folder = Path(os.environ.get("SANDBOX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver, condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    folder = Path(os.environ.get("SANDBOX_TEST_ARTIFACTS", "test-artifacts")) / "screenshots"
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
    # A refused websocket or an expected 4xx of the files API is logged by Chromium too.
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "/ws/" not in e["message"] and "/files/" not in e["message"]
    ]


def _js(driver, script, *args):
    return driver.execute_script(script, *args)


def _tab(driver, name):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, f"tab-{name}").click()
    _wait(driver, lambda: driver.find_element(By.ID, f"panel-{name}").is_displayed(), what=f"{name} tab")


def _buttons(driver, scope) -> dict[str, bool]:
    """{label: enabled} of the visible buttons in ``scope`` (a CSS selector)."""
    return _js(
        driver,
        "const out = {}; document.querySelectorAll(arguments[0] + ' button').forEach((b) => {"
        " if (b.offsetParent !== null) out[b.textContent.trim()] = !b.disabled; }); return out;",
        scope,
    )


def _axe(driver, shots, name, failures: list | None = None):
    """Run axe-core in the page (loaded from the npm lock's copy, by this test only) and fail
    on serious or critical violations (or collect them in ``failures``); the full result goes
    next to the screenshots."""
    if not AXE.exists():
        pytest.skip("static/vendor/axe.min.js is missing (make static-vendor copies it)")
    if not _js(driver, "return !!window.axe"):
        driver.execute_script(AXE.read_text())
    violations = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then((r) => done(r.violations.map((v) => ("
        "{id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 5).map((n) => n.target.join(' '))}))))"
        ".catch((e) => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));"
    )
    (shots / f"axe-{name}.json").write_text(json.dumps(violations, indent=2))
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    if failures is not None:
        failures.extend({"page": name, **v} for v in bad)
        return
    assert bad == [], f"{name}: {json.dumps(bad, indent=2)}"


# --- the shared VM: created through the form, its boot watched on the overview ---------------


@pytest.fixture(scope="module")
def owner_browser(stack, browsers):
    driver = browsers()
    _login(driver, stack, "owner")
    return driver


@pytest.fixture(scope="module")
def browser_vm(stack, owner_browser, shots) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = owner_browser
    driver.get(stack.url + "/vms/new/")
    # The size fields hold the chosen template's defaults.
    with stack.client() as client:
        templates = {t["name"]: t for t in client.get("/api/v1/templates/").json()["results"]}
    Select(driver.find_element(By.ID, "id_template")).select_by_value("linux-small")
    small = templates["linux-small"]
    assert driver.find_element(By.ID, "id_vcpus").get_attribute("value") == str(small["vcpus"])
    assert driver.find_element(By.ID, "id_memory_mib").get_attribute("value") == str(small["memory_mib"])
    assert driver.find_element(By.ID, "id_disk_gib").get_attribute("value") == str(small["disk_gib"])
    assert driver.find_element(By.ID, "id_vcpus").get_attribute("max") == str(small["max_vcpus"])
    driver.find_element(By.ID, "id_name").send_keys("browser-vm")
    _axe(driver, shots, "create-form")
    driver.save_screenshot(str(shots / "vm-create.png"))
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    _wait(driver, lambda: "/vms/" in driver.current_url and "new" not in driver.current_url, what="detail page")
    vm_id = driver.current_url.split("#")[0].rstrip("/").split("/")[-1]

    # Boot: the overview shows the operation's step, percent and elapsed time, and the console.
    _wait(driver, lambda: driver.find_element(By.ID, "vm-progress").is_displayed(), what="boot progress card")
    _wait(
        driver,
        lambda: "sandbox" in (_js(driver, "return window.sandboxConsole.bootText()") or ""),
        timeout=240,
        what="boot console output on the overview",
    )
    driver.save_screenshot(str(shots / "vm-boot-progress.png"))
    _wait(
        driver,
        lambda: driver.find_element(By.ID, "vm-state").text == "running",
        timeout=240,
        what="VM running (live state, no reload)",
    )
    return {
        "id": vm_id,
        "url": f"{stack.url}/vms/{vm_id}/",
        "operations": _js(driver, "return window.sandboxVm.operations"),
        "boot_text": _js(driver, "return window.sandboxConsole.bootText()"),
    }


def test_the_boot_shows_live_progress_and_the_console_on_the_overview(browser_vm, owner_browser, shots):
    from selenium.webdriver.common.by import By

    ops = [o for o in browser_vm["operations"] if o["action"] == "create"]
    assert ops, browser_vm["operations"]
    # Several steps with a rising percent arrived live, ending in success at 100%.
    assert len({o["step"] for o in ops}) >= 3, ops
    assert [o["progress"] for o in ops] == sorted(o["progress"] for o in ops), ops
    _wait(
        owner_browser,
        lambda: any(
            o["status"] == "succeeded" and o["progress"] == 100
            for o in _js(owner_browser, "return window.sandboxVm.operations")
        ),
        what="the create operation done",
    )
    assert any("waiting" in o["step"] or "agent" in o["step"] for o in ops), ops
    assert max(o["elapsed"] for o in ops) > 0
    # A quiet boot: no PCI probe error on the microvm machine, and the boot log is there.
    assert "PCI: Fatal" not in browser_vm["boot_text"]
    assert "sandbox" in browser_vm["boot_text"]
    # Once running: IP address and an uptime that moves; the card goes away.
    driver = owner_browser
    assert driver.find_element(By.ID, "vm-ip").text.startswith("10.231.")
    first = driver.find_element(By.ID, "vm-uptime").text
    _wait(driver, lambda: driver.find_element(By.ID, "vm-uptime").text not in (first, "–"), what="uptime moving")
    _wait(driver, lambda: not driver.find_element(By.ID, "vm-progress").is_displayed(), what="progress card hidden")
    buttons = _buttons(driver, ".toolbar")
    assert buttons == {
        "Start": False,
        "Stop": True,
        "Force off": True,
        "Reboot": True,
        "Pause": True,
        "Resume": False,
        "Delete": True,
    }
    # QEMU cannot resize a running VM: the form says so and is disabled.
    assert driver.find_element(By.ID, "resize-fields").get_attribute("disabled")
    assert "cannot resize a running VM" in driver.find_element(By.ID, "resize-hint").text
    driver.save_screenshot(str(shots / "vm-detail.png"))


def test_the_list_follows_state_and_rights_with_ip_and_uptime(stack, browser_vm, owner_browser, shots):
    from selenium.webdriver.common.by import By

    driver = owner_browser
    driver.get(stack.url + "/")
    row = f'tr[data-vm="{browser_vm["id"]}"]'
    assert _buttons(driver, row) == {"Start": False, "Stop": True}
    assert driver.find_element(By.CSS_SELECTOR, f"{row} [data-ip]").text.startswith("10.231.")
    first = driver.find_element(By.CSS_SELECTOR, f"{row} [data-uptime]").text
    assert first != "–"
    _wait(
        driver,
        lambda: driver.find_element(By.CSS_SELECTOR, f"{row} [data-uptime]").text != first,
        what="uptime moving in the list",
    )
    _axe(driver, shots, "vm-list")
    driver.save_screenshot(str(shots / "vm-list.png"))


def test_the_console_two_viewers_and_your_other_session(stack, browser_vm, browsers, owner_browser, shots):
    from selenium.webdriver.common.by import By

    driver = owner_browser
    driver.get(browser_vm["url"] + "#console")
    _wait(driver, lambda: _js(driver, "return window.sandboxConsole.writer"), what="console writer role")
    # The boot log is in the replay, without the PCI error line.
    _wait(
        driver,
        lambda: "sandbox: init done" in _js(driver, "return window.sandboxConsole.text()"),
        what="the boot log in the replay",
    )
    text = _js(driver, "return window.sandboxConsole.text()")
    assert "PCI: Fatal" not in text, text[-800:]
    term = driver.find_element(By.CSS_SELECTOR, "#console-term textarea")
    term.send_keys("\n")
    time.sleep(1)
    term.send_keys("echo browser-$((6*7))\n")
    _wait(
        driver,
        lambda: "browser-42" in _js(driver, "return window.sandboxConsole.text()"),
        what="command output in the terminal",
    )
    assert not driver.find_element(By.ID, "console-badge").is_displayed()  # the writer sees no badge
    driver.save_screenshot(str(shots / "vm-console.png"))

    second = browsers()
    _login(second, stack, "owner")
    second.get(browser_vm["url"] + "#console")
    _wait(
        second,
        lambda: "browser-42" in (_js(second, "return window.sandboxConsole ? window.sandboxConsole.text() : ''")),
        what="the same output in the second viewer",
    )
    assert _js(second, "return window.sandboxConsole.writer") is False
    # Read-only is shown on the terminal itself, naming the writer as "your other session".
    badge = second.find_element(By.ID, "console-badge")
    assert badge.is_displayed() and "your other session" in badge.text, badge.text
    before = _js(second, "return document.getElementById('console-term').getBoundingClientRect().top")
    second.find_element(By.CSS_SELECTOR, "#console-term textarea").send_keys("x")
    _wait(second, lambda: "nudge" in badge.get_attribute("class"), what="read-only badge nudged")
    after = _js(second, "return document.getElementById('console-term').getBoundingClientRect().top")
    assert before == after  # nothing pushed the terminal down
    assert second.find_elements(By.ID, "flash") == []
    second.save_screenshot(str(shots / "vm-console-read-only.png"))
    second.find_element(By.ID, "console-takeover").click()
    _wait(second, lambda: _js(second, "return window.sandboxConsole.writer"), what="takeover")
    _wait(driver, lambda: not _js(driver, "return window.sandboxConsole.writer"), what="first viewer demoted")
    assert "your other session" in driver.find_element(By.ID, "console-badge").text
    second.find_element(By.CSS_SELECTOR, "#console-term textarea").send_keys("echo second-$((7*6))\n")
    _wait(
        driver,
        lambda: "second-42" in _js(driver, "return window.sandboxConsole.text()"),
        what="the second viewer's command seen by the first",
    )
    second.save_screenshot(str(shots / "vm-console-second-viewer.png"))
    second.get(stack.url + "/")  # the second viewer leaves: its claim is released
    driver.find_element(By.ID, "console-takeover").click()
    _wait(driver, lambda: _js(driver, "return window.sandboxConsole.writer"), what="keyboard back")


def test_exec_snapshot_progress_and_network(stack, browser_vm, owner_browser, shots):
    from selenium.webdriver.common.by import By

    driver = owner_browser
    driver.get(browser_vm["url"] + "#exec")
    driver.find_element(By.ID, "exec-command").send_keys("for i in 1 2 3; do echo exec-line-$i; done; echo oops >&2")
    driver.find_element(By.CSS_SELECTOR, "#exec-form button[type=submit]").click()
    _wait(driver, lambda: _js(driver, "return window.sandboxExec.lastExit"), what="exec exit")
    text = _js(driver, "return window.sandboxExec.text()")
    assert "exec-line-1\nexec-line-2\nexec-line-3" in text and "oops" in text
    assert "exit code 0" in driver.find_element(By.ID, "exec-status").text
    driver.save_screenshot(str(shots / "vm-exec.png"))

    _tab(driver, "snapshots")
    driver.find_element(By.ID, "snapshot-name").send_keys("from-browser")
    driver.find_element(By.CSS_SELECTOR, "#snapshot-form button[type=submit]").click()
    _wait(
        driver,
        lambda: "from-browser" in (t := driver.find_element(By.ID, "snapshot-list").text) and "ready" in t,
        timeout=120,
        what="snapshot ready",
    )
    # The snapshot's progress reached the page live (the overview's card), with its steps.
    snaps = [o for o in _js(driver, "return window.sandboxVm.operations") if o["action"] == "snapshot"]
    assert snaps and snaps[-1]["status"] == "succeeded" and snaps[-1]["progress"] == 100, snaps
    driver.save_screenshot(str(shots / "vm-snapshots.png"))

    _tab(driver, "network")
    _wait(driver, lambda: "10.231." in driver.find_element(By.ID, "nic-list").text, what="NIC listed")
    driver.find_element(By.ID, "pf-guest").send_keys("8080")
    driver.find_element(By.CSS_SELECTOR, "#pf-form button[type=submit]").click()
    _wait(driver, lambda: "tcp 8080" in driver.find_element(By.ID, "pf-list").text, what="port forward listed")
    driver.save_screenshot(str(shots / "vm-network.png"))


_DROP = """
const [name, size, fill] = arguments;
const file = new File([new Uint8Array(size).fill(fill)], name, {type: "application/octet-stream"});
const dt = new DataTransfer();
dt.items.add(file);
const zone = document.getElementById("files-drop");
for (const type of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
}
"""


def test_the_file_manager(stack, browser_vm, owner_browser, shots):
    from selenium.webdriver.common.by import By

    driver = owner_browser
    driver.get(browser_vm["url"] + "#files")
    _wait(driver, lambda: "/root:" in driver.find_element(By.ID, "files-status").text, what="/root listed")

    # New folder (the name comes from a prompt), then into it.
    driver.find_element(By.ID, "files-mkdir").click()
    prompt = _wait(driver, lambda: _alert(driver), what="folder name prompt")
    prompt.send_keys("from-browser")
    prompt.accept()
    _wait(driver, lambda: "from-browser/" in driver.find_element(By.ID, "files-list").text, what="folder listed")
    driver.find_element(By.XPATH, "//button[normalize-space()='from-browser/']").click()
    _wait(driver, lambda: _js(driver, "return window.sandboxFiles.cwd") == "/root/from-browser", what="cd")

    # Drag and drop an upload; the progress bar reaches the end and the file is listed.
    _js(driver, _DROP, "dropped.bin", 3 << 20, 7)
    _wait(driver, lambda: "uploaded" in driver.find_element(By.ID, "files-uploads").text, what="upload done")
    assert driver.find_element(By.CSS_SELECTOR, "#files-uploads li.done progress").get_attribute("value") == "100"
    _wait(driver, lambda: "dropped.bin" in driver.find_element(By.ID, "files-list").text, what="upload listed")
    assert "3.0 MiB" in driver.find_element(By.ID, "files-list").text

    # Cancel: the request is aborted and nothing is left in the guest.
    _js(
        driver,
        "window.sandboxFiles.upload(new File([new Uint8Array(arguments[0])], 'cancelled.bin'));"
        "document.querySelector('#files-uploads li button').click();",
        64 << 20,
    )
    _wait(driver, lambda: "cancelled" in driver.find_element(By.ID, "files-uploads").text, what="upload cancelled")
    driver.save_screenshot(str(shots / "vm-files.png"))
    with stack.client() as client:
        listed = client.get(f"/api/v1/vms/{browser_vm['id']}/files/list/", params={"path": "/root/from-browser"})
        names = [e["name"] for e in listed.json()["entries"]]
    assert names == ["dropped.bin"], names

    # Download: the link serves the same bytes (with the guest's checksum header).
    link = driver.find_element(By.XPATH, "//a[normalize-space()='Download']")
    got = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(async (r) => { const b = new Uint8Array(await r.arrayBuffer());"
        " done([r.status, b.length, b.every((x) => x === 7), r.headers.get('X-Checksum-Sha256')]); });",
        link.get_attribute("href"),
    )
    assert got[0] == 200 and got[1] == 3 << 20 and got[2] is True and len(got[3]) == 64, got

    # Delete the file, go up, delete the folder.
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Delete dropped.bin']").click()
    _wait(driver, lambda: _alert(driver), what="delete confirm").accept()
    _wait(driver, lambda: "This directory is empty." in driver.find_element(By.ID, "files-list").text, what="emptied")
    driver.find_element(By.ID, "files-up").click()
    _wait(driver, lambda: "from-browser/" in driver.find_element(By.ID, "files-list").text, what="back in /root")
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Delete from-browser']").click()
    _wait(driver, lambda: _alert(driver), what="delete folder confirm").accept()
    _wait(driver, lambda: "from-browser/" not in driver.find_element(By.ID, "files-list").text, what="folder gone")


def _alert(driver):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = driver.switch_to.alert
        _ = alert.text
        return alert
    except NoAlertPresentException:
        return None


def test_a_view_only_viewer_gets_the_read_only_console_and_only_its_tabs(stack, browser_vm, browsers, shots):
    from selenium.webdriver.common.by import By

    with stack.client() as client:
        response = client.post(
            f"/api/v1/vms/{browser_vm['id']}/permissions/", json={"user": "grantee", "permissions": ["view_vm"]}
        )
        assert response.status_code in (200, 201), response.text
    viewer = browsers()
    _login(viewer, stack, "grantee")
    viewer.get(stack.url + "/")
    row = f'tr[data-vm="{browser_vm["id"]}"]'
    assert _buttons(viewer, row) == {}  # no power right: no start/stop
    viewer.get(browser_vm["url"])
    tabs = [t.text for t in viewer.find_elements(By.CSS_SELECTOR, "[role=tab]")]
    assert tabs == ["Overview", "Console", "Network", "Operations", "Audit", "Sharing"], tabs
    assert _buttons(viewer, ".page-head") == {}
    assert "You may not" not in viewer.find_element(By.TAG_NAME, "main").text
    _tab(viewer, "console")
    _wait(
        viewer,
        lambda: "browser-42" in _js(viewer, "return window.sandboxConsole.text()"),
        what="the read-only console's replay",
    )
    assert _js(viewer, "return window.sandboxConsole.canWrite") is False
    badge = viewer.find_element(By.ID, "console-badge")
    assert badge.is_displayed() and "view rights" in badge.text, badge.text
    assert viewer.find_elements(By.ID, "console-takeover") == []
    viewer.save_screenshot(str(shots / "vm-console-view-only.png"))


def test_console_refusals_close_with_the_application_codes(stack, browser_vm, browsers, shots):
    """A refused console is accepted, told why, then closed with 4401/4404 (not a 1006 at the
    handshake), so a page can stop retrying and say why."""
    stranger = browsers()
    _login(stranger, stack, "stranger")
    probe = (
        "const done = arguments[arguments.length - 1];"
        "const ws = new WebSocket(`ws://${location.host}/ws/vms/${arguments[0]}/console/`);"
        "let message = null; ws.onmessage = (m) => { message = JSON.parse(m.data); };"
        "ws.onclose = (e) => done([e.code, message]);"
    )
    code, message = stranger.execute_async_script(probe, browser_vm["id"])
    assert code == 4404 and message["closing"] is True and message["code"] == "not_found", (code, message)
    stranger.get(stack.url + "/login/")
    stranger.delete_all_cookies()
    stranger.get(stack.url + "/login/")
    code, message = stranger.execute_async_script(probe, browser_vm["id"])
    assert code == 4401 and message["code"] == "not_authenticated", (code, message)

    # A page whose viewer lost access: its next connect is refused, and it stops and says why.
    viewer = browsers()
    _login(viewer, stack, "grantee")
    viewer.get(browser_vm["url"] + "#console")
    _wait(viewer, lambda: _js(viewer, "return window.sandboxConsole.offset") > 0, what="viewer's console")
    permissions = f"/api/v1/vms/{browser_vm['id']}/permissions/"
    with stack.client() as client:
        assert client.request("DELETE", permissions, json={"user": "grantee"}).status_code in (200, 204)
    try:
        _js(viewer, "window.sandboxConsole.reconnect()")
        _wait(viewer, lambda: _js(viewer, "return window.sandboxConsole.refused"), what="the refusal")
        status = _js(viewer, "return window.sandboxConsole.status()")
        # Either the live revocation reached the open console first ("revoked"), or the
        # reconnect was refused ("not shared"): both stop the page with the reason.
        assert status.startswith("no access:"), status
        assert "not shared with you" in status or "access was revoked" in status, status
        time.sleep(3)  # no retry: the status stays
        assert _js(viewer, "return window.sandboxConsole.status()") == status
        viewer.save_screenshot(str(shots / "vm-console-refused.png"))
    finally:
        with stack.client() as client:
            client.post(permissions, json={"user": "grantee", "permissions": ["view_vm"]})


def test_every_page_and_tab_passes_an_accessibility_audit(stack, browser_vm, owner_browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = owner_browser
    driver.get(browser_vm["url"])
    failures: list[dict] = []
    _axe(driver, shots, "vm-overview", failures)
    # Keyboard: the tabs are reachable and move with the arrow keys.
    overview = driver.find_element(By.ID, "tab-overview")
    overview.send_keys(Keys.ARROW_RIGHT)
    assert driver.switch_to.active_element.get_attribute("id") == "tab-console"
    assert driver.find_element(By.ID, "panel-console").is_displayed()
    tabs = [t.get_attribute("id")[4:] for t in driver.find_elements(By.CSS_SELECTOR, "[role=tab]")]
    for tab in tabs:
        _tab(driver, tab)
        if tab == "files":
            _wait(driver, lambda: "/root:" in driver.find_element(By.ID, "files-status").text, what="files listed")
        time.sleep(0.5)
        _axe(driver, shots, f"vm-{tab}", failures)
    for page, name in (("/operations/", "operations"), ("/audit/", "audit"), ("/tokens/", "tokens")):
        driver.get(stack.url + page)
        _axe(driver, shots, name, failures)
        driver.save_screenshot(str(shots / f"{name}.png"))
    assert failures == [], json.dumps(failures, indent=2)
    assert _console_errors(driver) == []


def test_a_deleted_vm_page_says_so_and_leads_back(stack, browser_vm, browsers, owner_browser, shots):
    from selenium.webdriver.common.by import By

    driver = owner_browser
    watcher = browsers()  # the view-only grantee, watching the console when the VM goes
    _login(watcher, stack, "grantee")
    watcher.get(browser_vm["url"] + "#console")
    _wait(watcher, lambda: _js(watcher, "return window.sandboxConsole.offset") > 0, what="watcher's console")
    driver.get(browser_vm["url"])
    driver.find_element(By.CSS_SELECTOR, ".toolbar button[data-action=delete]").click()
    _wait(driver, lambda: _alert(driver), what="delete confirm").accept()
    # The deleting state disables everything but... nothing: delete is not allowed from deleting.
    _wait(driver, lambda: _buttons(driver, ".toolbar").get("Start") is False, what="buttons follow deleting")
    for page in (driver, watcher):
        _wait(page, lambda p=page: p.find_element(By.ID, "vm-gone").is_displayed(), timeout=120, what="gone banner")
    assert "This VM was deleted" in watcher.find_element(By.ID, "vm-gone").text
    watcher.save_screenshot(str(shots / "vm-deleted.png"))
    driver.find_element(By.CSS_SELECTOR, "#vm-gone a").click()
    _wait(driver, lambda: driver.current_url.rstrip("/") == stack.url, what="back to the list")
    assert browser_vm["id"] not in driver.page_source
