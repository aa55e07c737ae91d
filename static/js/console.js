/* Serial console in xterm.js: replay then live, resume from the last byte offset on
   reconnect (nothing duplicated or lost), flow-control acks, one writer with explicit takeover.
   The server closes with 4409 while the VM is not running and 4503 while the host daemon is
   unreachable (after an `error` with `closing: true` saying why): both are retried with backoff. */
(function () {
  "use strict";
  const root = document.getElementById("vm");
  const mount = document.getElementById("console-term");
  if (!root || !mount || !window.Terminal) return;
  const { api, flash } = window.sandbox;
  const vmId = root.dataset.vmId;
  const statusEl = document.getElementById("console-status");
  const roleEl = document.getElementById("console-role");
  const takeoverBtn = document.getElementById("console-takeover");
  const encoder = new TextEncoder();

  let term = null, fit = null, socket = null, offset = -1, acked = 0, writer = false, canWrite = false;
  let retry = 1000, closing = false, pingTimer = null, ackEvery = 32768, lastError = "";

  function setStatus(text, kind) { statusEl.textContent = text; statusEl.className = `state ${kind || ""}`; }
  function setRole(isWriter, holder) {
    writer = isWriter;
    roleEl.textContent = isWriter ? "You have the keyboard." :
      canWrite ? (holder ? `Read-only: ${holder} is typing.` : "Read-only: nobody is typing.") : "Read-only (view rights).";
    takeoverBtn.hidden = isWriter || !canWrite;
  }

  function send(data) { if (socket && socket.readyState === WebSocket.OPEN) socket.send(data); }
  function sendKeys(text) {
    if (!writer) { flash("Take over input to type.", "error"); return; }
    send(encoder.encode(text));
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = offset >= 0 ? `?offset=${offset}` : "";
    socket = new WebSocket(`${scheme}://${location.host}/ws/vms/${vmId}/console/${query}`);
    socket.binaryType = "arraybuffer";
    setStatus("connecting…");
    socket.onopen = () => { setStatus("connected", "state-running"); };
    socket.onmessage = (msg) => {
      if (typeof msg.data !== "string") {
        const bytes = new Uint8Array(msg.data);
        term.write(bytes);  // xterm decodes UTF-8 across frame boundaries
        offset += bytes.length;
        if (offset - acked >= ackEvery) { acked = offset; send(JSON.stringify({ type: "ack", offset })); }
        return;
      }
      const m = JSON.parse(msg.data);
      if (m.type === "hello") {
        retry = 1000; lastError = "";
        offset = m.offset; acked = offset; canWrite = m.can_write; setRole(m.writer, m.writer_user);
        if (m.window) ackEvery = Math.max(1, Math.min(32768, Math.floor(m.window / 2)));  // ack well before the window fills
      }
      else if (m.type === "role") { setRole(m.writer, m.writer_user); if (m.taken_from_you) flash(`${m.writer_user} took over the console input.`); }
      else if (m.type === "ping") { send(JSON.stringify({ type: "pong" })); acked = offset; send(JSON.stringify({ type: "ack", offset })); }
      else if (m.type === "gap") {
        term.write(m.to > m.from ? `\r\n[${m.to - m.from} bytes of console output no longer exist]\r\n`
          : "\r\n[console log restarted]\r\n");
        offset = m.to; acked = offset;
      }
      else if (m.type === "error" && m.closing) { lastError = m.message; }  // shown in the status, not flashed on every retry
      else if (m.type === "error") { flash(m.message, "error"); }
    };
    socket.onclose = (event) => {
      setStatus(lastError ? `${lastError} Reconnecting…` : "disconnected");
      if (closing) return;
      if (event.code === 4403 || event.code === 4404 || event.code === 4401) { setStatus("no access"); return; }
      setTimeout(connect, retry);  // resume from `offset`
      retry = Math.min(retry * 2, 15000);
    };
  }

  function start() {
    if (term) { fit.fit(); return; }
    term = new window.Terminal({ convertEol: false, scrollback: 10000, fontSize: 14, cursorBlink: true,
      fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" });
    fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(mount);
    fit.fit();
    term.onData((data) => sendKeys(data));
    term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && e.code === "KeyC") {
        if (term.hasSelection()) navigator.clipboard.writeText(term.getSelection());
        return false;
      }
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && e.code === "KeyV") {
        navigator.clipboard.readText().then(sendKeys).catch(() => flash("Clipboard not available.", "error"));
        return false;
      }
      return true;
    });
    window.addEventListener("resize", () => fit.fit());
    connect();
    pingTimer = setInterval(() => send(JSON.stringify({ type: "ping" })), 20000);
    term.focus();
  }

  takeoverBtn.addEventListener("click", () => send(JSON.stringify({ type: "takeover" })));
  document.querySelectorAll(".console-bar [data-keys]").forEach((b) => b.addEventListener("click", () => {
    sendKeys(b.dataset.keys === "ctrl-c" ? "\x03" : "\x04"); term.focus();
  }));
  document.getElementById("console-cad").addEventListener("click", async () => {
    if (!confirm("Ctrl-Alt-Del reboots the guest. Continue?")) return;
    try { await api("POST", `/api/v1/vms/${vmId}/reboot/`, {}); flash("Reboot requested."); } catch (e) { flash(e.message, "error"); }
  });
  document.getElementById("console-font").addEventListener("change", (e) => {
    term.options.fontSize = Number(e.target.value); fit.fit();
  });
  document.getElementById("console-full").addEventListener("click", () => {
    mount.requestFullscreen().then(() => setTimeout(() => fit.fit(), 100)).catch(() => {});
  });
  document.addEventListener("fullscreenchange", () => setTimeout(() => fit && fit.fit(), 100));
  window.addEventListener("beforeunload", () => { closing = true; clearInterval(pingTimer); });

  document.addEventListener("tab-shown", (e) => { if (e.detail === "console") start(); });
  if (location.hash === "#console") start();
  /* For tests and power users: the terminal's text and state. */
  window.sandboxConsole = {
    get offset() { return offset; },
    get writer() { return writer; },
    text() {
      if (!term) return "";
      const buf = term.buffer.active, lines = [];
      for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i).translateToString(true));
      return lines.join("\n");
    },
  };
})();
