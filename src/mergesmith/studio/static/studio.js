"use strict";
// mergesmith studio: the page. Talks to /api (same origin, JSON); progress by Server-Sent Events.
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const state = { models: [], methods: [], run: null, source: null, checkTimer: null, checkSeq: 0, errorLine: null };

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function fmtSeconds(s) {
  if (s == null) return "–";
  if (s < 60) return s.toFixed(0) + " s";
  return Math.floor(s / 60) + " min " + (s % 60).toFixed(0) + " s";
}
async function api(path, opts = {}) {
  const init = { headers: {}, credentials: "same-origin", ...opts };
  if (opts.json !== undefined) { init.method = init.method || "POST"; init.body = JSON.stringify(opts.json); init.headers["content-type"] = "application/json"; }
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { ok: false, error: "bad response (" + r.status + ")" }; }
  data._status = r.status;
  return data;
}

// ---------------------------------------------------------------- tabs
function showTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === "view-" + name));
  if (name === "recipe") editor.refresh();
  if (name === "runs") loadRuns();
}
document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));

// ---------------------------------------------------------------- editor
const editor = CodeMirror.fromTextArea($("#editor"), {
  mode: "yaml", lineNumbers: true, indentUnit: 2, tabSize: 2, indentWithTabs: false,
  gutters: ["CodeMirror-linenumbers", "errors"],
  extraKeys: { Tab: (cm) => cm.replaceSelection("  "), "Ctrl-Enter": () => runCheck(), "Cmd-Enter": () => runCheck() },
});
editor.on("change", () => {
  clearErrorMark();
  if (!$("#live").checked) return;
  clearTimeout(state.checkTimer);
  state.checkTimer = setTimeout(runCheck, 700);
});

function clearErrorMark() {
  if (state.errorLine != null) {
    editor.removeLineClass(state.errorLine, "background", "cm-error-line");
    editor.clearGutter("errors");
    state.errorLine = null;
  }
}
function markError(line) {
  clearErrorMark();
  if (!line || line < 1 || line > editor.lineCount()) return;
  state.errorLine = line - 1;
  editor.addLineClass(state.errorLine, "background", "cm-error-line");
  const m = document.createElement("span"); m.className = "error-gutter"; m.textContent = "●"; m.title = "error";
  editor.setGutterMarker(state.errorLine, "errors", m);
}

async function runCheck() {
  clearTimeout(state.checkTimer);
  const seq = ++state.checkSeq;
  $("#check-state").textContent = "checking…";
  const r = await api("/api/check", { json: { recipe: editor.getValue() } });
  if (seq !== state.checkSeq) return; // a newer check is on its way
  $("#check-state").textContent = "";
  renderCheck(r);
  return r;
}

function renderCheck(r) {
  const box = $("#check-result");
  if (!r.ok) {
    markError(r.line);
    const where = r.line ? `line ${r.line}` + (r.column ? `, column ${r.column}` : "") : "the recipe";
    box.innerHTML = `<div class="error-box" id="check-error"><div class="where" id="error-where">Error at ${esc(where)}${r.field ? ` — field <code id="error-field">${esc(r.field)}</code>` : ""}</div>
      <div id="error-message">${esc(r.error)}</div>${r.fix ? `<div><b>Fix:</b> ${esc(r.fix)}</div>` : ""}</div>`;
    return;
  }
  clearErrorMark();
  if (r.kind === "moe" || !r.plan) {
    box.innerHTML = `<div class="ok-box" id="check-ok">ok: the MoE config is valid</div><pre>${esc(r.summary)}</pre>`;
    return;
  }
  const p = r.plan;
  let html = `<div class="ok-box" id="check-ok">ok: the recipe is valid — <b>${esc(p.method)}</b></div>
    <div class="stats">
      <div class="stat"><b>${p.tensors}</b><span>output tensors</span></div>
      <div class="stat"><b>${p.copied}</b><span>buffers copied as is</span></div>
      <div class="stat"><b>${p.shards}</b><span>output file(s)</span></div>
      <div class="stat"><b>${fmtBytes(p.bytes_read)}</b><span>to read</span></div>
      <div class="stat"><b>${fmtBytes(p.bytes_written)}</b><span>to write</span></div>
      <div class="stat"><b>${fmtBytes(p.peak_memory)}</b><span>peak memory</span></div>
      <div class="stat"><b>${fmtSeconds(p.seconds)}</b><span>time (${p.threads} thread(s))</span></div>
    </div>`;
  for (const lm of p.layer_maps) {
    html += `<div class="layer-map" id="layer-map"><h3>Layer map${lm.module === "default" ? "" : " of " + esc(lm.module)} (output ← input)</h3>
      ${layerMapSvg(lm.layers)}<pre class="layer-map-lines">${esc(lm.lines.join("\n"))}</pre></div>`;
  }
  for (const w of p.warnings) html += `<div class="error-box">warning: ${esc(w)}</div>`;
  for (const n of p.notes) html += `<p class="muted">note: ${esc(n)}</p>`;
  html += `<details><summary>Full plan</summary><pre>${esc(r.summary)}</pre></details>`;
  box.innerHTML = html;
}

