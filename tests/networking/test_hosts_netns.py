"""Two "hosts" as network namespaces joined by a veth link (no traffic leaves them): host h2's
hostd listens on its side of the link with mutual TLS; the control plane's client, in the other
namespace, reaches it by address and name, runs a command through the guest agent of a VM on h2
(a stand-in VMM with the real agent code) and reads its console, as a web process on another
machine would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests.hostd.runner import FAKE_VMM
from vms import pki

ROOT = Path(__file__).resolve().parents[2]
H2_ADDR, CTL_ADDR, PORT = "10.231.91.2", "10.231.91.1", 7443

HOSTD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from vms.hostd.daemon import HostDaemon, HostdConfig
    root, pki_dir, listen = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    config = HostdConfig(runtime_dir=root, socket_path=root / "hostd.sock", scan_seconds=0.3,
                         tls_listen=listen, tls_cert=pki_dir / "hosts/h2.crt", tls_key=pki_dir / "hosts/h2.key",
                         tls_ca=pki_dir / "ca.crt")
    asyncio.run(HostDaemon(config).run_forever())
    """
)

CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from vms.hostd.client import HostdClient
    from vms.hostd.tls import TlsAddress, client_context
    pki_dir, host, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    context = client_context(cert=pki_dir / "control.crt", key=pki_dir / "control.key", ca=pki_dir / "ca.crt")
    deadline = time.monotonic() + 30
    while True:
        try:
            client = HostdClient(TlsAddress(host, port, context, server_hostname="h2"), timeout=20)
            client.connect()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    with client:
        client.agent_wait("vm1", timeout=20)
        exec_id = client.agent("vm1", "exec_start", {"shell": "echo across-hosts"})[0]["exec_id"]
        events = list(client.exec_stream("vm1", exec_id, timeout=20))
        info = client.call("console_info", {"vm_id": "vm1"})[0]
    output = b"".join(e["data"] for e in events if e["ev"] == "out").decode()
    code = (events[-1].get("result") or {}).get("exit_code")
    print("RESULT=" + json.dumps({"output": output, "exit": code, "console": info}))
    """
)


def _ns(*argv: str, ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def test_a_control_plane_in_one_namespace_drives_hostd_in_another_over_mutual_tls(make_netns, settings):
    h2, ctl = make_netns("h2"), make_netns("ctl")
    subprocess.run(
        ["ip", "link", "add", "msbt-h2", "netns", h2, "type", "veth", "peer", "name", "msbt-ctl", "netns", ctl],
        check=True,
    )
    for ns, dev, addr in ((h2, "msbt-h2", H2_ADDR), (ctl, "msbt-ctl", CTL_ADDR)):
        subprocess.run(_ns("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns), check=True)
        subprocess.run(_ns("ip", "link", "set", dev, "up", ns=ns), check=True)

    work = Path(tempfile.mkdtemp(prefix="hns-", dir="/tmp"))
    settings.SANDBOX_PKI_DIR = work / "pki"
    pki.host_cert_issue("h2", H2_ADDR)
    pki.control_ensure()
    runtime = work / "run"
    (runtime / "vm1").mkdir(parents=True)
    (runtime / "vm1" / "spec.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, str(FAKE_VMM), str(runtime / "vm1")], start_new_session=True),
        subprocess.Popen(
            _ns(sys.executable, "-c", HOSTD, str(runtime), str(work / "pki"), f"{H2_ADDR}:{PORT}", ns=h2),
            cwd=ROOT,
            env=env,
            start_new_session=True,
        ),
    ]
    try:
        out = subprocess.run(
            _ns(sys.executable, "-c", CLIENT, str(work / "pki"), H2_ADDR, str(PORT), ns=ctl),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.split("RESULT=", 1)[1])
        assert result["output"] == "across-hosts\n" and result["exit"] == 0
        assert result["console"]["connected"] is True
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(work)], check=False)
        time.sleep(0.1)
