/* Files tab: browse a directory of the guest, upload (pick or drag and drop; progress bar;
   cancel aborts the request, and an upload that does not arrive whole leaves nothing in the
   guest), download, new folder, delete. Everything goes through the streamed files API
   (docs/exec-and-files.md): same rights (exec) and limits as any API client. */
(function () {
  "use strict";
  const root = document.getElementById("vm");
  const panel = document.getElementById("panel-files");
  if (!root || !panel) return;
  const { api, flash } = window.sandbox;
  const vmId = root.dataset.vmId;
  const base = `/api/v1/vms/${vmId}/files/`;
  const csrf = document.body.dataset.csrf;
  const maxBytes = Number(root.dataset.uploadMax) || 0;
  const pathInput = document.getElementById("files-path");
  const body = document.querySelector("#files-list tbody");
  const statusEl = document.getElementById("files-status");
  const uploads = document.getElementById("files-uploads");
  const picker = document.getElementById("files-input");
  const drop = document.getElementById("files-drop");
  let cwd = pathInput.value || "/";
  let names = new Set();
  let loaded = false;

  const join = (dir, name) => (dir.endsWith("/") ? dir : dir + "/") + name;
  const parent = (dir) => { const p = dir.replace(/\/+$/, "").split("/").slice(0, -1).join("/"); return p || "/"; };
  const q = (path) => `?path=${encodeURIComponent(path)}`;
  function size(n) {
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n, i = -1;
    do { v /= 1024; i++; } while (v >= 1024 && i < units.length - 1);
    return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
  }
  function cell(content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.append(content); else td.textContent = content;
    return td;
  }
  function button(label, onClick, cls, aria) {
    const b = document.createElement("button");
    b.type = "button"; b.className = `small ${cls || ""}`; b.textContent = label;
    if (aria) b.setAttribute("aria-label", aria);
    b.addEventListener("click", onClick);
    return b;
  }

  async function open(dir) {
    statusEl.textContent = "Loading…";
    try {
      const data = await api("GET", `${base}list/${q(dir)}`);
      cwd = data.path || dir;
      pathInput.value = cwd;
      loaded = true;
      const entries = (data.entries || []).slice().sort((a, b) =>
        ((b.type === "directory") - (a.type === "directory")) || a.name.localeCompare(b.name));
      names = new Set(entries.map((e) => e.name));
      body.replaceChildren(...entries.map(row));
      if (!entries.length) body.innerHTML = '<tr><td colspan="6" class="empty">This directory is empty.</td></tr>';
      statusEl.textContent = `${cwd}: ${entries.length} entr${entries.length === 1 ? "y" : "ies"}${data.truncated ? " (list truncated)" : ""}.`;
    } catch (e) {
      statusEl.textContent = "";
      flash(e.status === 409 ? `${e.message} Files are reachable while the VM runs.` : e.message, "error");
    }
  }

  function row(entry) {
    const tr = document.createElement("tr");
    const path = join(cwd, entry.name);
    tr.dataset.name = entry.name;
    let name;
    if (entry.type === "directory") {
      name = button(`${entry.name}/`, () => open(path), "link-like");
      name.title = `Open the folder ${entry.name}`;
    } else {
      name = document.createElement("span");
      name.textContent = entry.type === "symlink" ? `${entry.name} → ${entry.target || "?"}` : entry.name;
    }
    const mtime = entry.mtime ? new Date((typeof entry.mtime === "number" ? entry.mtime * 1000 : Date.parse(entry.mtime))).toLocaleString() : "";
    const actions = document.createElement("td");
    actions.className = "actions";
    if (entry.type === "file") {
      const a = document.createElement("a");
      a.className = "button small"; a.href = base + q(path); a.download = entry.name; a.textContent = "Download";
      a.setAttribute("aria-label", `Download ${entry.name}`);
      actions.append(a, " ");
    }
    actions.append(button("Delete", () => remove(entry, path), "danger", `Delete ${entry.name}`));
    tr.append(cell(name), cell(entry.type === "directory" ? "–" : size(entry.size || 0)),
      cell(typeof entry.mode === "number" ? "0" + (entry.mode & 0o7777).toString(8) : String(entry.mode || "")),
      cell(`${entry.user || entry.uid}:${entry.group || entry.gid}`), cell(mtime), actions);
    return tr;
  }

  async function remove(entry, path) {
    const dir = entry.type === "directory";
    if (!confirm(dir ? `Delete the folder ${path} and everything in it?` : `Delete ${path}?`)) return;
    try {
      await api("DELETE", base + q(path) + (dir ? "&recursive=1" : ""));
      flash(`Deleted ${path}.`);
      open(cwd);
    } catch (e) { flash(e.message, "error"); }
  }

  async function mkdir() {
    const name = prompt(`New folder in ${cwd}:`);
    if (!name) return;
    if (name.includes("/")) { flash("A folder name cannot contain /.", "error"); return; }
    try { await api("POST", `${base}mkdir/`, { path: join(cwd, name) }); open(cwd); } catch (e) { flash(e.message, "error"); }
  }

  /* One upload: a raw PUT of the file's bytes (the API streams them into the guest and checks
     them by sha256). XHR, not fetch: it reports upload progress and can be aborted. */
  function upload(file) {
    const target = join(cwd, file.name);
    const li = document.createElement("li");
    li.className = "upload";
    const label = document.createElement("span");
    label.className = "upload-name";
    label.textContent = `${file.name} (${size(file.size)})`;
    const bar = document.createElement("progress");
    bar.max = 100; bar.value = 0;
    bar.setAttribute("aria-label", `Upload of ${file.name}`);
    const state = document.createElement("span");
    state.className = "hint upload-state";
    li.append(label, bar, state);
    uploads.prepend(li);
    if (maxBytes && file.size > maxBytes) {
      state.textContent = `too large: at most ${size(maxBytes)}`;
      li.classList.add("failed");
      return;
    }
    if (names.has(file.name) && !confirm(`${target} exists. Replace it?`)) { state.textContent = "skipped"; return; }
    const xhr = new XMLHttpRequest();
    const cancel = button("Cancel", () => xhr.abort(), "", `Cancel the upload of ${file.name}`);
    li.append(cancel);
    xhr.open("PUT", base + q(target) + "&overwrite=true");
    xhr.setRequestHeader("X-CSRFToken", csrf);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      bar.value = Math.floor((e.loaded / e.total) * 100);
      state.textContent = e.loaded < e.total ? `${size(e.loaded)} sent` : "writing in the guest…";
    };
    const done = (text, ok) => { cancel.remove(); state.textContent = text; li.classList.add(ok ? "done" : "failed"); if (ok) bar.value = 100; };
    xhr.onload = () => {
      if (xhr.status === 201) { done("uploaded", true); open(cwd); return; }
      let message = xhr.statusText;
      try { message = JSON.parse(xhr.responseText).error.message || message; } catch (e) { /* not JSON */ }
      done(`failed: ${message}`, false);
    };
    xhr.onerror = () => done("failed: connection lost", false);
    xhr.onabort = () => done("cancelled (nothing was written)", false);
    xhr.send(file);
  }
  function uploadAll(files) { Array.from(files).forEach(upload); }

  document.getElementById("files-path-form").addEventListener("submit", (e) => { e.preventDefault(); open(pathInput.value.trim() || "/"); });
  document.getElementById("files-up").addEventListener("click", () => open(parent(cwd)));
  document.getElementById("files-refresh").addEventListener("click", () => open(cwd));
  document.getElementById("files-mkdir").addEventListener("click", mkdir);
  document.getElementById("files-pick").addEventListener("click", () => picker.click());
  picker.addEventListener("change", () => { uploadAll(picker.files); picker.value = ""; });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); picker.click(); } });
  drop.addEventListener("click", () => picker.click());
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer && e.dataTransfer.files.length) uploadAll(e.dataTransfer.files); });

  document.addEventListener("tab-shown", (e) => { if (e.detail === "files" && !loaded) open(cwd); });
  if (location.hash === "#files") open(cwd);
  window.sandboxFiles = { open, upload, get cwd() { return cwd; } };
})();
