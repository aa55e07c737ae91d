"""Operating the real stack: Prometheus scrapes every process, /readyz follows Redis and hostd,
and JSON log lines carry an API call's request id into its Celery task."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.system.stack import ROOT, VENV_BIN
from tests.waiting import wait_until

pytestmark = pytest.mark.vm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _targets(stack) -> dict[str, str]:
    return {
        "msbx-web": stack.url.removeprefix("http://"),
        "msbx-worker": f"127.0.0.1:{stack.metrics_ports['worker']}",
        "msbx-hostd": f"127.0.0.1:{stack.metrics_ports['hostd']}",
    }


def test_prometheus_scrapes_every_process_and_promtool_accepts_their_metrics(stack, tmp_path):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus is not installed (Debian package prometheus, requirements/apt.txt)")
    # Something for the worker to count: an operation (create without start: no boot).
    with stack.client() as client:
        response = client.post("/api/v1/vms/", json={"name": "metrics", "template": "linux-small", "start": False})
        assert response.status_code == 202, response.text
        vm = response.json()
    stack.wait_vm(vm["id"], {"stopped"}, timeout=120)

    targets = _targets(stack)
    for job, target in targets.items():
        body = httpx.get(f"http://{target}/metrics", timeout=10).text
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, f"{job}: {check.stdout}{check.stderr}"

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{ROOT / 'deploy' / 'prometheus' / 'alerts.yml'}]\n"
        "scrape_configs:\n"
        + "".join(f"  - job_name: {job}\n    static_configs: [{{targets: ['{t}']}}]\n" for job, t in targets.items())
    )
    port = _free_port()
    log = open(stack.log_dir / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:

        def query(expr: str) -> list[dict]:
            try:
                answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return []
            return answer.get("data", {}).get("result", []) if answer.get("status") == "success" else []

        def all_up() -> bool:
            results = query("up")
            return len(results) == 3 and all(r["value"][1] == "1" for r in results)

        wait_until(all_up, timeout=60, message="every target scraped and up")
        assert {r["metric"]["job"] for r in query("up == 1")} == set(targets)
        wait_until(lambda: query('msbx_vms{state="stopped"}'), timeout=30, message="VM states from the web process")
        wait_until(
            lambda: query('msbx_operations_total{action="create",outcome="succeeded"}'),
            timeout=30,
            message="operations counted by the worker",
        )
        wait_until(lambda: query("msbx_hostd_vms_attached"), timeout=30, message="hostd's own metrics")
        assert query('msbx_host_up{host="systest"} == 1')
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        with stack.client() as client:
            client.delete(f"/api/v1/vms/{vm['id']}/")


def _readyz(url: str) -> tuple[int, dict]:
    try:
        response = httpx.get(url + "/readyz", timeout=10)
    except httpx.HTTPError:
        return 0, {}
    return response.status_code, response.json()


def test_readyz_follows_hostd(stack):
    wait_until(lambda: _readyz(stack.url)[0] == 200, timeout=60, message="ready")
    stack.kill("hostd")
    try:
        status, body = _readyz(stack.url)
        assert status == 503 and body["checks"]["hostd"]["ok"] is False and body["checks"]["database"]["ok"]
    finally:
        stack.start("hostd")
        stack.wait_hostd()
    wait_until(lambda: _readyz(stack.url)[0] == 200, timeout=60, message="ready again with hostd back")


def test_readyz_follows_redis(stack, tmp_path):
    """A web process of the stack on a Redis of its own (the stack's Redis is shared with
    other test runs on this machine and must not stop): stopped, it is not ready; back, it is."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    sock = Path(tempfile.mkdtemp(prefix="msbx-rd-", dir="/tmp")) / "redis.sock"

    def redis_start() -> subprocess.Popen:
        redis = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(sock.exists, timeout=10, message="redis socket")
        return redis

    redis = redis_start()
    port = _free_port()
    web = subprocess.Popen(
        [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "sandbox_site.asgi:application"],
        cwd=ROOT,
        env={**stack.env, "REDIS_URL": f"unix://{sock}"},
        stdout=open(stack.log_dir / "web-redis-test.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _readyz(url)[0] == 200, timeout=60, message="ready with its Redis")
        redis.terminate()
        redis.wait(timeout=10)
        sock.unlink(missing_ok=True)
        status, body = _readyz(url)
        assert status == 503 and body["checks"]["redis"]["ok"] is False and body["checks"]["hostd"]["ok"]
        redis = redis_start()
        wait_until(lambda: _readyz(url)[0] == 200, timeout=60, message="ready again with Redis back")
    finally:
        web.terminate()
        web.wait(timeout=30)
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_json_log_lines_carry_the_request_id_from_the_api_into_the_celery_task(stack):
    with stack.client() as client:
        response = client.post("/api/v1/vms/", json={"name": "logged", "template": "linux-small", "start": False})
        assert response.status_code == 202, response.text
    request_id = response.headers["X-Request-ID"]
    vm_id = response.json()["id"]
    stack.wait_vm(vm_id, {"stopped"}, timeout=120)

    def worker_lines() -> list[dict]:
        lines = []
        for raw in (stack.log_dir / "worker.log").read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    continue
        return [line for line in lines if line.get("request_id") == request_id]

    # The VM shows "stopped" before the worker logs the operation's success: wait for that line.
    lines = wait_until(
        lambda: (found := worker_lines()) and any(line["msg"].endswith("succeeded") for line in found) and found,
        timeout=30,
        message="the worker's success line with the request id",
    )
    assert any(line["msg"].endswith("succeeded") for line in lines), lines
    ours = [line for line in lines if line["logger"] == "vms.operations"]
    assert ours and all(line.get("operation_id") and line.get("vm_id") == vm_id for line in ours), lines
    assert any(line.get("task_id") for line in lines)
    assert any(line.get("user") == "owner" for line in lines)
    with stack.client() as client:
        client.delete(f"/api/v1/vms/{vm_id}/")


def _restart_worker(stack, **env: str) -> None:
    stack.kill("worker")
    saved = dict(stack.env)
    stack.env.update(env)
    try:
        stack.start("worker")
    finally:
        stack.env.clear()
        stack.env.update(saved)


def _host_metric(stack, name: str = "msbx_host_up") -> str | None:
    for line in httpx.get(stack.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + '{host="systest"}'):
            return line.split()[-1]
    return None


def _host_up(stack) -> str | None:
    return _host_metric(stack)


def test_a_host_whose_hostd_stops_answering_is_down_and_its_vms_unknown(stack, running_vm):
    vm_id = running_vm["id"]
    _restart_worker(stack, SANDBOX_HOST_DOWN_SECONDS="6")  # the worker runs hosts_check
    try:
        wait_until(lambda: _host_up(stack) == "1.0", timeout=60, message="host up")
        stack.kill("hostd")
        try:
            assert stack.wait_vm(vm_id, {"unknown"}, timeout=90)["state"] == "unknown"
            # (The web process judges "down" by its own SANDBOX_HOST_DOWN_SECONDS, 30 s here.)
            assert float(_host_metric(stack, "msbx_host_heartbeat_age_seconds") or 0) > 6
        finally:
            stack.start("hostd")
            stack.wait_hostd()
        # Back to what the VMM reports (it kept running all along).
        assert stack.wait_vm(vm_id, {"running"}, timeout=90)["state"] == "running"
        wait_until(lambda: _host_up(stack) == "1.0", timeout=60, message="host up again")
    finally:
        _restart_worker(stack)
