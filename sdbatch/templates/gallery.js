(() => {
  const records = JSON.parse(document.getElementById("records").textContent);
  const dlg = document.getElementById("details");
  const state = {mode: "", q: ""};
  let current = -1;
  function apply() {
    for (const el of document.querySelectorAll("[data-text]")) {
      const okMode = !state.mode || !el.dataset.mode || el.dataset.mode === state.mode;
      const okText = !state.q || el.dataset.text.includes(state.q);
      el.hidden = !(okMode && okText);
    }
    for (const b of document.querySelectorAll("button[data-filter]"))
      b.setAttribute("aria-pressed", String(b.dataset.filter === state.mode));
    const cards = document.querySelectorAll(".card:not([hidden])").length;
    const fails = document.querySelectorAll("tr.failure:not([hidden])").length;
    document.getElementById("shown").textContent = `showing ${cards} image(s), ${fails} failure(s)`;
  }
  function show(i) {
    const r = records[i];
    if (!r) return;
    current = i;
    const f = r.fields;
    document.getElementById("dimg").src = r.src;
    document.getElementById("dlink").href = r.src;
    document.getElementById("dtitle").textContent = `${f.id} #${f.image_index} · ${f.mode}`;
    document.getElementById("dinfo").textContent = r.infotext;
    const table = document.getElementById("dfields");
    table.replaceChildren();
    for (const [k, v] of Object.entries(f)) {
      if (v === null || v === undefined || v === "") continue;
      const tr = table.insertRow();
      const th = document.createElement("th");
      th.textContent = k;
      tr.appendChild(th);
      tr.insertCell().textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    }
    if (!dlg.open) dlg.showModal();
  }
  function step(d) {
    const visible = [...document.querySelectorAll(".card:not([hidden])")].map(c => +c.dataset.i);
    const at = visible.indexOf(current);
    if (visible.length) show(visible[(at + d + visible.length) % visible.length]);
  }
  document.addEventListener("click", e => {
    const b = e.target.closest("button[data-filter]");
    if (b) { state.mode = b.dataset.filter; apply(); return; }
    const el = e.target.closest("[data-i]");
    if (el && !dlg.contains(el)) show(+el.dataset.i);
    else if (e.target === dlg) dlg.close();
  });
  document.addEventListener("keydown", e => {
    if (dlg.open && (e.key === "ArrowRight" || e.key === "ArrowLeft")) step(e.key === "ArrowRight" ? 1 : -1);
    else if (!dlg.open && e.key === "Enter" && e.target.dataset && e.target.dataset.i !== undefined) show(+e.target.dataset.i);
  });
  document.getElementById("q").addEventListener("input", e => { state.q = e.target.value.trim().toLowerCase(); apply(); });
  apply();
})();
