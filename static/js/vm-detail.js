/* VM detail page: tabs (only those the user's rights fill), actions enabled by the state, resize
   where the driver can, live state and operation progress over the events websocket, uptime,
   charts, operations and sharing; a deleted VM's page says so and leads back to the list. */
(function () {
  "use strict";
  const { api, liveEvents, flash, duration, stateActions } = window.sandbox;
  const root = document.getElementById("vm");
  const vmId = root.dataset.vmId;
  const base = `/api/v1/vms/${vmId}/`;

  /* --- tabs (arrow keys move between tabs; the hash remembers the tab) --- */
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  function select(tab) {
    tabs.forEach((t) => {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
    });
    history.replaceState(null, "", "#" + tab.id.replace("tab-", ""));
    document.dispatchEvent(new CustomEvent("tab-shown", { detail: tab.id.replace("tab-", "") }));
  }
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const target = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (target === undefined) return;
      e.preventDefault();
      const next = tabs[(target + tabs.length) % tabs.length];
      next.focus();
      select(next);
    });
  });
  const initial = document.getElementById("tab-" + location.hash.slice(1));
  select(initial || tabs[0]);
  window.addEventListener("hashchange", () => {  // a link to another tab of this page
    const tab = document.getElementById("tab-" + location.hash.slice(1));
    if (tab && tab.getAttribute("aria-selected") !== "true") select(tab);
  });

  /* --- state: buttons follow the state's allowed actions (the API's `actions`) --- */
  const allowed = stateActions();
  const BOOT_STATES = ["creating", "starting", "rebooting"];
  let gone = false;
  const resizeForm = document.getElementById("resize-form");
  const uptimeEl = document.getElementById("vm-uptime");

  function showState(vm) {
    if (gone) return;
    root.dataset.state = vm.state;
    const badge = document.getElementById("vm-state");
    badge.textContent = vm.state;
    badge.className = `state state-${vm.state}`;
    badge.setAttribute("aria-label", `State: ${vm.state}`);
    const err = document.getElementById("vm-error");
    if (vm.last_error !== undefined) { err.hidden = !vm.last_error; err.textContent = vm.last_error || ""; }
    if (vm.driver) document.getElementById("vm-driver").textContent = vm.driver + (vm.acceleration ? ` (${vm.acceleration})` : "");
    if (vm.vcpus) document.getElementById("vm-size").textContent = `${vm.vcpus} vCPU · ${vm.memory_mib} MiB`;
    const actions = vm.actions || allowed[vm.state] || [];
    document.querySelectorAll(".toolbar button[data-action]").forEach((button) => {
      if (!button.dataset.busy) button.disabled = !actions.includes(button.dataset.action);
    });
    if (resizeForm) {
      // Resize only where the driver can do it: stopped, or running/paused with live resize.
      document.getElementById("resize-fields").disabled = !resizeForm.dataset.states.split(",").includes(vm.state);
    }
    if (vm.state !== "running") uptimeEl.dataset.since = "";
    else if (vm.started_at !== undefined) uptimeEl.dataset.since = vm.started_at || "";
    tickUptime();
    bootConsole(BOOT_STATES.includes(vm.state));
    document.dispatchEvent(new CustomEvent("vm-state", { detail: vm.state }));
  }
  function tickUptime() {
    const since = uptimeEl.dataset.since;
    uptimeEl.textContent = since ? duration((Date.now() - Date.parse(since)) / 1000) : "–";
  }
  setInterval(tickUptime, 1000);
  tickUptime();

  /* The VM was deleted (or is no longer visible): say so, lead back to the list, stop asking. */
  function showGone() {
    if (gone) return;
    gone = true;
    document.getElementById("vm-gone").hidden = false;
    document.querySelector(".tabs").hidden = true;
    document.querySelectorAll('[role="tabpanel"]').forEach((p) => { p.hidden = true; });
    document.querySelectorAll(".toolbar button").forEach((b) => { b.disabled = true; });
    const badge = document.getElementById("vm-state");
    badge.textContent = "deleted";
    badge.className = "state state-error";
    document.getElementById("vm-progress").hidden = true;
    document.dispatchEvent(new CustomEvent("vm-gone"));
    document.querySelector("#vm-gone a").focus();
  }

  async function refresh() {
    if (gone) return;
    try { showState(await api("GET", base)); loadOperations(); } catch (e) {
      if (e.status === 404) showGone();
    }
  }

  /* --- live progress of the VM's long operation (events carry step, percent, elapsed) --- */
  const progress = document.getElementById("vm-progress");
  let opShown = null, opElapsed = 0, opSince = 0, opRunning = false, hideTimer = null;
  const seen = [];  // what the progress card showed (window.sandboxVm, for tests)
  function showOperation(op) {
    if (gone) return;
    if (opShown && op.id !== opShown && !["pending", "running"].includes(op.status)) return;  // an older one ended
    const bar = document.getElementById("vm-progress-bar");
    const live = ["pending", "running"].includes(op.status);
    if (op.id === opShown && live && op.progress < bar.value) return;  // a slower poll answered after an event
    seen.push({ id: op.id, action: op.action, status: op.status, progress: op.progress, step: op.step || "", elapsed: op.elapsed });
    opShown = op.id;
    clearTimeout(hideTimer);
    progress.hidden = false;
    progress.dataset.op = op.id;
    document.getElementById("vm-progress-action").textContent = op.action.charAt(0).toUpperCase() + op.action.slice(1);
    const status = document.getElementById("vm-progress-status");
    status.textContent = op.status;
    status.className = `state op-${op.status}`;
    bar.value = op.progress;
    bar.textContent = `${op.progress}%`;
    const step = document.getElementById("vm-progress-step");
    step.textContent = op.status === "failed" ? (op.error || op.step || "failed") : `${op.progress}% · ${op.step || "waiting for a worker"}`;
    step.classList.toggle("error", op.status === "failed");
    opRunning = ["pending", "running"].includes(op.status);
    opElapsed = Number(op.elapsed) || 0;
    opSince = Date.now();
    tickElapsed();
    if (op.status === "succeeded") hideTimer = setTimeout(() => { progress.hidden = true; opShown = null; bootConsole(false); }, 5000);
  }
  function tickElapsed() {
    const seconds = opElapsed + (opRunning ? (Date.now() - opSince) / 1000 : 0);
    document.getElementById("vm-progress-elapsed").textContent = `${opRunning ? "" : "took "}${duration(seconds)}`;
  }
  setInterval(() => { if (!progress.hidden) tickElapsed(); }, 1000);
  if (progress.dataset.op) {
    showOperation({ id: progress.dataset.op, action: progress.dataset.action, status: progress.dataset.status,
      progress: Number(progress.dataset.progress), elapsed: Number(progress.dataset.elapsed), step: progress.dataset.step });
  }

  /* While the VM boots the overview shows its console (read-only: it never takes the keyboard). */
  function bootConsole(on) {
    const wrap = document.getElementById("boot-console-wrap");
    if (on && !progress.hidden) { wrap.hidden = false; document.dispatchEvent(new CustomEvent("boot-console", { detail: true })); }
    else if (!on && !wrap.hidden) {
      setTimeout(() => { if (!BOOT_STATES.includes(root.dataset.state)) { wrap.hidden = true; document.dispatchEvent(new CustomEvent("boot-console", { detail: false })); } }, 3000);
    }
  }

  window.sandboxVm = { get operations() { return seen.slice(); }, get gone() { return gone; } };
  liveEvents((event) => {
    if (event.vm !== vmId) return;
    if (event.kind === "vm.deleted") showGone();
    else if (event.kind === "operation" && event.operation) {
      showOperation(event.operation);
      document.dispatchEvent(new CustomEvent("vm-progress", { detail: event.operation }));
      // A finished delete: the VM is gone (its operations answer 404), not to be asked again.
      if (event.operation.action === "delete" && event.operation.status === "succeeded") showGone();
      else if (!["pending", "running"].includes(event.operation.status)) loadOperations(); }
    else if (event.state) { showState({ state: event.state }); refresh(); }
  }, [vmId], refresh);
  setInterval(refresh, 30000);  // a fallback: events carry every change
  refresh();

  /* --- actions --- */
  document.querySelectorAll(".toolbar button[data-action]").forEach((button) => {
    button.addEventListener("click", async () => {
      if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
      button.disabled = true;
      button.dataset.busy = "1";
      try {
        const action = button.dataset.action;
        if (action === "delete") await api("DELETE", base);
        else await api("POST", `${base}${action}/`, { force: button.dataset.force === "1" });
        flash(`${button.textContent.trim()} requested.`);
      } catch (e) { flash(e.message, "error"); } finally { delete button.dataset.busy; refresh(); }
    });
  });

  if (resizeForm) {
    resizeForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        await api("PATCH", base, {
          vcpus: Number(document.getElementById("resize-vcpus").value),
          memory_mib: Number(document.getElementById("resize-memory").value),
        });
        flash("Resize requested.");
        refresh();
      } catch (err) {
        const details = err.details && typeof err.details === "object" ? " " + Object.values(err.details).join(" ") : "";
        flash(err.message + details, "error");
      }
    });
  }

  /* --- charts --- */
  const charts = {};
  function chart(id, datasets) {
    const ctx = document.getElementById(id);
    if (!ctx || !window.Chart) return null;
    return new window.Chart(ctx, {
      type: "line",
      data: { labels: [], datasets: datasets.map((label) => ({ label, data: [], pointRadius: 0, borderWidth: 2, tension: 0.2 })) },
      options: { animation: false, responsive: true, scales: { x: { ticks: { maxTicksLimit: 6 } }, y: { beginAtZero: true } } },
    });
  }
  charts.cpu = chart("chart-cpu", ["CPU %"]);
  charts.mem = chart("chart-mem", ["RSS", "Assigned"]);
  charts.disk = chart("chart-disk", ["read", "write"]);
  charts.net = chart("chart-net", ["rx", "tx"]);
  async function loadSamples() {
    if (!charts.cpu) return;
    try {
      const data = await api("GET", `${base}samples/?minutes=30`);
      const labels = data.points.map((p) => new Date(p.t).toLocaleTimeString());
      const put = (c, series) => { c.data.labels = labels; series.forEach((s, i) => { c.data.datasets[i].data = data.points.map(s); }); c.update(); };
      put(charts.cpu, [(p) => p.cpu_percent]);
      put(charts.mem, [(p) => p.rss_mib, (p) => p.memory_mib]);
      put(charts.disk, [(p) => p.disk_read_bps / 1024, (p) => p.disk_write_bps / 1024]);
      put(charts.net, [(p) => p.net_rx_bps / 1024, (p) => p.net_tx_bps / 1024]);
    } catch (e) { /* keep the last picture */ }
  }
  loadSamples();
  setInterval(loadSamples, 10000);

  /* --- operations --- */
  async function loadOperations() {
    if (gone) return;
    const body = document.querySelector("#vm-operations tbody");
    try {
      const data = await api("GET", `${base}operations/?limit=20`);
      body.replaceChildren(...data.results.map((op) => {
        const tr = document.createElement("tr");
        const cells = [new Date(op.created_at).toLocaleString(), op.action, op.status, `${op.progress}%`, op.requested_by || "system",
          (op.error || op.log.trim().split("\n").pop() || "")];
        cells.forEach((text, i) => { const td = document.createElement("td"); td.textContent = text; if (i === 2) td.className = `state op-${op.status}`; tr.append(td); });
        return tr;
      }));
      if (!data.results.length) body.innerHTML = '<tr><td colspan="6" class="empty">No operations.</td></tr>';
      const live = data.results.find((op) => op.status === "pending" || op.status === "running");
      if (live && (progress.hidden || opShown === live.id)) {
        const since = Date.parse(live.started_at || live.created_at);
        showOperation({ ...live, step: (live.log || "").trim().split("\n").pop().replace(/^\d\d:\d\d:\d\d /, ""), elapsed: (Date.now() - since) / 1000 });
      }
      if (live) setTimeout(loadOperations, 5000);  // a fallback: events carry the progress
    } catch (e) { /* retry on next refresh */ }
  }
  loadOperations();

  /* --- sharing --- */
  async function loadSharing() {
    const body = document.querySelector("#share-list tbody");
    try {
      const data = await api("GET", `${base}permissions/`);
      const rows = [...data.users.map((u) => ["user", u.user, u.permissions]), ...data.groups.map((g) => ["group", g.group, g.permissions])];
      body.replaceChildren(...rows.map(([kind, name, perms]) => {
        const tr = document.createElement("tr");
        const who = document.createElement("td"); who.textContent = `${kind} ${name}`;
        const what = document.createElement("td"); what.textContent = perms.map((p) => p.replace("_vm", "")).join(", ");
        const act = document.createElement("td");
        if (document.getElementById("share-form")) {
          const b = document.createElement("button"); b.type = "button"; b.className = "small danger"; b.textContent = "Revoke";
          b.addEventListener("click", async () => {
            if (!confirm(`Revoke all rights of ${kind} ${name}?`)) return;
            try { await api("DELETE", `${base}permissions/`, { [kind]: name }); loadSharing(); } catch (e) { flash(e.message, "error"); }
          });
          act.append(b);
        }
        tr.append(who, what, act);
        return tr;
      }));
    } catch (e) { body.innerHTML = '<tr><td>Could not load.</td></tr>'; }
  }
  document.addEventListener("tab-shown", (e) => { if (e.detail === "sharing") loadSharing(); });
  if (location.hash === "#sharing") loadSharing();
  const shareForm = document.getElementById("share-form");
  if (shareForm) {
    shareForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      const perms = Array.from(shareForm.querySelectorAll('input[name="perm"]:checked')).map((i) => i.value);
      const kind = document.getElementById("share-kind").value;
      try {
        await api("POST", `${base}permissions/`, { [kind]: document.getElementById("share-who").value, permissions: perms });
        flash("Shared."); loadSharing();
      } catch (err) { flash(err.message, "error"); }
    });
  }
})();
