// The inspection page. Every value from the stream (image ids, classes, attributes) goes into
// the page through textContent or an attribute set by the DOM API, never as HTML.
// Reads carry the read token (typed into the page, like the write token; never stored) in an
// Authorization header: thumbnails are fetched and shown from blob: URLs, the live panel's event
// stream is read with fetch, so no token ever travels in a URL.
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

/// The Authorization header for reads, when a read token was typed in.
function readHeaders() {
  const token = $("read-token").value;
  return token ? { authorization: "Bearer " + token } : {};
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store", headers: readHeaders() });
  if (r.status === 401) $("read-note").textContent = "reads need the read token";
  if (!r.ok) throw new Error(path + ": " + r.status);
  $("read-note").textContent = "";
  return r.json();
}

/// Thumbnails by image id, as promises of blob: URLs. An id names one image for good, so an
/// overlay is fetched once; those no longer listed are freed.
const thumbnails = new Map();
function showThumbnail(img, id) {
  if (!thumbnails.has(id)) {
    thumbnails.set(id, fetch("/api/recent/" + encodeURIComponent(id) + "/thumbnail", { headers: readHeaders() }).then((r) => {
      if (!r.ok) throw new Error("thumbnail: " + r.status);
      return r.blob();
    }).then((b) => URL.createObjectURL(b)));
  }
  // A failed fetch (e.g. another replica answered the list) is tried again on the next refresh.
  thumbnails.get(id).then((url) => { img.src = url; }, () => thumbnails.delete(id));
}
function forgetThumbnails(keep) {
  for (const [id, url] of thumbnails) {
    if (!keep.has(id) && id !== selected) {
      thumbnails.delete(id);
      url.then(URL.revokeObjectURL, () => {});
    }
  }
}

function card(item) {
  const r = item.record;
  const c = el("div", { class: "card" + (r.is_anomaly ? " anomaly" : ""), "data-id": String(item.id) });
  if (item.has_thumbnail) {
    const img = el("img", { alt: "" });
    showThumbnail(img, item.id);
    c.appendChild(img);
  } else {
    c.appendChild(el("div", { class: "noimg" }));
  }
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
  if (item.has_thumbnail) {
    const img = el("img", { alt: "heatmap overlay" });
    showThumbnail(img, item.id);
    d.appendChild(img);
  }
  d.appendChild(el("pre", { text: JSON.stringify(item.record, null, 2) }));
}

async function refreshGrid() {
  const params = new URLSearchParams({ limit: "60" });
  const cls = $("class-filter").value;
  if (cls) params.set("class", cls);
  if ($("anomalies-only").checked) params.set("anomalies", "true");
  const items = await getJson("/api/recent?" + params);
  forgetThumbnails(new Set(items.map((i) => i.id)));
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

function showLive(s) {
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
}

/// The live panel's server-sent events, read with fetch (EventSource cannot send the token);
/// reconnects after an error, and starts over when the read token changes.
let liveStream = null;
async function live() {
  if (liveStream) liveStream.abort();
  const stream = (liveStream = new AbortController());
  try {
    const r = await fetch("/api/live", { headers: readHeaders(), signal: stream.signal });
    if (!r.ok) throw new Error("/api/live: " + r.status);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        const lines = buffer.slice(0, end).split("\n");
        buffer = buffer.slice(end + 2);
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (lines.includes("event: stats") && data) showLive(JSON.parse(data));
      }
    }
  } catch (e) {
    if (stream.signal.aborted) return;
    console.error(e);
  }
  if (!stream.signal.aborted) setTimeout(live, 3000);
}

async function refreshModel() {
  const m = await getJson("/api/model").catch(() => null);
  if (m) $("model").textContent = m.active.name + " " + m.active.version;
}

async function refreshAll() {
  live();
  await refreshModel();
  await refreshScores().catch(console.error);
  await refreshGrid().catch(console.error);
}

async function main() {
  $("class-filter").addEventListener("change", refreshGrid);
  $("anomalies-only").addEventListener("change", refreshGrid);
  $("read-token").addEventListener("change", refreshAll);
  await refreshAll();
  setInterval(() => refreshGrid().catch(console.error), 2000);
  setInterval(() => refreshScores().catch(console.error), 10000);
}
main();
