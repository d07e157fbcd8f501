// Study viewer: hanging protocol (R|L, CC over MLO), window / level, zoom / pan, heatmap overlay, calls.
(function () {
  "use strict";
  const root = document.querySelector(".study");
  const uid = root.dataset.study, site = root.dataset.site, query = root.dataset.query;
  const studyPath = encodeURIComponent(site) + "/" + encodeURIComponent(uid);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const panesEl = document.getElementById("panes");
  const heatOn = document.getElementById("heat-on"), opacity = document.getElementById("heat-opacity");
  const presetSel = document.getElementById("preset"), wl = document.getElementById("wl");
  const saved = document.getElementById("saved");
  const hasHeat = root.dataset.heatmap === "1";
  let panes = [], study = null, presetNames = [];

  const qs = query ? "?" + query : "";
  function api(path, opts) { return fetch(path, Object.assign({ credentials: "same-origin" }, opts || {})); }
  function pct(p) { return (100 * p).toFixed(1) + " %"; }

  function imageUrl(p) {
    const size = p.zoom > 1.5 ? 2048 : 1024;
    let url = "/ui/images/" + p.id + ".png?size=" + size;
    if (p.window) url += "&wc=" + p.window.center.toFixed(1) + "&ww=" + p.window.width.toFixed(1);
    return url;
  }
  function apply(p) {
    p.stage.style.transform = "translate(" + p.x + "px," + p.y + "px) scale(" + p.zoom + ")";
  }
  let timer = null;
  function rerender(p) {
    clearTimeout(timer);
    timer = setTimeout(() => { p.base.src = imageUrl(p); }, 120);
    wl.textContent = p.window ? "W " + p.window.width.toFixed(0) + " / L " + p.window.center.toFixed(0) : "";
  }
  function setHeat() {
    panes.forEach(p => { if (p.heat) { p.heat.hidden = !heatOn.checked; p.heat.style.opacity = opacity.value / 100; } });
  }
  function setPreset(name) {
    presetSel.value = name;
    panes.forEach(p => { if (p.info && p.info.presets) { p.window = name === "default" ? null : p.info.presets[name]; p.base.src = imageUrl(p); } });
    const first = panes.find(p => p.info && p.info.presets);
    wl.textContent = first && first.info.presets[name] ? "W " + first.info.presets[name].width.toFixed(0) + " / L " + first.info.presets[name].center.toFixed(0) : "";
  }
  function reset() { panes.forEach(p => { p.x = 0; p.y = 0; p.zoom = 1; apply(p); }); }

  function pane(img) {
    const el = document.createElement("div");
    el.className = "pane"; el.tabIndex = 0;
    const name = [img.laterality, img.view].filter(Boolean).join(" ") || "image";
    el.setAttribute("role", "img");
    el.setAttribute("aria-label", name + ", AI probability " + pct(img.probability));
    const label = document.createElement("span"); label.className = "label";
    label.textContent = name + " · " + pct(img.probability) + (img.probability >= img.threshold ? " ▲" : "");
    el.appendChild(label);
    const p = { id: img.image_id, el, info: img, x: 0, y: 0, zoom: 1, window: null };
    if (!img.stored || img.unreadable) {
      const m = document.createElement("div"); m.className = "missing";
      m.textContent = img.unreadable ? "This image cannot be shown: " + img.unreadable
                                     : "Image not stored on this service (scored through /v1/predict).";
      el.appendChild(m); return p;
    }
    const stage = document.createElement("div"); stage.className = "stage";
    const base = document.createElement("img"); base.alt = ""; base.className = "base";
    stage.appendChild(base);
    if (hasHeat) {
      const heat = document.createElement("img"); heat.alt = ""; heat.className = "heat";
      heat.src = "/ui/images/" + p.id + "/heatmap.png?size=1024";
      stage.appendChild(heat); p.heat = heat;
    }
    el.appendChild(stage);
    Object.assign(p, { stage, base });
    base.src = imageUrl(p);
    let drag = null;
    el.addEventListener("contextmenu", e => e.preventDefault());
    el.addEventListener("pointerdown", e => {
      el.setPointerCapture(e.pointerId);
      const windowing = e.shiftKey || e.button === 2;
      const start = p.window || (p.info.presets && p.info.presets.default) || null;
      drag = { x: e.clientX, y: e.clientY, ox: p.x, oy: p.y, windowing: windowing && !!start, start };
    });
    el.addEventListener("pointermove", e => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (drag.windowing) {
        const w = Math.max(1, drag.start.width * Math.exp(dx / 200));
        p.window = { center: drag.start.center + dy * drag.start.width / 400, width: w };
        rerender(p);
      } else { p.x = drag.ox + dx; p.y = drag.oy + dy; apply(p); }
    });
    el.addEventListener("pointerup", () => { drag = null; });
    el.addEventListener("wheel", e => {
      e.preventDefault();
      const r = el.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
      const z = Math.min(8, Math.max(1, p.zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15)));
      p.x = mx - (mx - p.x) * z / p.zoom; p.y = my - (my - p.y) * z / p.zoom;
      const sharper = (z > 1.5) !== (p.zoom > 1.5);
      p.zoom = z; if (z === 1) { p.x = 0; p.y = 0; }
      apply(p); if (sharper) p.base.src = imageUrl(p);
    }, { passive: false });
    return p;
  }

  function showReviews(list) {
    const ul = document.getElementById("reviews"); ul.textContent = "";
    if (!list.length) { const li = document.createElement("li"); li.textContent = "None yet."; ul.appendChild(li); }
    list.forEach(r => {
      const li = document.createElement("li");
      li.textContent = r.reader + ": " + r.call + (r.birads ? ", BI-RADS " + r.birads : "") + (r.comment ? " — " + r.comment : "") + " (" + r.called_at.replace("T", " ").slice(0, 16) + ")";
      ul.appendChild(li);
    });
  }
  function step(id, target) {
    const a = document.getElementById(id);
    if (target) {
      a.href = "/ui/studies/" + encodeURIComponent(target.site) + "/" + encodeURIComponent(target.study_instance_uid) + qs;
      a.removeAttribute("aria-disabled");
    }
    else { a.removeAttribute("href"); a.setAttribute("aria-disabled", "true"); }
  }

  async function load() {
    const r = await api("/ui/api/studies/" + studyPath + qs);
    if (r.status === 401) { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search); return; }
    if (!r.ok) { document.getElementById("prob").textContent = "not found"; return; }
    study = await r.json();
    document.getElementById("prob").textContent = pct(study.probability);
    document.getElementById("calib").textContent = study.calibration || "";
    const op = document.getElementById("op");
    op.textContent = (study.ai_positive ? "Above" : "Below") + " the threshold " + study.threshold.toFixed(3) +
      (study.operating_point ? " (" + study.operating_point + ")" : "") +
      (study.ai_positive ? ": flagged as suspicious." : ": not flagged.");
    op.className = study.ai_positive ? "pos" : "neg";
    document.getElementById("model").textContent = study.model_name + " · version " + study.model_version;
    document.getElementById("acc").textContent = study.accession || "—";
    document.getElementById("status").textContent = study.status;
    step("prev", study.previous); step("next", study.next);
    panesEl.textContent = "";
    panes = study.images_detail.map(pane);
    panes.forEach(p => panesEl.appendChild(p.el));
    const first = study.images_detail.find(i => i.presets);
    presetNames = first ? Object.keys(first.presets) : ["default"];
    presetSel.textContent = "";
    presetNames.forEach(n => { const o = document.createElement("option"); o.value = n; o.textContent = n; presetSel.appendChild(o); });
    setHeat();
    if (study.my_call) {
      document.getElementById("birads").value = study.my_call.birads || "";
      document.getElementById("comment").value = study.my_call.comment || "";
      press(study.my_call.call);
    }
    showReviews(study.reviews);
  }
  function press(call) {
    document.querySelectorAll("[data-call]").forEach(b => b.setAttribute("aria-pressed", b.dataset.call === call ? "true" : "false"));
  }
  async function record(call) {
    saved.textContent = "Saving…";
    const r = await api("/ui/api/studies/" + studyPath + "/call", {
      method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ call, birads: document.getElementById("birads").value, comment: document.getElementById("comment").value }),
    });
    if (!r.ok) { const e = await r.json().catch(() => ({})); saved.textContent = "Not saved: " + (e.detail || r.status); return; }
    press(call);
    const again = await api("/ui/api/studies/" + studyPath + qs);
    if (again.ok) { const s = await again.json(); showReviews(s.reviews); document.getElementById("status").textContent = s.status; }
    saved.textContent = "Saved: " + call + ".";  // last: the list above already shows the call
  }

  document.querySelectorAll("[data-call]").forEach(b => b.addEventListener("click", () => record(b.dataset.call)));
  heatOn.addEventListener("change", setHeat);
  opacity.addEventListener("input", setHeat);
  presetSel.addEventListener("change", () => setPreset(presetSel.value));
  document.getElementById("reset").addEventListener("click", reset);
  function go(id) { const a = document.getElementById(id); if (a.getAttribute("href")) location.href = a.href; }
  document.addEventListener("keydown", e => {
    if (e.target.closest("input:not([type=checkbox]):not([type=range]), select, textarea")) { if (e.key === "Escape") e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase();
    if (k === "h" && hasHeat) { heatOn.checked = !heatOn.checked; setHeat(); }
    else if (k === "a") record("agree");
    else if (k === "d") record("disagree");
    else if (k === "u") record("uncertain");
    else if (k === "n") go("next");
    else if (k === "p") go("prev");
    else if (k === "w") { const i = presetNames.indexOf(presetSel.value); setPreset(presetNames[(i + 1) % presetNames.length]); }
    else if (k === "r") reset();
    else if (k === "escape") location.href = document.getElementById("back").href;
    else return;
    e.preventDefault();
  });
  load();
})();
