// vlmtune studio page: plain DOM, every value shown through textContent (nothing from a data file is run as code).
"use strict";
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};
const state = { info: null, settings: {}, values: {}, run: null, sampleStart: 0, timer: null, busy: {} };

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}
async function guarded(errorId, fn) {
  $(errorId).textContent = "";
  try { return await fn(); } catch (e) { $(errorId).textContent = e.message; return null; }
}

// ---- tabs
function show(page) {
  for (const b of document.querySelectorAll("nav .tab")) b.classList.toggle("active", b.dataset.page === page);
  for (const s of document.querySelectorAll("section.page")) s.classList.toggle("hidden", s.id !== "page-" + page);
  if (page === "train") refreshRuns();
  if (page === "try" || page === "export") fillAdapters();
}

// ---- file picker (folders the studio opened only)
let pickTarget = null, pickFolders = false;
async function openPicker(target, folders, folder) {
  pickTarget = target; pickFolders = folders;
  const data = await api("/api/files?folder=" + encodeURIComponent(folder || "."));
  $("picker-folder").textContent = data.folder;
  const list = $("picker-list"); list.replaceChildren();
  if (data.parent !== null) list.append(el("li", { text: "../" }));
  list.lastChild && (list.lastChild.onclick = () => openPicker(target, folders, data.parent));
  for (const d of data.dirs) { const li = el("li", { text: d + "/" }); li.onclick = () => openPicker(target, folders, join(data.folder, d)); list.append(li); }
  if (!folders) for (const f of data.files) { const li = el("li", { text: f }); li.onclick = () => { $(target).value = join(data.folder, f); $("picker").close(); $(target).dispatchEvent(new Event("change")); }; list.append(li); }
  $("picker-use-folder").onclick = () => { $(target).value = data.folder; $("picker").close(); };
  if (!$("picker").open) $("picker").showModal();
}
const join = (a, b) => (a === "." ? b : a + "/" + b);

// ---- 1 Data
async function checkData() {
  await guarded("data-error", async () => {
    $("data-report").textContent = "checking...";
    const r = await api("/api/data/check", { file: $("data-file").value, model: $("data-model").value });
    $("data-command").textContent = r.command;
    const s = r.summary;
    const head = el("div", { id: "data-verdict", class: r.ok ? "ok" : "failed",
      text: `${r.ok ? "OK" : "FAILED"}: ${s.records} record(s), ${s.records_ok} ok, ${s.records_bad} bad; ${s.errors} error(s), ${s.warnings} warning(s)` });
    const table = el("table", { id: "data-problems" }, el("tr", {}, el("th", { text: "line" }), el("th", { text: "severity" }), el("th", { text: "where" }), el("th", { text: "problem" })));
    for (const p of [...r.errors, ...r.warnings]) {
      table.append(el("tr", { class: "problem " + (p.severity === "error" ? "error-row" : "warning-row"), "data-line": String(p.line) },
        el("td", { text: String(p.line) }), el("td", { text: p.severity }), el("td", { text: p.field || "" }), el("td", { text: p.message })));
    }
    const extra = [];
    if (s.tokens) extra.push(el("div", { text: `tokens per record: p50 ${s.tokens.p50}, p90 ${s.tokens.p90}, max ${s.tokens.max} (max_length ${s.max_length}: ${s.over_max_length} over)` }));
    if (r.note) extra.push(el("div", { class: "muted", text: r.note }));
    const hists = el("div", { class: "row" });
    if (s.token_histogram) hists.append(bars("records per token length", s.token_histogram.map((b) => [b.from === b.to ? `${b.from}` : `${b.from}-${b.to}`, b.records])));
    if (s.image_sides && Object.keys(s.image_sides).length) hists.append(bars("images by longest side (px)", Object.entries(s.image_sides)));
    extra.push(hists);
    $("data-report").replaceChildren(head, ...extra, table);
  });
}
function bars(label, rows) {
  const W = 360, H = 130, NS = "http://www.w3.org/2000/svg", top = Math.max(1, ...rows.map((r) => r[1]));
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "curve histogram"); svg.dataset.label = label;
  const text = (x, y, t, size = 9) => { const e = document.createElementNS(NS, "text"); e.setAttribute("x", x); e.setAttribute("y", y); e.setAttribute("font-size", size); e.textContent = t; return e; };
  svg.append(text(4, 12, label, 11));
  const w = (W - 10) / rows.length;
  rows.forEach(([name, n], i) => {
    const h = (n / top) * (H - 50), r = document.createElementNS(NS, "rect");
    r.setAttribute("x", 5 + i * w + 1); r.setAttribute("y", H - 22 - h); r.setAttribute("width", Math.max(1, w - 2)); r.setAttribute("height", h); r.setAttribute("fill", "#1f77b4");
    svg.append(r, text(5 + i * w + 1, H - 25 - h, String(n)), text(5 + i * w + 1, H - 8, name, 8));
  });
  return svg;
}
async function showSamples(delta = 0) {
  state.sampleStart = Math.max(0, state.sampleStart + delta);
  await guarded("data-error", async () => {
    const r = await api("/api/data/samples", { file: $("data-file").value, model: $("data-model").value, start: state.sampleStart, count: 3 });
    const box = $("data-samples"); box.replaceChildren(el("div", { class: "legend" },
      el("span", { class: "tok trained", text: "trained (labelled)" }), el("span", { class: "tok masked", text: "masked (-100)" }),
      el("span", { class: "tok image", text: "image tokens" }), el("span", { class: "muted", text: `${r.family}, ${r.model}` })));
    if (!r.samples.length) box.append(el("div", { text: "no more readable records" }));
    for (const s of r.samples) {
      const card = el("div", { class: "sample", "data-line": String(s.line) }, el("b", { text: `line ${s.line}` }));
      if (s.length) card.append(el("span", { class: "muted", text: ` ${s.length} tokens, ${s.trained_tokens} trained` }));
      const imgs = el("div");
      for (const im of s.images) imgs.append(el("img", { src: "data:image/png;base64," + im.png, title: `${im.size[0]}x${im.size[1]}` }));
      card.append(imgs);
      if (s.dropped) card.append(el("div", { class: "error", text: "not trained: " + s.dropped }));
      const text = el("pre", { class: "template" });
      for (const seg of s.segments) text.append(el("span", { class: "seg" + (seg.labelled ? " labelled" : ""), text: seg.text }));
      card.append(el("div", { class: "muted", text: "chat template (labelled spans highlighted)" }), text);
      const toks = el("div", { class: "tokens" });
      for (const t of s.tokens) {
        if (t.image) toks.append(el("span", { class: "tok image" + (t.trained ? " trained" : " masked"), text: `[image x${t.count}]` }));
        else toks.append(el("span", { class: "tok " + (t.trained ? "trained" : "masked"), text: t.text }));
      }
      card.append(el("div", { class: "muted", text: "tokens as the model sees them" }), toks);
      box.append(card);
    }
  });
}

