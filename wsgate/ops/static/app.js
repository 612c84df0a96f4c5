// wsgate status page: polls /status.json every two seconds and redraws. No libraries, no build.
"use strict";

const POLL_MS = 2000;
const WINDOW_S = 15 * 60;
const state = { data: null, sortKey: "id", sortAsc: true, filter: "", lastOk: 0 };

const $ = (id) => document.getElementById(id);

function fmtAge(s) {
  if (s === null || s === undefined) return "-";
  if (s < 10) return s.toFixed(1) + "s";
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function fmtRate(n) { return n >= 100 ? n.toFixed(0) : n.toFixed(1); }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderTiles(d) {
  const s = d.stats, r = s.rates || {};
  $("t-active").textContent = s.sessions_active;
  $("t-opened").textContent = s.sessions_opened + " opened, " + s.sessions_closed + " closed";
  $("t-mup").textContent = fmtRate(r.messages_up || 0);
  $("t-bup").textContent = fmtBytes(r.bytes_up || 0) + "/s, " + s.messages_up + " total";
  $("t-mdown").textContent = fmtRate(r.messages_down || 0);
  $("t-bdown").textContent = fmtBytes(r.bytes_down || 0) + "/s, " + s.messages_down + " total";
  const hs = s.handshakes || {};
  let bad = 0;
  const parts = [];
  for (const k of Object.keys(hs).sort()) {
    if (k !== "ok") { bad += hs[k]; parts.push(k + ": " + hs[k]); }
  }
  $("t-hok").textContent = hs.ok || 0;
  $("t-hbad").textContent = bad ? "refused " + parts.join(", ") : "none refused";
  const servers = d.upstreams.length, up = d.upstreams.filter((u) => u.state === "up").length;
  $("t-up").textContent = up + "/" + servers;
  const down = d.upstreams.filter((u) => u.state !== "up").map((u) => u.server + " " + u.state);
  $("t-down").textContent = down.length ? down.join(", ") : "all up";
  $("t-up").className = "v" + (up < servers ? " down" : "");
  const up_s = s.uptime == null ? "" : " | up " + fmtAge(s.uptime);
  $("meta").textContent = "v" + d.gate.version + " | " + d.gate.source + up_s +
    " | twisted " + s.versions.twisted + " | autobahn " + s.versions.autobahn;
}

function renderUpstreams(d) {
  const body = $("upstreams").tBodies[0];
  body.replaceChildren();
  for (const u of d.upstreams) {
    const tr = document.createElement("tr");
    tr.append(cell(u.upstream), cell(u.server));
    const st = document.createElement("td");
    const b = document.createElement("span");
    b.className = "badge " + u.state;
    b.textContent = u.state;
    st.append(b);
    if (u.backup) {
      const bb = document.createElement("span");
      bb.className = "badge backup";
      bb.textContent = "backup";
      st.append(" ", bb);
    }
    tr.append(st, cell(u.weight, "n"), cell(u.active, "n"), cell(u.sessions_total, "n"), cell(u.fails, "n"),
      cell(u.last_check == null ? "never" : fmtAge(u.last_check) + " ago", "n dim"));
    body.append(tr);
  }
}

function renderSessions(d) {
  const body = $("sessions").tBodies[0];
  const f = state.filter.toLowerCase();
  let rows = d.sessions.filter((s) => !f || [s.client, s.route, s.server, s.upstream, s.subprotocol]
    .some((v) => v && String(v).toLowerCase().includes(f)));
  const k = state.sortKey, dir = state.sortAsc ? 1 : -1;
  rows.sort((a, b) => (a[k] > b[k] ? 1 : a[k] < b[k] ? -1 : 0) * dir);
  const shown = rows.length;
  $("session-count").textContent = (f ? shown + " of " : "") + d.sessions_total +
    (d.sessions.length < d.sessions_total ? " (busiest " + d.sessions.length + " listed)" : "");
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(f ? "no session matches" : "no live sessions");
    td.colSpan = 12;
    tr.append(td);
    body.append(tr);
  }
  for (const s of rows) {
    const tr = document.createElement("tr");
    tr.dataset.session = s.id;
    tr.append(cell(s.id, "n"), cell(s.client), cell(s.route), cell(s.server || "-"), cell(fmtAge(s.age), "n"),
      cell(fmtAge(s.idle), "n dim"), cell(s.messages_up, "n"), cell(fmtBytes(s.bytes_up), "n"),
      cell(s.messages_down, "n"), cell(fmtBytes(s.bytes_down), "n"), cell(s.subprotocol || "-", "dim"),
      cell(s.tls ? "yes" : "no", "dim"));
    body.append(tr);
  }
  for (const th of $("sessions").tHead.rows[0].cells) {
    th.classList.toggle("sorted", th.dataset.key === state.sortKey);
    th.classList.toggle("asc", th.dataset.key === state.sortKey && state.sortAsc);
  }
}

