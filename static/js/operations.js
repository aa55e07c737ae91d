/* Live progress of unfinished operations (polls only while some are pending or running). */
(function () {
  "use strict";
  const { api } = window.sandbox;
  async function tick() {
    const rows = document.querySelectorAll('tr[data-op][data-status="pending"], tr[data-op][data-status="running"]');
    for (const row of rows) {
      try {
        const op = await api("GET", `/api/v1/operations/${row.dataset.op}/`);
        row.dataset.status = op.status;
        const label = row.querySelector("[data-status-label]");
        label.textContent = op.status;
        label.className = `state op-${op.status}`;
        row.querySelector("progress").value = op.progress;
        row.querySelector("[data-error]").textContent = op.error || "";
      } catch (e) { /* try again next tick */ }
    }
  }
  setInterval(tick, 2000);
})();