// ---- 2 Configure
function form() { return { preset: $("cfg-preset").value, gpu: $("cfg-gpu").value, settings: state.settings }; }
function buildFields(fields) {
  const box = $("cfg-fields"); box.replaceChildren();
  const open = new Set(["run", "model", "method", "method.lora", "data", "training", "hardware"]);
  const sections = {};
  for (const f of fields) {
    if (!sections[f.section]) {
      sections[f.section] = el("details", { "data-section": f.section }, el("summary", { text: f.section }));
      if (open.has(f.section)) sections[f.section].open = true;
      box.append(sections[f.section]);
    }
    let input;
    if (f.choices) {
      input = el("select");
      for (const c of f.choices) input.append(el("option", { value: String(c), text: String(c) }));
    } else input = el("input", { size: "28" });
    input.dataset.path = f.path;
    input.title = f.type;
    input.addEventListener("change", () => { state.settings[f.path] = input.value; markChanged(); refreshConfig(); });
    sections[f.section].append(el("div", { class: "field" }, el("label", { text: f.path }), input, el("div", { class: "doc", text: `${f.type}. ${f.doc}` })));
  }
}
function markChanged() {
  for (const input of document.querySelectorAll("#cfg-fields [data-path]"))
    input.parentElement.classList.toggle("changed", input.dataset.path in state.settings);
}
let configSeq = 0;
async function refreshConfig() {
  const seq = ++configSeq;
  await guarded("cfg-error", async () => {
    const r = await api("/api/config/resolve", { form: form() });
    if (seq !== configSeq) return;
    $("cfg-command").textContent = r.command;
    if (r.problems.length) { $("cfg-error").textContent = r.problems.join("\n"); return; }
    state.values = r.values;
    for (const input of document.querySelectorAll("#cfg-fields [data-path]")) {
      const v = r.values[input.dataset.path];
      if (v !== undefined && document.activeElement !== input) {
        if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === v)) input.append(el("option", { value: v, text: v }));
        input.value = v;
      }
    }
    $("cfg-yaml").textContent = r.yaml;
    const e = await api("/api/config/estimate", { form: form() });
    if (seq !== configSeq) return;
    $("cfg-estimate-summary").textContent = e.summary + (e.fits ? ` (${e.fits})` : "");
    $("cfg-estimate-summary").dataset.peak = String(e.peak_gib);
    $("cfg-estimate-img").src = "data:image/png;base64," + e.png;
    $("cfg-estimate-command").textContent = e.command;
  });
}
async function recommend() {
  await guarded("cfg-error", async () => {
    $("cfg-estimate-summary").textContent = "searching...";
    const r = await api("/api/config/recommend", { form: form() });
    state.settings = r.settings; markChanged();
    $("cfg-estimate-command").textContent = r.command + "\n" + r.summary;
    await refreshConfig();
  });
}
async function saveConfig() {
  await guarded("cfg-error", async () => {
    const r = await api("/api/config/save", { form: form(), path: $("cfg-save-path").value, overwrite: $("cfg-save-overwrite").checked });
    $("cfg-saved").textContent = "saved " + r.saved;
  });
}
async function startTraining() {
  await guarded("cfg-error", async () => {
    const r = await api("/api/train/start", { form: form() });
    state.run = r.folder; show("train");
  });
}

