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

  function liveEvents(onEvent, subscribe) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    let socket = null;
    let delay = 1000;
    function connect() {
      socket = new WebSocket(`${scheme}://${location.host}/ws/vms/events/`);
      socket.onopen = () => { delay = 1000; (subscribe || []).forEach((id) => socket.send(JSON.stringify({ subscribe: id }))); };
      socket.onmessage = (msg) => { try { onEvent(JSON.parse(msg.data)); } catch (e) { /* ignore bad frames */ } };
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

  window.sandbox = { api, liveEvents, flash };
})();
