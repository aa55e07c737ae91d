/* VM list: live state over the events websocket, with a polling fallback, and row actions. */
(function () {
  "use strict";
  const { api, liveEvents, flash } = window.sandbox;
  const table = document.getElementById("vm-list");

  function setState(id, state) {
    const row = table.querySelector(`tr[data-vm="${id}"]`);
    if (!row) return false;
    const badge = row.querySelector("[data-state]");
    badge.textContent = state;
    badge.className = `state state-${state}`;
    return true;
  }

  async function refresh() {
    try {
      const data = await api("GET", "/api/v1/vms/?limit=200");
      const seen = new Set();
      data.results.forEach((vm) => { seen.add(vm.id); if (!setState(vm.id, vm.state)) location.reload(); });
      table.querySelectorAll("tr[data-vm]").forEach((row) => { if (!seen.has(row.dataset.vm)) row.remove(); });
    } catch (e) { /* offline: try again later */ }
  }

  table.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      await api("POST", `/api/v1/vms/${button.dataset.vmId}/${button.dataset.action}/`, {});
      flash(`${button.dataset.action} requested`);
      refresh();
    } catch (e) {
      flash(e.message, "error");
    } finally {
      button.disabled = false;
    }
  });

  liveEvents((event) => {
    if (event.kind === "vm.deleted") { const row = table.querySelector(`tr[data-vm="${event.vm}"]`); if (row) row.remove(); }
    else if (event.vm && event.state && !setState(event.vm, event.state)) refresh();
  });
  setInterval(refresh, 10000);
})();