// ---- 3 Train
async function refreshRuns() {
  await guarded("train-error", async () => {
    const r = await api("/api/runs");
    const body = document.querySelector("#runs tbody"); body.replaceChildren();
    for (const run of r.runs) {
      const tr = el("tr", { "data-folder": run.folder, class: run.folder === state.run ? "selected" : "" },
        el("td", { text: run.folder }), el("td", { class: "status", text: run.status }),
        el("td", { text: run.last_step === null ? "-" : String(run.last_step) }), el("td", { text: run.checkpoints.join(", ") }));
      tr.onclick = () => { state.run = run.folder; refreshRuns(); };
      body.append(tr);
    }
    if (state.run) await refreshRun();
  });
  clearTimeout(state.timer);
  if (!$("page-train").classList.contains("hidden")) state.timer = setTimeout(refreshRuns, 1500);
}
async function refreshRun() {
  const r = await api("/api/run?folder=" + encodeURIComponent(state.run));
  $("run-detail").classList.remove("hidden");
  $("run-title").textContent = r.folder;
  $("run-status").textContent = `status: ${r.status}; last step ${r.last_step ?? "-"}`;
  $("run-status").dataset.status = r.status;
  $("run-command").textContent = r.command || "(started outside this studio)";
  $("run-stop").disabled = !(r.started_here && (r.status === "running" || r.status === "stopping"));
  $("run-resume").disabled = !(r.has_config && !r.status.startsWith("running") && r.status !== "stopping" && r.checkpoints.length);
  if (r.loss_png) $("run-loss-img").src = "data:image/png;base64," + r.loss_png;
  $("run-loss-img").dataset.points = String((r.curves.loss || []).length);
  const curves = $("run-curves"); curves.replaceChildren();
  for (const [key, label] of [["learning_rate", "learning rate"], ["tokens_per_second", "tokens/s"], ["mem_reserved_gib", "GPU memory reserved (GiB)"], ["mem_peak_gib", "GPU peak allocated (GiB)"], ["mem_rss_gib", "process memory (GiB, CPU run)"]]) {
    if (r.curves[key]) curves.append(chart(label, r.curves[key]));
  }
  $("run-console").textContent = r.console || "";
  $("run-config").textContent = r.config || "";
}
function chart(label, points) {
  const W = 320, H = 120, P = 28, NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "curve"); svg.dataset.label = label;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => P + (x1 === x0 ? 0 : (x - x0) / (x1 - x0)) * (W - P - 8);
  const sy = (y) => H - P + (y1 === y0 ? -0.5 : -(y - y0) / (y1 - y0)) * (H - P - 14);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#1f77b4"); line.setAttribute("stroke-width", "2");
  const text = (x, y, t) => { const e = document.createElementNS(NS, "text"); e.setAttribute("x", x); e.setAttribute("y", y); e.setAttribute("font-size", "10"); e.textContent = t; return e; };
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 0.01 ? v.toPrecision(3) : v.toExponential(1));
  svg.append(line, text(4, 11, `${label}: ${fmt(ys[ys.length - 1])}`), text(2, H - P, fmt(y0)), text(2, 24, fmt(y1)), text(P, H - 6, `step ${x0}`), text(W - 60, H - 6, `step ${x1}`));
  return svg;
}
async function stopRun() { await guarded("train-error", async () => { await api("/api/train/stop", { folder: state.run }); await refreshRun(); }); }
async function resumeRun() { await guarded("train-error", async () => { await api("/api/train/resume", { folder: state.run }); await refreshRun(); }); }