function layerMapSvg(layers) {
  const palette = ["#2f6fed", "#1b9e5a", "#e08a1e", "#b042c6", "#d64545", "#0f9bb0"];
  const models = [];
  layers.forEach((l) => l.inputs.forEach(([m]) => { if (!models.includes(m)) models.push(m); }));
  const w = 560, rowH = 16, left = 40, h = layers.length * rowH + 30 + models.length * 16;
  let s = `<svg viewBox="0 0 ${w} ${h}" xmlns="http://www.w3.org/2000/svg" font-size="11">`;
  layers.forEach((l, i) => {
    const y = 10 + i * rowH, span = (w - left - 10) / l.inputs.length;
    s += `<text x="${left - 6}" y="${y + 11}" text-anchor="end" fill="#6b7590">${l.output}</text>`;
    l.inputs.forEach(([m, j], k) => {
      const color = palette[models.indexOf(m) % palette.length];
      s += `<rect x="${left + k * span}" y="${y}" width="${span - 2}" height="${rowH - 3}" rx="3" fill="${color}" opacity="0.85"/>`;
      s += `<text x="${left + k * span + 6}" y="${y + 10}" fill="#fff">layer ${j}</text>`;
    });
  });
  models.forEach((m, k) => {
    const y = 20 + layers.length * rowH + k * 16;
    s += `<rect x="${left}" y="${y - 9}" width="10" height="10" fill="${palette[k % palette.length]}"/><text x="${left + 16}" y="${y}">${esc(m)}</text>`;
  });
  return s + "</svg>";
}

$("#check").addEventListener("click", runCheck);
$("#merge").addEventListener("click", async () => {
  $("#merge").disabled = true;
  try {
    const r = await api("/api/runs", { json: { recipe: editor.getValue() } });
    if (!r.ok) { renderCheck(r); return; }
    showTab("runs");
    openRun(r.run.id);
  } finally { $("#merge").disabled = false; }
});

async function loadTemplates() {
  const r = await api("/api/templates");
  const sel = $("#template");
  (r.templates || []).forEach((t) => { const o = document.createElement("option"); o.value = t.id; o.textContent = t.title; o.dataset.text = t.text; sel.appendChild(o); });
  sel.addEventListener("change", () => {
    const o = sel.selectedOptions[0];
    if (o && o.dataset.text) { editor.setValue(o.dataset.text); runCheck(); }
    sel.value = "";
  });
}

async function loadMethods() {
  const r = await api("/api/methods");
  state.methods = r.methods || [];
  const sel = $("#method-select");
  state.methods.forEach((m) => { const o = document.createElement("option"); o.value = m.name; o.textContent = m.name; sel.appendChild(o); });
  const show = () => {
    const m = state.methods.find((x) => x.name === sel.value);
    if (!m) return;
    $("#method-doc").innerHTML = `<p>${esc(m.summary)}</p><p class="muted">base model: ${esc(m.base)}</p>` +
      m.params.map((p) => `<div class="param"><code>${esc(p.describe)}</code> ${esc(p.doc)}</div>`).join("") +
      (m.reference ? `<p class="muted">${esc(m.reference)}</p>` : "") +
      `<button id="method-insert">Use in recipe</button>`;
    $("#method-insert").addEventListener("click", () => {
      const text = editor.getValue();
      if (/^merge_method:.*$/m.test(text)) editor.setValue(text.replace(/^merge_method:.*$/m, "merge_method: " + m.name));
      else editor.replaceRange("merge_method: " + m.name + "\n", { line: 0, ch: 0 });
    });
  };
  sel.addEventListener("change", show);
  sel.value = "task_arithmetic"; show();
}

