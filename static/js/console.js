/* Serial console in xterm.js: replay then live, resume from the last byte offset on
   reconnect (nothing duplicated or lost), flow-control acks, one writer with explicit takeover.
   Acks follow xterm.js: a byte counts as taken once the terminal has parsed it (its write
   callback), and an ack goes every quarter of the server's window, so a page busy rendering
   slows its own stream (hostd lets it fall behind, never the guest) instead of piling up
   output in xterm's write queue.
   The server closes with 4409 while the VM is not running and 4503 while the host daemon is
   unreachable (after an `error` with `closing: true` saying why): both are retried with backoff.
   4401/4403/4404 (not logged in, no right, no such VM) are final: the page says why and stops.

   Two consoles use this: the Console tab, and on the overview a small read-only one while the
   VM boots (`?view=1`: it never takes the keyboard). Read-only state is a badge on the terminal
   itself, not a banner above it. */
(function () {
  "use strict";
  const root = document.getElementById("vm");
  if (!root || !window.Terminal) return;
  const { api, flash } = window.sandbox;
  const vmId = root.dataset.vmId;
  const me = root.dataset.username;
  const encoder = new TextEncoder();
  const FINAL = { 4401: "Not logged in.", 4403: "No access to this console.", 4404: "This VM does not exist or is not shared with you." };

  function makeConsole({ mount, readOnly, onStatus, onRole, fontSize }) {
    // offset: bytes received (where a reconnect resumes); done: bytes xterm has parsed; acked: bytes acknowledged
    let term = null, fit = null, socket = null, offset = -1, done = 0, acked = 0, writer = false, canWrite = false;
    let retry = 1000, stopped = false, pingTimer = null, retryTimer = null, ackEvery = 65536, lastError = "";
    let holderName = null;

    function send(data) { if (socket && socket.readyState === WebSocket.OPEN) socket.send(data); }
    function setRole(isWriter, holder) { writer = isWriter; holderName = holder || null; if (onRole) onRole({ writer, canWrite, holder: holderName }); }

    function connect() {
      if (stopped) return;
      clearTimeout(retryTimer);
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const params = [];
      if (offset >= 0) params.push(`offset=${offset}`);
      if (readOnly) params.push("view=1");
      const ws = new WebSocket(`${scheme}://${location.host}/ws/vms/${vmId}/console/${params.length ? "?" + params.join("&") : ""}`);
      socket = ws;
      ws.binaryType = "arraybuffer";
      onStatus("connecting…");
      ws.onopen = () => { onStatus("connected", "state-running"); };
      ws.onmessage = (msg) => {
        if (typeof msg.data !== "string") {
          const bytes = new Uint8Array(msg.data);
          offset += bytes.length;
          const end = offset;
          term.write(bytes, () => {  // xterm decodes UTF-8 across frame boundaries
            if (socket !== ws || end <= done) return;
            done = end;
            if (done - acked >= ackEvery) { acked = done; send(JSON.stringify({ type: "ack", offset: done })); }
          });
          return;
        }
        const m = JSON.parse(msg.data);
        if (m.type === "hello") {
          retry = 1000; lastError = "";
          offset = m.offset; done = acked = offset; canWrite = m.can_write; setRole(m.writer, m.writer_user);
          if (m.window) ackEvery = Math.max(1, Math.floor(m.window / 4));  // three quarters still in flight when it leaves
        }
        else if (m.type === "role") {
          setRole(m.writer, m.writer_user);
          if (m.taken_from_you && !readOnly) flash(m.writer_user === me ? "Your other session took over the console input." : `${m.writer_user} took over the console input.`);
        }
        else if (m.type === "ping") { send(JSON.stringify({ type: "pong" })); acked = done; send(JSON.stringify({ type: "ack", offset: done })); }
        else if (m.type === "gap") {
          term.write(m.to > m.from ? `\r\n[${m.to - m.from} bytes of console output no longer exist]\r\n`
            : "\r\n[console log restarted]\r\n");
          offset = m.to; done = acked = offset;
        }
        else if (m.type === "error" && m.closing) { lastError = m.message; }  // shown in the status, not flashed on every retry
        else if (m.type === "error" && m.code === "read_only") { if (onRole) onRole({ writer, canWrite, holder: holderName, nudge: true }); }
        else if (m.type === "error" && !readOnly) { flash(m.message, "error"); }
      };
      ws.onclose = (event) => {
        if (socket !== ws) return;
        socket = null;
        if (stopped) return;
        if (FINAL[event.code]) {  // refused: retrying cannot help
          stopped = true;
          onStatus(`no access: ${lastError || FINAL[event.code]}`, "state-error", true);
          if (onRole) onRole({ writer: false, canWrite: false, holder: null, refused: true });
          return;
        }
        onStatus(lastError ? `${lastError} Reconnecting…` : "disconnected, reconnecting…");
        retryTimer = setTimeout(connect, retry);  // resume from `offset`
        retry = Math.min(retry * 2, 15000);
      };
    }

    function start() {
      if (term) { fit.fit(); if (!socket && !stopped) connect(); return; }
      term = new window.Terminal({ convertEol: false, scrollback: 10000, fontSize: fontSize || 14, cursorBlink: !readOnly,
        disableStdin: !!readOnly, fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" });
      fit = new window.FitAddon.FitAddon();
      term.loadAddon(fit);
      term.open(mount);
      fit.fit();
      window.addEventListener("resize", () => fit.fit());
      connect();
      pingTimer = setInterval(() => send(JSON.stringify({ type: "ping" })), 20000);
    }

    return {
      start,
      get term() { return term; },
      get fit() { return fit; },
      get offset() { return offset; },
      get writer() { return writer; },
      get canWrite() { return canWrite; },
      get holder() { return holderName; },
      get refused() { return stopped && !!term; },
      send,
      sendKeys(text) {
        if (!writer) { if (onRole) onRole({ writer, canWrite, holder: holderName, nudge: true }); return; }
        send(encoder.encode(text));
      },
      /** Drop the connection and resume from the offset (as after a network failure). */
      reconnect() { if (socket) socket.close(1000); },
      /** Connect again at once (the VM's state changed: no need to wait for the backoff). */
      retryNow() { if (term && !socket && !stopped) { retry = 1000; connect(); } },
      stop() {
        stopped = true; clearInterval(pingTimer); clearTimeout(retryTimer);
        if (socket) { const ws = socket; socket = null; ws.close(1000); }
      },
      text() {
        if (!term) return "";
        const buf = term.buffer.active, lines = [];
        for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i).translateToString(true));
        return lines.join("\n");
      },
    };
  }

  /* --- the Console tab --- */
  const mount = document.getElementById("console-term");
  const statusEl = document.getElementById("console-status");
  const badge = document.getElementById("console-badge");
  const roleEl = document.getElementById("console-role");
  const takeoverBtn = document.getElementById("console-takeover");
  let nudgeTimer = null;

  function roleText({ writer, canWrite, holder, refused }) {
    if (refused) return "";
    if (writer) return "";
    if (!canWrite) return "Read-only: you have view rights." + (holder ? ` ${holder === me ? "Your other session has" : holder + " has"} the keyboard.` : "");
    if (holder === me) return "Read-only: your other session has the keyboard.";
    return holder ? `Read-only: ${holder} is typing.` : "Read-only: nobody is typing.";
  }

  const main = makeConsole({
    mount,
    onStatus(text, kind, final) {
      statusEl.textContent = text;
      statusEl.className = `state ${kind || ""}`;
      if (final && main.term) main.term.write(`\r\n\x1b[31m[${text}]\x1b[0m\r\n`);
    },
    onRole(role) {
      const text = roleText(role);
      badge.hidden = !text;
      roleEl.textContent = text;
      if (takeoverBtn) takeoverBtn.hidden = role.writer || !role.canWrite;
      mount.classList.toggle("read-only", !role.writer);
      if (role.nudge && text) {  // typed while read-only: the badge says why, in place
        badge.classList.remove("nudge"); void badge.offsetWidth; badge.classList.add("nudge");
        clearTimeout(nudgeTimer); nudgeTimer = setTimeout(() => badge.classList.remove("nudge"), 1200);
      }
    },
  });

  function startMain(focus) {
    const fresh = !main.term;
    main.start();
    if (fresh) {
      const term = main.term;
      term.onData((data) => main.sendKeys(data));
      term.attachCustomKeyEventHandler((e) => {
        if (e.type === "keydown" && e.ctrlKey && e.shiftKey && e.code === "KeyC") {
          if (term.hasSelection()) navigator.clipboard.writeText(term.getSelection());
          return false;
        }
        if (e.type === "keydown" && e.ctrlKey && e.shiftKey && e.code === "KeyV") {
          navigator.clipboard.readText().then((t) => main.sendKeys(t)).catch(() => flash("Clipboard not available.", "error"));
          return false;
        }
        return true;
      });
      if (term.textarea) term.textarea.setAttribute("aria-label", "Console input");
    }
    if (focus) main.term.focus();  // not when the tab is shown: arrow keys stay in the tab list
  }

  if (takeoverBtn) takeoverBtn.addEventListener("click", () => { main.send(JSON.stringify({ type: "takeover" })); main.term && main.term.focus(); });
  document.querySelectorAll(".console-bar [data-keys]").forEach((b) => b.addEventListener("click", () => {
    main.sendKeys(b.dataset.keys === "ctrl-c" ? "\x03" : "\x04"); if (main.term) main.term.focus();
  }));
  const cad = document.getElementById("console-cad");
  if (cad) cad.addEventListener("click", async () => {
    if (!confirm("Ctrl-Alt-Del reboots the guest. Continue?")) return;
    try { await api("POST", `/api/v1/vms/${vmId}/reboot/`, {}); flash("Reboot requested."); } catch (e) { flash(e.message, "error"); }
  });
  document.getElementById("console-font").addEventListener("change", (e) => {
    if (!main.term) return;
    main.term.options.fontSize = Number(e.target.value); main.fit.fit();
  });
  document.getElementById("console-full").addEventListener("click", () => {
    mount.requestFullscreen().then(() => setTimeout(() => main.fit && main.fit.fit(), 100)).catch(() => {});
  });
  document.addEventListener("fullscreenchange", () => setTimeout(() => main.fit && main.fit.fit(), 100));

  /* --- the overview's boot console (read-only, only while the VM boots) --- */
  const bootMount = document.getElementById("boot-console");
  let boot = null, bootText = "";
  document.addEventListener("boot-console", (e) => {
    if (e.detail && !boot && bootMount) {
      boot = makeConsole({ mount: bootMount, readOnly: true, fontSize: 12, onStatus() {}, onRole() {} });
      boot.start();
    } else if (!e.detail && boot) { bootText = boot.text(); boot.stop(); boot = null; bootMount.replaceChildren(); }
  });

  const again = () => { main.retryNow(); if (boot) boot.retryNow(); };
  document.addEventListener("vm-state", again);
  document.addEventListener("vm-progress", again);  // the boot moved on: its VMM may be up now
  document.addEventListener("vm-gone", () => { main.stop(); if (boot) boot.stop(); statusEl.textContent = "the VM was deleted"; });
  window.addEventListener("beforeunload", () => { main.stop(); if (boot) boot.stop(); });

  document.addEventListener("tab-shown", (e) => { if (e.detail === "console") startMain(); });
  if (location.hash === "#console") startMain(true);
  /* For tests and power users: the terminals' text and state. */
  window.sandboxConsole = {
    get offset() { return main.offset; },
    get writer() { return main.writer; },
    get canWrite() { return main.canWrite; },
    get refused() { return main.refused; },
    status() { return statusEl.textContent; },
    reconnect() { main.reconnect(); },
    badge() { return badge.hidden ? "" : roleEl.textContent; },
    text() { return main.text(); },
    bootText() { return boot ? boot.text() : bootText; },  // the last boot's, once it is over
  };
})();