// ---- 4 Try it / 5 Export
async function fillAdapters() {
  const r = await api("/api/runs").catch(() => ({ runs: [] }));
  const done = r.runs.filter((x) => x.adapter);
  const pick = done.find((x) => x.folder === state.run) || done[done.length - 1];
  if (pick) { if (!$("try-adapter").value) $("try-adapter").value = pick.adapter; if (!$("exp-adapter").value) $("exp-adapter").value = pick.adapter; }
}
function readFile(file) {
  return new Promise((resolve, reject) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.onerror = reject; r.readAsDataURL(file); });
}
async function ask() {
  await guarded("try-error", async () => {
    const file = $("try-image").files[0];
    $("try-answer-tuned").textContent = "thinking..."; $("try-answer-base").textContent = "";
    const r = await api("/api/try/ask", { adapter: $("try-adapter").value, model: $("try-model").value, prompt: $("try-prompt").value,
      uploads: file ? [{ data: await readFile(file) }] : [], compare: $("try-compare").checked });
    $("try-answer-tuned").textContent = r.answer || "(empty answer)";
    $("try-answer-base").textContent = r.base_answer === undefined ? "(no comparison: a model without an adapter)" : r.base_answer || "(empty answer)";
    $("try-command").textContent = r.command + (r.base_command ? "\n" + r.base_command : "");
  });
}
async function predict() {
  await guarded("try-error", async () => {
    $("try-accuracy").textContent = "predicting...";
    const r = await api("/api/try/predict", { adapter: $("try-adapter").value, model: $("try-model").value, data: $("try-data").value, out: $("try-out").value, overwrite: $("try-overwrite").checked });
    $("try-accuracy").textContent = `exact-match accuracy ${(r.accuracy * 100).toFixed(1)}% (${r.correct}/${r.total}); predictions in ${r.predictions}`;
    $("try-command").textContent = r.command;
    const t = $("try-wrong"); t.replaceChildren(el("tr", {}, el("th", { text: "line" }), el("th", { text: "answer" }), el("th", { text: "reference" })));
    for (const w of r.wrong) t.append(el("tr", {}, el("td", { text: String(w.line) }), el("td", { text: w.prediction }), el("td", { text: w.reference })));
  });
}
async function exportModel() {
  await guarded("exp-error", async () => {
    $("exp-result").textContent = "merging...";
    const r = await api("/api/export", { adapter: $("exp-adapter").value, out: $("exp-out").value, base: $("exp-base").value, overwrite: $("exp-overwrite").checked });
    $("exp-command").textContent = r.command;
    $("exp-result").textContent = `merged model written to ${r.out}: ${r.files.join(", ")}`;
  });
  if ($("exp-error").textContent) $("exp-result").textContent = "";
}

// ---- start
async function start() {
  for (const b of document.querySelectorAll("nav .tab")) b.onclick = () => show(b.dataset.page);
  for (const b of document.querySelectorAll("button.pick")) b.onclick = () => openPicker(b.dataset.target, !!b.dataset.folders, ".").catch((e) => alert(e.message));
  $("picker-close").onclick = () => $("picker").close();
  $("data-check-btn").onclick = checkData;
  $("data-samples-btn").onclick = () => { state.sampleStart = 0; showSamples(0); };
  $("data-prev").onclick = () => showSamples(-3);
  $("data-next").onclick = () => showSamples(3);
  $("cfg-preset").onchange = refreshConfig;
  $("cfg-gpu").onchange = refreshConfig;
  $("cfg-recommend").onclick = recommend;
  $("cfg-save-btn").onclick = saveConfig;
  $("cfg-train-btn").onclick = startTraining;
  $("run-stop").onclick = stopRun;
  $("run-resume").onclick = resumeRun;
  $("try-ask").onclick = ask;
  $("try-predict").onclick = predict;
  $("exp-btn").onclick = exportModel;
  const info = await api("/api/info");
  state.info = info;
  $("roots").textContent = "folders: " + info.roots.join(", ") + " | vlmtune " + info.version;
  for (const p of info.presets) $("cfg-preset").append(el("option", { value: p.name, text: p.name, title: p.header }));
  for (const g of info.gpus) $("cfg-gpu").append(el("option", { value: g, text: g }));
  $("cfg-gpu").value = info.gpus.find((g) => g.startsWith("RTX 4090")) || info.gpus[0];
  buildFields(info.fields);
  document.body.dataset.ready = "1";
  refreshConfig();
}
start();