// ---------------------------------------------------------------- models
async function loadModels() {
  const r = await api("/api/models");
  state.models = r.models || [];
  const tbody = $("#models-table tbody"); tbody.innerHTML = "";
  state.models.forEach((m) => {
    const tr = document.createElement("tr"); tr.className = "clickable";
    tr.innerHTML = `<td title="${esc(m.path)}">${esc(m.label)}</td><td>${esc(m.kind)}</td><td><button class="use">insert</button></td>`;
    tr.addEventListener("click", (e) => {
      if (e.target.classList.contains("use")) { editor.replaceSelection(m.path); showTab("recipe"); editor.focus(); return; }
      tbody.querySelectorAll("tr").forEach((x) => x.classList.remove("sel")); tr.classList.add("sel");
      showModel(m.path);
    });
    tbody.appendChild(tr);
  });
  const base = $("#inspect-base"); base.innerHTML = "";
  const checks = $("#inspect-models"); checks.innerHTML = "";
  state.models.forEach((m, i) => {
    const o = document.createElement("option"); o.value = m.path; o.textContent = m.label; base.appendChild(o);
    const l = document.createElement("label");
    l.innerHTML = `<input type="checkbox" value="${esc(m.path)}" ${i > 0 && i < 3 ? "checked" : ""}> ${esc(m.label)}`;
    checks.appendChild(l);
  });
}
async function showModel(ref) {
  const box = $("#model-summary");
  box.innerHTML = `<p class="muted">reading ${esc(ref)}…</p>`;
  const s = await api("/api/models/summary?ref=" + encodeURIComponent(ref));
  if (s.ok === false) { box.innerHTML = `<div class="error-box">${esc(s.error)}</div>`; return; }
  box.innerHTML = `<h3 id="model-title">${esc(s.ref)}</h3><table class="grid">
    <tr><th>architecture</th><td>${esc(s.architecture)}</td></tr>
    <tr><th>layers</th><td>${esc(s.layers)}</td></tr>
    <tr><th>hidden size / vocabulary</th><td>${esc(s.hidden_size)} / ${esc(s.vocab_size)}</td></tr>
    <tr><th>dtype</th><td>${esc(s.dtype)} (${esc(Object.entries(s.tensor_dtypes).map(([k, v]) => k + ": " + v).join(", "))})</td></tr>
    <tr><th>size</th><td>${fmtBytes(s.bytes)} in ${s.tensors} tensors, ${s.files} file(s), ${esc(s.format)}</td></tr>
    <tr><th>quantization</th><td>${esc(s.quantization || "none")}</td></tr>
    <tr><th>folder</th><td>${esc(s.folder)}</td></tr></table>`;
}
$("#refresh-models").addEventListener("click", loadModels);

// ---------------------------------------------------------------- runs
async function loadRuns() {
  const r = await api("/api/runs");
  const tbody = $("#runs-table tbody"); tbody.innerHTML = "";
  (r.runs || []).forEach((run) => {
    const tr = document.createElement("tr"); tr.className = "clickable" + (state.run === run.id ? " sel" : "");
    tr.innerHTML = `<td>${esc(run.id)}</td><td><span class="status ${esc(run.status)}">${esc(run.status)}</span></td><td>${esc(run.method || "")}</td>`;
    tr.addEventListener("click", () => openRun(run.id));
    tbody.appendChild(tr);
  });
}

