/* Exec tab: run a command and watch its output stream, or an interactive shell (PTY) through
   the guest agent. Output resumes from its byte offset when the socket drops. */
(function () {
  "use strict";
  const root = document.getElementById("vm");
  const form = document.getElementById("exec-form");
  const mount = document.getElementById("exec-term");
  if (!root || !form || !mount || !window.Terminal) return;
  const { api, flash } = window.sandbox;
  const vmId = root.dataset.vmId;
  const statusEl = document.getElementById("exec-status");
  const encoder = new TextEncoder();
  let term = null, fit = null, socket = null, current = null;

  function ensureTerm() {
    if (term) return;
    term = new window.Terminal({ scrollback: 20000, fontSize: 14, convertEol: true,
      fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" });
    fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(mount);
    fit.fit();
    term.onData((data) => { if (current && current.pty && socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data)); });
    term.onResize(({ rows, cols }) => { if (current && current.pty && socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", rows, cols })); });
    window.addEventListener("resize", () => fit.fit());
  }

  function attach(run) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws/vms/${vmId}/execs/${run.id}/?offset=${run.offset}`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (msg) => {
      if (typeof msg.data !== "string") {
        const bytes = new Uint8Array(msg.data);
        const payload = bytes.subarray(1);
        run.offset += payload.length;
        // Flow control: the server sends at most `window` bytes beyond our last ack.
        if (run.window && run.offset - run.acked >= run.window / 2) {
          run.acked = run.offset;
          socket.send(JSON.stringify({ type: "ack", offset: run.offset }));
        }
        if (bytes[0] === 2 && !run.pty) { term.write("\x1b[31m"); term.write(payload); term.write("\x1b[0m"); }
        else term.write(payload);
        return;
      }
      const m = JSON.parse(msg.data);
      if (m.type === "attached") {
        run.window = m.window || 0;
        run.offset = run.acked = m.offset;
      } else if (m.type === "exit") {
        run.done = true;
        const r = m.result || m;
        const how = r.signal ? `killed by signal ${r.signal}` : `exit code ${r.exit_code}`;
        statusEl.textContent = `Finished: ${how}` + (r.duration_ms !== undefined ? ` in ${r.duration_ms} ms` : "") + ".";
        window.sandboxExec.lastExit = r;
      } else if (m.type === "gap") {
        run.offset = run.acked = m.to;
        term.write("\r\n[output dropped by the bounded buffer]\r\n");
      } else if (m.type === "error") {
        statusEl.textContent = `Error: ${m.message}`;
      }
    };
    socket.onclose = () => { if (!run.done && current === run) setTimeout(() => attach(run), 1000); };
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    ensureTerm();
    const pty = document.getElementById("exec-pty").checked;
    let command = document.getElementById("exec-command").value.trim();
    if (!command && !pty) { flash("Type a command.", "error"); return; }
    if (!command) command = ["/bin/bash", "-l"];
    if (socket) { current = null; socket.close(); }
    term.reset();
    fit.fit();
    try {
      const body = { command, wait: false };
      if (pty) { body.pty = { rows: term.rows, cols: term.cols, term: "xterm-256color" }; body.stdin_open = true; }
      const started = await api("POST", `/api/v1/vms/${vmId}/exec/`, body);
      current = { id: started.exec_id, offset: 0, pty, done: false };
      statusEl.textContent = `Running (exec ${started.exec_id})…`;
      attach(current);
      term.focus();
    } catch (err) {
      statusEl.textContent = "";
      flash(err.message, "error");
    }
  });

  window.sandboxExec = {
    lastExit: null,
    text() {
      if (!term) return "";
      const buf = term.buffer.active, lines = [];
      for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i).translateToString(true));
      return lines.join("\n");
    },
  };
})();
