/* Small helpers shared by dashboard pages: JSON API calls with the session's CSRF token,
   and the live events websocket (with reconnect). */
(function () {
  "use strict";
  const csrf = document.body.dataset.csrf;

  async function api(method, url, body) {
    const opts = { method, headers: { "X-CSRFToken": csrf, "Accept": "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const response = await fetch(url, opts);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const message = (data && data.error && data.error.message) || response.statusText;
      const error = new Error(message);
      error.status = response.status;
      error.details = data && data.error && data.error.details;
      throw error;
    }
    return data;
  }

  /* ``onEvent`` gets every event; ``onOpen`` runs after each (re)connect, so a page can catch
     up with what it missed while the socket was down. */
  function liveEvents(onEvent, subscribe, onOpen) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    let socket = null;
    let delay = 1000;
    let opened = false;
    function connect() {
      socket = new WebSocket(`${scheme}://${location.host}/ws/vms/events/`);
      socket.onopen = () => {
        delay = 1000;
        (subscribe || []).forEach((id) => socket.send(JSON.stringify({ subscribe: id })));
        if (opened && onOpen) onOpen();
        opened = true;
      };
      socket.onmessage = (msg) => {
        let event;
        try { event = JSON.parse(msg.data); } catch (e) { return; }  // ignore bad frames
        onEvent(event);
      };
      socket.onclose = () => { setTimeout(connect, delay); delay = Math.min(delay * 2, 15000); };
    }
    connect();
  }

  function flash(message, kind) {
    let box = document.getElementById("flash");
    if (!box) {
      box = document.createElement("div");
      box.id = "flash";
      box.setAttribute("role", "status");
      document.querySelector("main").prepend(box);
    }
    box.className = kind === "error" ? "error" : "ok-flash";
    box.textContent = message;
  }

  /* "42 s", "3 min 05 s", "2 h 04 min", "3 d 2 h": uptimes and elapsed times. */
  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const pad = (n) => String(n).padStart(2, "0");
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor(s / 60) % 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor(s / 3600) % 24} h`;
  }

  /* The actions each VM state allows (vms.transitions, rendered into the page as JSON). */
  function stateActions() {
    const el = document.getElementById("state-actions");
    return el ? JSON.parse(el.textContent) : {};
  }

  window.sandbox = { api, liveEvents, flash, duration, stateActions };
})();
