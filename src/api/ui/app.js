// The inspection page. Every value from the stream (image ids, classes, attributes) goes into
// the page through textContent or an attribute set by the DOM API, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, children = []) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.appendChild(c);
  return e;
};
const fmt = (x, digits = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));

let thresholds = {};
let selected = null;

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function card(item) {
  const r = item.record;
  const c = el("div", { class: "card" + (r.is_anomaly ? " anomaly" : ""), "data-id": String(item.id) });
  c.appendChild(item.has_thumbnail ? el("img", { src: "/api/recent/" + item.id + "/thumbnail", alt: "" }) : el("div", { class: "noimg" }));
  c.appendChild(el("div", { class: "id", text: r.image_id, title: r.image_id }));
  c.appendChild(el("div", { class: "muted", text: (r.class || "no class") + " · score " + fmt(r.score) }));
  c.appendChild(el("div", { class: "muted", text: "raw " + fmt(r.raw_score) + " / threshold " + fmt(r.threshold) + " (" + r.threshold_source + ")" }));
  c.appendChild(el("div", { class: "verdict", text: r.is_anomaly ? "ANOMALY" : "ok" }));
  c.addEventListener("click", () => showDetail(item));
  return c;
}

function showDetail(item) {
  selected = item.id;
  const d = $("detail");
  d.replaceChildren(el("h2", { text: "Selected image" }));
  if (item.has_thumbnail) d.appendChild(el("img", { src: "/api/recent/" + item.id + "/thumbnail", alt: "heatmap overlay" }));
  d.appendChild(el("pre", { text: JSON.stringify(item.record, null, 2) }));
}

async function refreshGrid() {
  const params = new URLSearchParams({ limit: "60" });
  const cls = $("class-filter").value;
  if (cls) params.set("class", cls);
  if ($("anomalies-only").checked) params.set("anomalies", "true");
  const items = await getJson("/api/recent?" + params);
  $("grid").replaceChildren(...items.map(card));
  $("grid-note").textContent = items.length ? "" : "nothing scored yet";
}

function drawHistogram(canvas, raw, normal, threshold) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const h = (canvas.height = canvas.clientHeight * devicePixelRatio);
  ctx.clearRect(0, 0, w, h);
  if (!raw.length) return;
  const lo = Math.min(...raw, threshold), hi = Math.max(...raw, threshold);
  const bins = 40, span = hi - lo || 1;
  const counts = new Array(bins).fill(0);
  for (const x of raw) counts[Math.min(bins - 1, Math.floor(((x - lo) / span) * bins))]++;
  const top = Math.max(...counts);
  counts.forEach((n, i) => {
    const x0 = (i / bins) * w, bh = (n / top) * (h - 4);
    ctx.fillStyle = lo + ((i + 0.5) / bins) * span >= threshold ? "#d33" : "#4a7bd0";
    ctx.fillRect(x0 + 1, h - bh, w / bins - 2, bh);
  });
  const tx = ((threshold - lo) / span) * w;
  ctx.fillStyle = "#111";
  ctx.fillRect(tx - 1, 0, 2, h);
}

/// The share of recent normal-labelled images that `threshold` would flag.
function falseAlarmRate(raw, normal, threshold) {
  let n = 0, flagged = 0;
  raw.forEach((x, i) => {
    if (normal[i] === true) {
      n++;
      if (x >= threshold) flagged++;
    }
  });
  return n ? { rate: flagged / n, n } : null;
}

async function applyThreshold(cls, value, status) {
  status.textContent = "applying…";
  const r = await fetch("/api/thresholds/" + encodeURIComponent(cls), {
    method: "PUT",
    headers: { "content-type": "application/json", authorization: "Bearer " + $("token").value },
    body: JSON.stringify({ threshold: value === "" ? null : Number(value) }),
  });
  const body = await r.json().catch(() => ({}));
  status.textContent = r.ok ? "applied on every replica" : "refused: " + (body.error || r.status);
  await refreshScores();
}

async function refreshScores() {
  const box = $("histograms");
  // Leave the panels alone while someone is typing a threshold.
  if (box.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
  const data = await getJson("/api/scores");
  thresholds = data.thresholds;
  const filter = $("class-filter");
  const known = new Set([...filter.options].map((o) => o.value));
  for (const cls of Object.keys(thresholds)) if (!known.has(cls) && cls !== "_default") filter.appendChild(el("option", { value: cls, text: cls }));
  const panels = [];
  for (const [cls, t] of Object.entries(thresholds)) {
    const s = data.classes[cls] || { raw: [], normal: [] };
    const canvas = el("canvas");
    const input = el("input", { type: "number", step: "any", value: String(t.threshold) });
    const status = el("span", { class: "muted" });
    const far = el("div", { class: "muted" });
    const update = () => {
      const th = input.value === "" ? t.threshold : Number(input.value);
      drawHistogram(canvas, s.raw, s.normal, th);
      const f = falseAlarmRate(s.raw, s.normal, th);
      far.textContent = f ? "false alarms on recent normal-labelled images: " + (100 * f.rate).toFixed(1) + "% of " + f.n : "no normal-labelled recent images (attributes.label)";
    };
    input.addEventListener("input", update);
    const apply = el("button", { text: "apply" });
    apply.addEventListener("click", () => applyThreshold(cls, input.value, status));
    const reset = el("button", { text: "reset" });
    reset.addEventListener("click", () => applyThreshold(cls, "", status));
    panels.push(el("div", {}, [
      el("h3", { text: cls + " (" + s.raw.length + " recent, threshold from " + t.source + ")" }),
      canvas, far, el("div", {}, [input, apply, reset, status]),
    ]));
    requestAnimationFrame(update);
  }
  box.replaceChildren(...panels);
}

/// The last five minutes of a live value as a line.
const history = { rate: [], p99: [] };
function sparkline(canvas, values) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const h = (canvas.height = canvas.clientHeight * devicePixelRatio);
  ctx.clearRect(0, 0, w, h);
  const top = Math.max(1e-9, ...values.filter((v) => v !== null));
  ctx.strokeStyle = "#9fc2ff";
  ctx.lineWidth = devicePixelRatio;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / Math.max(1, values.length - 1)) * w, y = h - ((v || 0) / top) * (h - 2) - 1;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function live() {
  const source = new EventSource("/api/live");
  source.addEventListener("stats", (e) => {
    const s = JSON.parse(e.data);
    for (const [key, value] of [["rate", s.images_per_second], ["p99", s.latency_ms.p99]]) {
      history[key].push(value);
      if (history[key].length > 300) history[key].shift();
    }
    sparkline($("rate-history"), history.rate);
    sparkline($("p99-history"), history.p99);
    $("rate").textContent = fmt(s.images_per_second, 1);
    $("p50").textContent = fmt(s.latency_ms.p50, 0);
    $("p99").textContent = fmt(s.latency_ms.p99, 0);
    $("lag").textContent = String(s.consumer_lag);
    const kinds = Object.entries(s.dead_letters);
    $("dlq").textContent = kinds.length ? kinds.map(([k, n]) => k + " " + n).join(", ") : "0";
  });
}

async function main() {
  const m = await getJson("/api/model").catch(() => null);
  if (m) $("model").textContent = m.active.name + " " + m.active.version;
  $("class-filter").addEventListener("change", refreshGrid);
  $("anomalies-only").addEventListener("change", refreshGrid);
  live();
  await refreshScores().catch(console.error);
  await refreshGrid().catch(console.error);
  setInterval(() => refreshGrid().catch(console.error), 2000);
  setInterval(() => refreshScores().catch(console.error), 10000);
}
main();
