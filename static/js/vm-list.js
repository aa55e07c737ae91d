/* VM list: live state over the events websocket (a slow poll as a fallback), row actions
   enabled only when the VM's state allows them (the server still refuses the rest), and
   uptimes that count. */
(function () {
  "use strict";
  const { api, liveEvents, flash, duration, stateActions } = window.sandbox;
  const table = document.getElementById("vm-list");
  const allowed = stateActions();

  function rowOf(id) { return table.querySelector(`tr[data-vm="${id}"]`); }

  function showRow(row, vm) {
    row.dataset.state = vm.state;
    const badge = row.querySelector("[data-state-label]");
    badge.textContent = vm.state;
    badge.className = `state state-${vm.state}`;
    const actions = vm.actions || allowed[vm.state] || [];
    row.querySelectorAll("button[data-action]").forEach((b) => {
      if (!b.dataset.busy) b.disabled = !actions.includes(b.dataset.action);
    });
    const uptime = row.querySelector("[data-uptime]");
    if (vm.state !== "running") uptime.dataset.uptime = "";
    else if (vm.started_at !== undefined) uptime.dataset.uptime = vm.started_at || "";
    tickRow(row);
  }

  function tickRow(row) {
    const cell = row.querySelector("[data-uptime]");
    const since = cell.dataset.uptime;
    cell.textContent = since ? duration((Date.now() - Date.parse(since)) / 1000) : "–";
  }

  async function refreshOne(id) {
    try { const row = rowOf(id); if (row) showRow(row, await api("GET", `/api/v1/vms/${id}/`)); }
    catch (e) { if (e.status === 404) { const row = rowOf(id); if (row) row.remove(); } }
  }

  async function refresh() {
    try {
      const data = await api("GET", "/api/v1/vms/?limit=200");
      const seen = new Set();
      let added = false;
      data.results.forEach((vm) => { seen.add(vm.id); const row = rowOf(vm.id); if (row) showRow(row, vm); else added = true; });
      table.querySelectorAll("tr[data-vm]").forEach((row) => { if (!seen.has(row.dataset.vm)) row.remove(); });
      if (added) location.reload();  // a new VM: its row is rendered by the server
    } catch (e) { /* offline: try again later */ }
  }

  table.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
    button.disabled = true;
    button.dataset.busy = "1";
    try {
      await api("POST", `/api/v1/vms/${button.dataset.vmId}/${button.dataset.action}/`, {});
      flash(`${button.textContent.trim()} requested.`);
    } catch (e) {
      flash(e.message, "error");
    } finally {
      delete button.dataset.busy;
      refreshOne(button.dataset.vmId);
    }
  });

  liveEvents((event) => {
    if (!event.vm) return;
    const row = rowOf(event.vm);
    if (event.kind === "vm.deleted") { if (row) row.remove(); return; }
    if (!event.state) return;  // operation progress: not shown in the list
    if (!row) { refresh(); return; }
    showRow(row, { state: event.state });
    if (event.state === "running") refreshOne(event.vm);  // its start time
  }, Array.from(table.querySelectorAll("tr[data-shared]")).map((r) => r.dataset.vm), refresh);  // own VMs come unasked
  setInterval(() => table.querySelectorAll("tr[data-vm]").forEach(tickRow), 1000);
  setInterval(refresh, 30000);
  table.querySelectorAll("tr[data-vm]").forEach(tickRow);
})();
