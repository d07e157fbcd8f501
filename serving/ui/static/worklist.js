// Worklist: filters -> /ui/api/worklist, refreshed every few seconds; keyboard to move and open.
(function () {
  "use strict";
  const form = document.getElementById("filters");
  const body = document.getElementById("rows");
  const live = document.getElementById("live");
  let rows = [], selected = 0, known = null;

  function query() {
    const params = new URLSearchParams(new FormData(form));
    for (const [k, v] of [...params]) if (!v) params.delete(k);
    return params.toString();
  }
  function pct(p) { return (100 * p).toFixed(1) + " %"; }
  function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }

  function draw(fresh) {
    body.textContent = "";
    rows.forEach((s, i) => {
      const tr = document.createElement("tr");
      tr.tabIndex = -1;
      tr.dataset.study = s.study_instance_uid;
      if (fresh.has(s.site + "/" + s.study_instance_uid)) tr.classList.add("new");
      cell(tr, String(i + 1));
      const p = cell(tr, "");
      const bar = document.createElement("span"); bar.className = "bar-p"; bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("i"); fill.style.width = (100 * s.probability).toFixed(0) + "%"; bar.appendChild(fill);
      p.appendChild(bar); p.appendChild(document.createTextNode(pct(s.probability)));
      cell(tr, s.ai_positive ? "above threshold" : "below threshold", s.ai_positive ? "pos" : "neg");
      const st = cell(tr, ""); const b = document.createElement("span"); b.className = "badge " + s.status; b.textContent = s.status; st.appendChild(b);
      cell(tr, s.accession || "—");
      const u = cell(tr, "", "uidcell"); u.title = s.study_instance_uid;
      const link = document.createElement("a");  // Tab reaches every study, not only J / K
      link.href = href(s); link.textContent = s.study_instance_uid; u.appendChild(link);
      cell(tr, String(s.images));
      cell(tr, s.scored_at.replace("T", " ").slice(0, 16));
      cell(tr, s.model_name + " " + s.model_version);
      cell(tr, s.site);
      tr.addEventListener("click", () => open(i));
      body.appendChild(tr);
    });
    mark();
  }
  function mark() {
    [...body.children].forEach((tr, i) => { tr.classList.toggle("sel", i === selected); tr.setAttribute("aria-selected", i === selected ? "true" : "false"); });
  }
  function href(s) {
    const q = query();
    return "/ui/studies/" + encodeURIComponent(s.site) + "/" + encodeURIComponent(s.study_instance_uid) + (q ? "?" + q : "");
  }
  function open(i) { const s = rows[i]; if (s) location.href = href(s); }
  async function load() {
    const q = query();
    const r = await fetch("/ui/api/worklist" + (q ? "?" + q : ""), { credentials: "same-origin" });
    if (r.status === 401) { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search); return; }
    if (!r.ok) { live.textContent = "Could not load the worklist (" + r.status + ")."; return; }
    const data = await r.json();
    const uids = new Set(data.studies.map(s => s.site + "/" + s.study_instance_uid));
    const fresh = known ? new Set([...uids].filter(u => !known.has(u))) : new Set();
    known = uids;
    rows = data.studies;
    selected = Math.min(selected, Math.max(0, rows.length - 1));
    draw(fresh);
    const t = new Date().toLocaleTimeString();
    live.textContent = data.count + " studies" + (fresh.size ? ", " + fresh.size + " new" : "") + " · updated " + t;
  }
  form.addEventListener("submit", e => { e.preventDefault(); history.replaceState(null, "", "?" + query()); selected = 0; known = null; load(); });
  document.addEventListener("keydown", e => {
    if (e.target.closest("input, select, textarea")) { if (e.key === "Escape") e.target.blur(); return; }
    if (e.key === "j" || e.key === "ArrowDown") { selected = Math.min(selected + 1, rows.length - 1); mark(); e.preventDefault(); }
    else if (e.key === "k" || e.key === "ArrowUp") { selected = Math.max(selected - 1, 0); mark(); e.preventDefault(); }
    else if (e.key === "Enter") { open(selected); }
    else if (e.key === "/") { form.q.focus(); e.preventDefault(); }
  });
  load();
  setInterval(load, 5000);
})();
