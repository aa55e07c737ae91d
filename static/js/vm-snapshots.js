/* Snapshots and network tabs of the VM page: take/restore/clone/delete snapshots, list, add
   and remove NICs (hot-plugged on a running VM where the driver can), add/remove port forwards
   with a copyable address. */
(function () {
  "use strict";
  const root = document.getElementById("vm");
  if (!root) return;
  const { api, flash } = window.sandbox;
  const vmId = root.dataset.vmId;
  const canSnapshot = root.dataset.canSnapshot === "1";
  const canChange = root.dataset.canChange === "1";

  function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
  function button(label, onClick, cls) {
    const b = document.createElement("button"); b.type = "button"; b.className = `small ${cls || ""}`; b.textContent = label;
    b.addEventListener("click", onClick); return b;
  }
  const mib = (bytes) => `${(bytes / 1048576).toFixed(1)} MiB`;

  async function loadSnapshots() {
    const body = document.querySelector("#snapshot-list tbody");
    try {
      const data = await api("GET", `/api/v1/vms/${vmId}/snapshots/`);
      const rows = data.results || data;
      const byId = Object.fromEntries(rows.map((s) => [s.id, s.name]));
      body.replaceChildren(...rows.map((snap) => {
        const tr = document.createElement("tr");
        tr.append(cell(snap.name), cell(snap.state), cell(new Date(snap.created_at).toLocaleString()),
          cell(snap.include_memory ? "yes" : "disk only"), cell(mib(snap.size_bytes || 0)),
          cell(snap.pause_ms != null ? `${snap.pause_ms} ms` : "–"), cell(snap.parent ? (byId[snap.parent] || "earlier") : "–"));
        const actions = document.createElement("td");
        actions.className = "actions";
        if (canSnapshot && snap.state === "ready") {
          actions.append(button("Restore", async () => {
            if (!confirm(`Restore ${snap.name}? The VM's current state is lost.`)) return;
            try { await api("POST", `/api/v1/snapshots/${snap.id}/restore/`, {}); flash("Restore requested."); } catch (e) { flash(e.message, "error"); }
          }));
          actions.append(button("Clone", async () => {
            const count = Number(prompt("How many clones?", "1"));
            if (!count) return;
            const prefix = prompt("Name prefix for the clones?", `${root.dataset.vmName}-clone`);
            if (!prefix) return;
            try { await api("POST", `/api/v1/snapshots/${snap.id}/clone/`, { count, name_prefix: prefix }); flash(`${count} clone(s) requested.`); } catch (e) { flash(e.message, "error"); }
          }));
          actions.append(button("Delete", async () => {
            if (!confirm(`Delete snapshot ${snap.name}?`)) return;
            try { await api("DELETE", `/api/v1/snapshots/${snap.id}/`); loadSnapshots(); } catch (e) { flash(e.message, "error"); }
          }, "danger"));
        }
        tr.append(actions);
        return tr;
      }));
      if (!rows.length) body.innerHTML = '<tr><td colspan="8" class="empty">No snapshots yet.</td></tr>';
      if (rows.some((s) => s.state !== "ready" && s.state !== "failed")) setTimeout(loadSnapshots, 2000);
    } catch (e) { body.innerHTML = '<tr><td colspan="8" class="empty">Could not load snapshots.</td></tr>'; }
  }

  const snapForm = document.getElementById("snapshot-form");
  if (snapForm) {
    snapForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        await api("POST", `/api/v1/vms/${vmId}/snapshots/`, {
          name: document.getElementById("snapshot-name").value,
          description: document.getElementById("snapshot-description").value,
          include_memory: document.getElementById("snapshot-memory").checked,
        });
        flash("Snapshot requested."); snapForm.reset(); loadSnapshots();
      } catch (err) {
        const details = err.details && typeof err.details === "object" ? " " + JSON.stringify(err.details) : "";
        flash(err.message + details, "error");
      }
    });
  }

  async function loadNetwork() {
    const nicBody = document.querySelector("#nic-list tbody");
    const pfBody = document.querySelector("#pf-list tbody");
    try {
      const nics = await api("GET", `/api/v1/vms/${vmId}/nics/`);
      const list = nics.results || nics;
      nicBody.replaceChildren(...list.map((n) => {
        const tr = document.createElement("tr");
        tr.append(cell(`eth${n.index}`), cell(n.network || ""), cell(n.ip ? `${n.ip}/${n.prefix}` : ""), cell(n.mac || ""));
        const act = document.createElement("td");
        if (canChange) act.append(button("Remove", async () => {
          if (!confirm(`Remove the interface on ${n.network} (${n.ip})?`)) return;
          try {
            const op = await api("DELETE", `/api/v1/vms/${vmId}/nics/${n.id}/`);
            flash(op && op.id ? "Hot-unplug requested." : "Interface removed."); loadNetwork();
          } catch (e) { flash(e.message, "error"); }
        }, "danger"));
        tr.append(act);
        return tr;
      }));
      if (!list.length) nicBody.innerHTML = "<tr><td>No network interface.</td></tr>";
    } catch (e) { nicBody.innerHTML = "<tr><td>Could not load.</td></tr>"; }
    try {
      const pfs = await api("GET", `/api/v1/vms/${vmId}/port-forwards/`);
      const list = pfs.results || pfs;
      pfBody.replaceChildren(...list.map((pf) => {
        const tr = document.createElement("tr");
        const addr = document.createElement("td");
        const code = document.createElement("code"); code.textContent = pf.address; addr.append(code, " ");
        addr.append(button("Copy", () => navigator.clipboard.writeText(pf.address).then(() => flash("Address copied.")).catch(() => flash(pf.address))));
        tr.append(cell(`${pf.protocol} ${pf.guest_port}`), addr);
        const act = document.createElement("td");
        if (canChange) act.append(button("Remove", async () => {
          if (!confirm(`Remove the forward to port ${pf.guest_port}?`)) return;
          try { await api("DELETE", `/api/v1/vms/${vmId}/port-forwards/${pf.id}/`); loadNetwork(); } catch (e) { flash(e.message, "error"); }
        }, "danger"));
        tr.append(act);
        return tr;
      }));
      if (!list.length) pfBody.innerHTML = "<tr><td>No port forwards.</td></tr>";
    } catch (e) { pfBody.innerHTML = "<tr><td>Could not load.</td></tr>"; }
  }
  const nicForm = document.getElementById("nic-form");
  if (nicForm) {
    nicForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = { network: document.getElementById("nic-network").value };
      const ip = document.getElementById("nic-ip").value.trim();
      if (ip) body.ip = ip;
      try {
        const nic = await api("POST", `/api/v1/vms/${vmId}/nics/`, body);
        flash(nic.operation ? "Hot-plug requested." : `Interface added (${nic.ip}).`);
        nicForm.reset(); loadNetwork();
      } catch (err) { flash(err.message, "error"); }
    });
  }
  async function loadNetworkChoices() {
    const select = document.getElementById("nic-network");
    if (!select || select.options.length) return;
    try {
      const data = await api("GET", "/api/v1/networks/?limit=100");
      select.replaceChildren(...(data.results || data).map((n) => {
        const o = document.createElement("option"); o.value = n.name; o.textContent = `${n.name} (${n.cidr})`; return o;
      }));
    } catch (e) { /* the form's submit says why */ }
  }
  const pfForm = document.getElementById("pf-form");
  if (pfForm) {
    pfForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        await api("POST", `/api/v1/vms/${vmId}/port-forwards/`, {
          guest_port: Number(document.getElementById("pf-guest").value), protocol: document.getElementById("pf-proto").value,
        });
        pfForm.reset(); loadNetwork();
      } catch (err) { flash(err.message, "error"); }
    });
  }

  document.addEventListener("tab-shown", (e) => {
    if (e.detail === "snapshots") loadSnapshots();
    if (e.detail === "network") { loadNetwork(); loadNetworkChoices(); }
  });
  if (location.hash === "#snapshots") loadSnapshots();
  if (location.hash === "#network") { loadNetwork(); loadNetworkChoices(); }
})();
