/* VM detail page: tabs, actions, resize, live state, charts, operations and sharing. */
(function () {
  "use strict";
  const { api, liveEvents, flash } = window.sandbox;
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
      const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (step) { const next = tabs[(i + step + tabs.length) % tabs.length]; next.focus(); select(next); }
    });
  });
  const initial = document.getElementById("tab-" + location.hash.slice(1));
  select(initial || tabs[0]);

  /* --- state --- */
  function showState(vm) {
    const badge = document.getElementById("vm-state");
    badge.textContent = vm.state;
    badge.className = `state state-${vm.state}`;
    const err = document.getElementById("vm-error");
    if (vm.last_error !== undefined) { err.hidden = !vm.last_error; err.textContent = vm.last_error || ""; }
    if (vm.driver) document.getElementById("vm-driver").textContent = vm.driver + (vm.acceleration ? ` (${vm.acceleration})` : "");
    if (vm.vcpus) document.getElementById("vm-size").textContent = `${vm.vcpus} vCPU · ${vm.memory_mib} MiB`;
    if (vm.actions) {
      // Only what the state machine allows now (a transitional state such as "snapshotting" allows little).
      document.querySelectorAll(".toolbar button[data-action]").forEach((button) => {
        button.disabled = !vm.actions.includes(button.dataset.action);
      });
    }
    document.dispatchEvent(new CustomEvent("vm-state", { detail: vm.state }));
  }
  async function refresh() {
    try { showState(await api("GET", base)); loadOperations(); } catch (e) {
      if (e.status === 404) { flash("This VM no longer exists."); }
    }
  }
  liveEvents((event) => { if (event.vm === vmId) { if (event.kind === "vm.deleted") location.href = "/"; else refresh(); } }, [vmId]);
  setInterval(refresh, 10000);
  refresh();

  /* --- actions --- */
  document.querySelectorAll(".toolbar button[data-action]").forEach((button) => {
    button.addEventListener("click", async () => {
      if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
      button.disabled = true;
      try {
        const action = button.dataset.action;
        if (action === "delete") await api("DELETE", base);
        else await api("POST", `${base}${action}/`, { force: button.dataset.force === "1" });
        flash(`${button.textContent.trim()} requested.`);
        refresh();
      } catch (e) { flash(e.message, "error"); } finally { button.disabled = false; }
    });
  });

  const resize = document.getElementById("resize-form");
  if (resize) {
    resize.addEventListener("submit", async (e) => {
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
      if (data.results.some((op) => op.status === "pending" || op.status === "running")) setTimeout(loadOperations, 1500);
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
