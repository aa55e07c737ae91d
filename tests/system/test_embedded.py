"""The embedded default, as ``make run`` runs it (no DATABASE_URL, no REDIS_URL: SQLite and the
private Redis that scripts/run.sh starts on a Unix socket): the browser flow with live state
over the events websocket (polling switched off in the page), the console's writer role, and
20 parallel API writers against SQLite with no 5xx."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.waiting import wait_until

pytestmark = [pytest.mark.vm]

PASSWORD = "system-test-password-1"

# Run before the page's own scripts: intervals of 5 s or more (the pages' 10 s polls) never
# fire, so state can only arrive over the events websocket, whose frames are recorded.
_NO_POLLING = """
(() => {
  const setIntervalNative = window.setInterval.bind(window);
  window.setInterval = (fn, ms, ...args) => (ms >= 5000 ? 0 : setIntervalNative(fn, ms, ...args));
  const Native = window.WebSocket;
  window.__events = [];
  function Recorded(url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    if (String(url).includes("/ws/vms/events/")) {
      ws.addEventListener("message", (m) => window.__events.push([Date.now(), m.data]));
    }
    return ws;
  }
  Recorded.prototype = Native.prototype;
  for (const k of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) Recorded[k] = Native[k];
  window.WebSocket = Recorded;
})();
"""


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed (make test installs them)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1366,900"):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.binary_location = shutil.which("chromium")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _NO_POLLING})
    return driver, profile


@pytest.fixture
def browser(embedded_stack):
    driver, profile = _browser()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _login(driver, stack, username):
    from selenium.webdriver.common.by import By

    driver.get(stack.url + "/login/")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_until(lambda: driver.current_url.rstrip("/") == stack.url, timeout=30, message="login redirect")


class EventsObserver:
    """The events websocket as the page opens it (with the page's session), read by the test:
    every frame with the time it arrived."""

    def __init__(self, stack, session_id: str) -> None:
        import websocket

        self.frames: list[tuple[float, dict]] = []
        self.ws = websocket.create_connection(
            stack.url.replace("http://", "ws://") + "/ws/vms/events/",
            cookie=f"sessionid={session_id}",
            origin=stack.url,
            timeout=5,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import websocket

        while True:
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return
            if not frame:  # closed
                return
            self.frames.append((time.monotonic(), json.loads(frame)))

    def state_event(self, vm_id: str, state: str) -> float | None:
        return next((t for t, f in self.frames if f.get("vm") == vm_id and f.get("state") == state), None)

    def close(self) -> None:
        self.ws.close()


def test_the_embedded_default_has_no_database_or_redis_server_to_configure(embedded_stack):
    stack = embedded_stack
    assert "DATABASE_URL" not in stack.env and "REDIS_URL" not in stack.env
    assert (stack.data_dir / "db.sqlite3").is_file()
    socket_path = stack.data_dir / "redis.sock"
    port = subprocess.run(
        ["redis-cli", "-s", str(socket_path), "config", "get", "port"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.split()
    assert port == ["port", "0"]  # the private Redis listens on its Unix socket only
    with contextlib.closing(sqlite3.connect(f"file:{stack.data_dir / 'db.sqlite3'}?mode=ro", uri=True)) as db:
        journal = db.execute("pragma journal_mode").fetchone()[0]
    assert journal == "wal"


@pytest.mark.browser
def test_live_state_arrives_over_the_events_websocket_and_the_console_takes_input(embedded_stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    stack, driver = embedded_stack, browser
    shots = stack.log_dir.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    _login(driver, stack, "owner")
    observer = EventsObserver(stack, driver.get_cookie("sessionid")["value"])
    try:
        driver.get(stack.url + "/vms/new/")
        driver.find_element(By.ID, "id_name").send_keys("embedded-vm")
        Select(driver.find_element(By.ID, "id_template")).select_by_value("linux-small")
        driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
        wait_until(
            lambda: "/vms/" in driver.current_url and "new" not in driver.current_url,
            timeout=30,
            message="detail page",
        )
        vm_id = driver.find_element(By.ID, "vm").get_attribute("data-vm-id")
        # The page's 10 s poll is off: "running" can only come from an event of the worker's,
        # through the private Redis, to daphne, to this page.
        wait_until(
            lambda: driver.find_element(By.ID, "vm-state").text == "running",
            timeout=240,
            interval=0.3,
            message="the VM running on the page, pushed by the events websocket",
        )
        shown_at = time.monotonic()
        driver.save_screenshot(str(shots / "embedded-vm-detail.png"))
        pushed = driver.execute_script("return window.__events.map((e) => e[1])")
        assert any(json.loads(f).get("vm") == vm_id and json.loads(f).get("state") == "running" for f in pushed)
        # The test's own websocket got the same event, and the page showed it right after.
        seen_at = wait_until(
            lambda: observer.state_event(vm_id, "running"), timeout=10, message="the running event in the test"
        )
        assert abs(shown_at - seen_at) < 5.0, (shown_at, seen_at)  # the poll would take up to 10 s
        with stack.client() as client:
            assert client.get(f"/api/v1/vms/{vm_id}/").json()["state"] == "running"

        # The console's writer role lives in the private Redis too.
        driver.find_element(By.ID, "tab-console").click()
        wait_until(
            lambda: driver.execute_script("return window.sandboxConsole && window.sandboxConsole.writer"),
            timeout=60,
            message="console writer role",
        )
        textarea = driver.find_element(By.CSS_SELECTOR, "#console-term textarea")
        textarea.send_keys("\n")
        textarea.send_keys("echo embedded-$((6*7))\n")
        wait_until(
            lambda: "embedded-42" in driver.execute_script("return window.sandboxConsole.text()"),
            timeout=60,
            message="command output in the terminal",
        )
        driver.save_screenshot(str(shots / "embedded-vm-console.png"))

        with stack.client() as client:
            assert client.delete(f"/api/v1/vms/{vm_id}/").status_code == 202
        wait_until(
            lambda: (
                observer.state_event(vm_id, "deleting")
                or any(f.get("vm") == vm_id and f.get("kind") == "vm.deleted" for _, f in observer.frames)
            ),
            timeout=60,
            message="the delete pushed to the events websocket",
        )
    finally:
        observer.close()
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def _session(stack, username: str) -> httpx.Client:
    """A dashboard session (tokens are created with a session, not with a token)."""
    client = httpx.Client(base_url=stack.url, timeout=60.0)
    client.get("/login/")
    response = client.post(
        "/login/",
        data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": stack.url + "/login/"},
    )
    assert response.status_code in (200, 302), response.text[:300]
    assert "sessionid" in client.cookies, "login failed"
    client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    client.headers["Referer"] = stack.url + "/"
    return client


def test_twenty_parallel_api_writers_get_no_server_errors(embedded_stack):
    """Creates, updates, shares, token and user writes and deletes at once from 20 clients (plus
    the worker's own writes for the VMs they create): SQLite answers every one without a 5xx."""
    stack = embedded_stack
    personas = ["owner", "grantee", "stranger", "admin"]
    others = {"owner": "grantee", "grantee": "stranger", "stranger": "owner", "admin": "owner"}
    clients = [_session(stack, personas[i % 4]) for i in range(20)]
    start = threading.Barrier(20)
    results: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def call(client, what: str, method: str, url: str, **kw) -> httpx.Response:
        response = client.request(method, url, **kw)
        with lock:
            results.append((what, response.status_code, response.text[:300]))
        return response

    def writer(i: int) -> str | None:
        client = clients[i]
        persona = personas[i % 4]
        start.wait(timeout=60)
        token = call(client, "token create", "POST", "/api/v1/tokens/", json={"name": f"writer-{i}"})
        vm = call(client, "vm create", "POST", "/api/v1/vms/", json={"name": f"writer-{i}", "template": "broken"})
        vm_id = vm.json().get("id") if vm.status_code == 202 else None
        if vm_id:
            call(client, "vm update", "PATCH", f"/api/v1/vms/{vm_id}/", json={"metadata": {"writer": i}})
            call(
                client,
                "vm share",
                "POST",
                f"/api/v1/vms/{vm_id}/permissions/",
                json={"user": others[persona], "permissions": ["view_vm"]},
            )
        if persona == "admin":
            call(
                client,
                "user create",
                "POST",
                "/api/v1/users/",
                json={"username": f"writer-user-{i}", "password": "a-long-password-1", "role": "user"},
            )
        if token.status_code == 201:
            call(client, "token delete", "DELETE", f"/api/v1/tokens/{token.json()['id']}/")
        call(client, "operations", "GET", "/api/v1/operations/")
        call(client, "audit", "GET", "/api/v1/audit-events/")
        if vm_id:
            call(client, "vm delete", "DELETE", f"/api/v1/vms/{vm_id}/")
        return vm_id

    try:
        with ThreadPoolExecutor(20) as pool:
            vm_ids = [v for v in pool.map(writer, range(20)) if v]
    finally:
        for client in clients:
            client.close()
    summary = Counter((what, status) for what, status, _ in results)
    errors = [r for r in results if r[1] >= 500]
    assert errors == [], f"server errors: {errors[:5]} (all: {dict(summary)})"
    assert summary[("token create", 201)] == 20 and summary[("vm create", 202)] == 20, dict(summary)
    assert summary[("vm update", 200)] == 20 and summary[("vm share", 200)] == 20, dict(summary)
    assert summary[("user create", 201)] == 5 and summary[("token delete", 204)] == 20, dict(summary)
    # The worker's writes raced with them too: every VM goes away (delete after a failed launch).
    for vm_id in vm_ids:
        stack.wait_vm(vm_id, {"gone", "error"}, timeout=180, persona="admin")
    logs = "".join(p.read_text(errors="replace") for p in stack.log_dir.glob("*.log"))
    assert "database is locked" not in logs