// The smallest "round" maximum at or above v, so that the four grid steps are round too.
function niceMax(v) {
  if (v <= 4) return 4;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 5, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// Draw series [{points: [[t, v]...], color}] over the last WINDOW_S seconds ending at `now`.
function drawChart(canvas, series, now, fmt) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 170;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const c = canvas.getContext("2d");
  c.setTransform(ratio, 0, 0, ratio, 0, 0);
  c.clearRect(0, 0, w, h);
  const left = 48, right = 8, top = 8, bottom = 18;
  const pw = w - left - right, ph = h - top - bottom;
  let max = 0;
  for (const s of series) for (const p of s.points) max = Math.max(max, p[1]);
  max = niceMax(max);
  c.font = "10px " + getComputedStyle(document.body).fontFamily;
  c.strokeStyle = "#252c36";
  c.fillStyle = "#7d8896";
  c.lineWidth = 1;
  c.textAlign = "right";
  c.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = top + ph - (ph * i) / 4;
    c.beginPath(); c.moveTo(left, Math.round(y) + 0.5); c.lineTo(left + pw, Math.round(y) + 0.5); c.stroke();
    c.fillText(fmt((max * i) / 4), left - 6, y);
  }
  c.textAlign = "center";
  c.textBaseline = "top";
  for (let m = 15; m >= 0; m -= 5) {
    const x = left + pw - (pw * m * 60) / WINDOW_S;
    c.fillText(m ? "-" + m + "m" : "now", Math.min(x, left + pw - 10), top + ph + 4);
  }
  let drawn = 0;
  for (const s of series) {
    c.strokeStyle = s.color;
    c.lineWidth = 1.5;
    c.beginPath();
    let started = false;
    for (const [t, v] of s.points) {
      const age = now - t;
      if (age > WINDOW_S) continue;
      const x = left + pw - (pw * age) / WINDOW_S;
      const y = top + ph - (ph * v) / max;
      if (started) c.lineTo(x, y); else { c.moveTo(x, y); started = true; }
      drawn++;
    }
    c.stroke();
    if (s.fill && started) {
      c.lineTo(left + pw, top + ph);
      const first = s.points.find((p) => now - p[0] <= WINDOW_S);
      c.lineTo(left + pw - (pw * (now - first[0])) / WINDOW_S, top + ph);
      c.closePath();
      c.fillStyle = s.fill;
      c.fill();
    }
  }
  canvas.dataset.points = String(drawn);
  canvas.dataset.max = String(max);
}

function renderCharts(d) {
  const h = d.history || [];
  const now = d.time;
  drawChart($("chart-active"), [
    { points: h.map((p) => [p.t, p.active]), color: "#3fb950", fill: "rgba(63,185,80,0.12)" },
  ], now, (v) => (v >= 10 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, "")));
  drawChart($("chart-messages"), [
    { points: h.map((p) => [p.t, p.messages_up]), color: "#4cc3ff" },
    { points: h.map((p) => [p.t, p.messages_down]), color: "#f5a623" },
  ], now, (v) => fmtRate(v).replace(/\.0$/, ""));
}

function render() {
  const d = state.data;
  if (!d) return;
  renderTiles(d);
  renderUpstreams(d);
  renderSessions(d);
  renderCharts(d);
}

async function poll() {
  try {
    const resp = await fetch("/status.json", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    state.data = await resp.json();
    state.lastOk = Date.now();
    render();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (e) {
    $("updated").textContent = "unreachable: " + e.message;
  }
  tick();
  setTimeout(poll, POLL_MS);
}

function tick() {
  const live = $("live");
  if (!state.lastOk) return;
  const ago = (Date.now() - state.lastOk) / 1000;
  live.className = "live " + (ago < (POLL_MS / 1000) * 3 ? "ok" : "stale");
  if (ago < (POLL_MS / 1000) * 3) $("updated").textContent = "live, updated " + ago.toFixed(0) + "s ago";
  else $("updated").textContent = "stale: last update " + fmtAge(ago) + " ago";
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", (e) => { state.filter = e.target.value; if (state.data) renderSessions(state.data); });
  for (const th of $("sessions").tHead.rows[0].cells) {
    th.addEventListener("click", () => {
      if (state.sortKey === th.dataset.key) state.sortAsc = !state.sortAsc;
      else { state.sortKey = th.dataset.key; state.sortAsc = th.dataset.key === "client" || th.dataset.key === "route"; }
      if (state.data) renderSessions(state.data);
    });
  }
  window.addEventListener("resize", () => { if (state.data) renderCharts(state.data); });
  setInterval(tick, 1000);
  poll();
});