function openRun(id) {
  state.run = id;
  if (state.source) state.source.close();
  $("#run-panel").innerHTML = `<p class="muted">connecting to run ${esc(id)}…</p>`;
  $("#eval-panel").classList.add("hidden");
  const src = new EventSource("/api/runs/" + encodeURIComponent(id) + "/events");
  state.source = src;
  src.addEventListener("progress", (e) => renderRun(JSON.parse(e.data)));
  src.addEventListener("end", () => { src.close(); loadRuns(); });
  src.onerror = () => { src.close(); api("/api/runs/" + encodeURIComponent(id)).then((d) => { if (d.id) renderRun(d); }); };
  loadRuns();
}

function renderRun(run) {
  if (run.id !== state.run) return;
  const pct = run.total_bytes ? Math.min(100, 100 * run.bytes / run.total_bytes) : (run.status === "done" ? 100 : 0);
  let html = `<h3>Run ${esc(run.id)} <span class="status ${esc(run.status)}" id="run-status">${esc(run.status)}</span></h3>
    <div class="progress"><div id="run-bar" style="width:${pct.toFixed(1)}%"></div></div>
    <div id="run-numbers">${fmtBytes(run.bytes)} of ${fmtBytes(run.total_bytes)} · ${run.tensors}/${run.total_tensors} tensors` +
    (run.eta != null ? ` · ETA ${fmtSeconds(run.eta)}` : "") + `</div><div class="toolbar" style="margin-top:8px">`;
  if (run.status === "running" || run.status === "queued") html += `<button id="run-cancel" class="danger">Cancel</button>`;
  if (run.status === "cancelled" || run.status === "failed") html += `<button id="run-resume" class="primary">Resume</button>`;
  html += `</div>`;
  if (run.error) html += `<div class="error-box" id="run-error">${esc(run.error)}</div>`;
  if (run.status === "done") {
    html += `<div class="ok-box" id="run-done">done: <code id="run-out">${esc(run.out)}</code></div>
      <details open><summary>Checksums</summary><pre id="run-checksums">${esc(run.checksums || "")}</pre></details>
      <details><summary>Model card</summary><pre id="run-card">${esc(run.model_card || "")}</pre></details>`;
    $("#eval-panel").classList.remove("hidden");
    const parents = $("#eval-parents");
    if (run.recipe && parents.dataset.run !== run.id) { // the recipe's models, by default
      parents.dataset.run = run.id;
      const found = [...run.recipe.matchAll(/(?:^|[\s{,-])(?:model|base_model):\s*([^\s,}\]#]+)/g)].map((m) => m[1]);
      parents.value = [...new Set(found)].join("\n");
      $("#eval-result").innerHTML = "";
    }
  }
  if (run.recipe) html += `<details><summary>Recipe</summary><pre>${esc(run.recipe)}</pre><button id="run-edit">Open in editor</button></details>`;
  $("#run-panel").innerHTML = html;
  const c = $("#run-cancel"); if (c) c.addEventListener("click", () => api(`/api/runs/${run.id}/cancel`, { method: "POST" }));
  const r = $("#run-resume"); if (r) r.addEventListener("click", async () => { await api(`/api/runs/${run.id}/resume`, { method: "POST" }); openRun(run.id); });
  const ed = $("#run-edit"); if (ed) ed.addEventListener("click", () => { editor.setValue(run.recipe); showTab("recipe"); });
}

$("#eval-run").addEventListener("click", async () => {
  $("#eval-state").textContent = "evaluating…";
  const parents = $("#eval-parents").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const r = await api(`/api/runs/${state.run}/eval`, { json: { text: $("#eval-text").value, parents } });
  $("#eval-state").textContent = "";
  if (!r.ok) { $("#eval-result").innerHTML = `<div class="error-box">${esc(r.error)}</div>`; return; }
  const rows = [r.report.model, ...r.report.parents];
  let html = `<table class="grid" id="eval-table"><tr><th>model</th><th>perplexity</th><th>KL(parent‖merge)</th><th>top-1 agreement</th></tr>`;
  rows.forEach((s) => { html += `<tr><td>${esc(s.name)}</td><td>${s.perplexity?.toFixed(3) ?? "–"}</td><td>${s.kl?.toFixed(4) ?? "–"}</td><td>${s.top1 != null ? (100 * s.top1).toFixed(1) + "%" : "–"}</td></tr>`; });
  html += `</table>` + barChart(rows.map((s) => [s.name, s.perplexity]), "perplexity");
  $("#eval-result").innerHTML = html;
});

function barChart(pairs, label) {
  pairs = pairs.filter(([, v]) => v != null);
  if (!pairs.length) return "";
  const max = Math.max(...pairs.map(([, v]) => v)), w = 520, bh = 22;
  let s = `<svg viewBox="0 0 ${w} ${pairs.length * bh + 24}" xmlns="http://www.w3.org/2000/svg" font-size="11"><text x="0" y="12" fill="#6b7590">${esc(label)}</text>`;
  pairs.forEach(([name, v], i) => {
    const y = 18 + i * bh, bw = (w - 200) * v / max;
    s += `<text x="0" y="${y + 14}">${esc(String(name).slice(-24))}</text><rect x="160" y="${y}" width="${bw}" height="${bh - 6}" fill="#2f6fed"/><text x="${164 + bw}" y="${y + 13}">${v.toFixed(3)}</text>`;
  });
  return `<div class="chart">${s}</svg></div>`;
}

// ---------------------------------------------------------------- inspect & trials
$("#inspect-run").addEventListener("click", async () => {
  const base = $("#inspect-base").value;
  const models = [...document.querySelectorAll("#inspect-models input:checked")].map((i) => i.value).filter((v) => v !== base);
  $("#inspect-state").textContent = "inspecting…";
  const r = await api("/api/inspect", { json: { base, models } });
  $("#inspect-state").textContent = "";
  if (!r.ok) { $("#inspect-result").innerHTML = `<div class="error-box">${esc(r.error)}</div>`; return; }
  let html = `<div class="panel" id="inspect-report"><h3>Recommendations</h3><ul>` + r.recommendations.map((x) => `<li>${esc(x)}</li>`).join("") + `</ul>
    <div class="heatmaps">` + r.pngs.map((p) => `<img alt="heatmap" src="/api/file?path=${encodeURIComponent(p)}">`).join("") + `</div>
    <details><summary>Summary</summary><pre>${esc(r.summary)}</pre></details></div>`;
  $("#inspect-result").innerHTML = html;
});

$("#trials-load").addEventListener("click", async () => {
  const r = await api("/api/trials?path=" + encodeURIComponent($("#trials-path").value));
  if (r.ok === false) { $("#trials-plot").innerHTML = `<div class="error-box">${esc(r.error)}</div>`; return; }
  const ok = r.trials.filter((t) => t.score != null && t.state !== "failed");
  $("#trials-state").textContent = `${r.trials.length} trial(s)`;
  if (!ok.length) { $("#trials-plot").innerHTML = ""; return; }
  const w = 480, h = 240, pad = 34;
  const xs = ok.map((t) => t.trial), ys = ok.map((t) => t.score);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs) || 1, Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (w - 2 * pad) * (x - x0) / ((x1 - x0) || 1), sy = (y) => h - pad - (h - 2 * pad) * (y - y0) / ((y1 - y0) || 1);
  let s = `<svg id="trials-svg" viewBox="0 0 ${w} ${h}" xmlns="http://www.w3.org/2000/svg" font-size="10"><line x1="${pad}" y1="${h - pad}" x2="${w - pad}" y2="${h - pad}" stroke="#999"/><line x1="${pad}" y1="${pad}" x2="${pad}" y2="${h - pad}" stroke="#999"/>`;
  s += `<text x="${w / 2}" y="${h - 6}" text-anchor="middle">trial</text><text x="4" y="${pad - 8}">score ${y0.toFixed(3)}…${y1.toFixed(3)}</text>`;
  ok.forEach((t) => { s += `<circle cx="${sx(t.trial)}" cy="${sy(t.score)}" r="4" fill="#2f6fed"><title>trial ${t.trial}: ${t.score}</title></circle>`; });
  $("#trials-plot").innerHTML = s + "</svg>";
});

// ---------------------------------------------------------------- start
(async () => {
  const info = await api("/api/info");
  $("#roots").textContent = info.roots ? "roots: " + info.roots.join(", ") : (info.error || "");
  await Promise.all([loadTemplates(), loadMethods(), loadModels()]);
  document.body.dataset.ready = "1";
})();
