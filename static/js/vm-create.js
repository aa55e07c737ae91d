/* Create form: vCPUs, memory and disk follow the chosen template's defaults and limits. */
(function () {
  "use strict";
  const defaults = JSON.parse(document.getElementById("template-defaults").textContent);
  const select = document.getElementById("id_template");
  if (!select) return;
  const fields = { vcpus: "max_vcpus", memory_mib: "max_memory_mib", disk_gib: "max_disk_gib" };
  const units = { vcpus: "vCPUs", memory_mib: "MiB", disk_gib: "GiB" };

  function apply(fill) {
    const t = defaults[select.value];
    if (!t) return;
    Object.entries(fields).forEach(([name, max]) => {
      const input = document.getElementById(`id_${name}`);
      if (!input) return;
      if (fill) input.value = t[name];
      input.max = t[max];
      input.placeholder = String(t[name]);
      const limit = document.querySelector(`[data-limit-for="${name}"]`);
      if (limit) {
        limit.textContent = `${select.value}: ${t[name]} by default, at most ${t[max]} ${units[name]}.`;
        input.setAttribute("aria-describedby", limit.id);
      }
    });
  }
  select.addEventListener("change", () => apply(true));
  // A fresh form gets the defaults; a form sent back with errors keeps what the user typed.
  apply(!document.querySelector("#vm-create-form .field-error, #vm-create-form .error"));
})();
