"use strict";
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function plot(title, values, bad) {
  const w = 300, h = 54, max = Math.max(1, ...values);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS(SVG, "polyline");
  const step = values.length > 1 ? w / (values.length - 1) : w;
  line.setAttribute("points", values.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / max) * (h - 6)).toFixed(1)}`).join(" "));
  if (bad) line.setAttribute("class", "bad");
  svg.append(line);
  const last = values.length ? values[values.length - 1] : 0;
  return el("div", { class: "plot" }, el("div", { class: "muted" }, `${title} (now ${fmt(last)}, max ${fmt(max)})`), svg);
}

function fmt(n) { return Number.isInteger(n) ? String(n) : n.toFixed(2); }

function rate(samples) {
  const recent = samples.slice(-5);
  if (!recent.length) return 0;
  return recent.reduce((s, x) => s + x.requests, 0) / recent.length;
}

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows));
}

function environment(env) {
  const s = env.samples.slice(-120);
  const last = s.length ? s[s.length - 1] : { p50_ms: 0, p99_ms: 0 };
  const rps = rate(env.samples);
  const stats = el("div", { class: "stats" },
    el("div", { class: "stat" }, el("b", { class: "rps", "data-rps": rps.toFixed(1) }, `${rps.toFixed(1)}/s`), "requests"),
    el("div", { class: "stat" }, el("b", {}, `${fmt(last.p50_ms)} ms`), "p50"),
    el("div", { class: "stat" }, el("b", {}, `${fmt(last.p99_ms)} ms`), "p99"),
    el("div", { class: "stat" }, el("b", { "data-rate-limited": env.rate_limited_total }, env.rate_limited_total), "rate limited"),
    el("div", { class: "stat" }, el("b", {}, env.requests_total), "requests total"));
  const plots = el("div", { class: "plots" },
    plot("req/s", s.map((x) => x.requests)),
    plot("4xx+5xx/s", s.map((x) => x.classes[3] + x.classes[4]), true),
    plot("p99 ms", s.map((x) => x.p99_ms)));
  const classes = s.reduce((acc, x) => acc.map((v, i) => v + x.classes[i]), [0, 0, 0, 0, 0]);
  const classLine = el("div", { class: "muted" },
    `last ${s.length} s: ` + ["1xx", "2xx", "3xx", "4xx", "5xx"].map((c, i) => `${c} ${classes[i]}`).join(" · ") +
    ` · rate limited ${s.reduce((a, x) => a + x.rate_limited, 0)}`);
  const upstreams = table(["upstream", "health", "errors (5 min)", "last error"], env.upstreams.map((u) =>
    el("tr", { "data-health": u.healthy ? "up" : "down" },
      el("td", {}, u.url),
      el("td", { class: u.healthy ? "up" : "down" }, u.healthy ? "healthy" : "down"),
      el("td", {}, u.recent_errors),
      el("td", {}, u.last_error ? `${u.last_error.kind} ${new Date(u.last_error.at * 1000).toLocaleTimeString()}` : "–"))));
  const ks = env.key_states;
  const keys = table(["key id", "state", "requests", "last seen", "not after"], env.keys.map((k) =>
    el("tr", {}, el("td", {}, k.id), el("td", { class: k.state }, k.state), el("td", {}, k.requests),
      el("td", {}, k.last_seen || "never"), el("td", {}, k.not_after || "–"))));
  return el("article", { class: "env", "data-env": env.name },
    el("h2", {}, env.name), stats, plots, classLine,
    el("h3", {}, "Upstreams"), upstreams,
    el("h3", {}, `Keys: ${ks.active} active · ${ks.staged} staged · ${ks.expiring} expiring · ${ks.expired} expired`), keys);
}

function render(status) {
  const c = status.config;
  document.getElementById("config").textContent =
    `config v${c.version} · loaded ${c.loaded_at} · sha256 ${c.sha256.slice(0, 12)}…` + (status.draining ? " · DRAINING" : "");
  document.getElementById("updated").textContent = `updated ${status.generated_at}`;
  const banner = document.getElementById("reload-error");
  if (c.last_reload_error) {
    banner.hidden = false;
    banner.textContent = `Last reload rejected at ${c.last_reload_error.at}; still serving v${c.version}:\n${c.last_reload_error.error}`;
  } else {
    banner.hidden = true;
  }
  document.getElementById("environments").replaceChildren(...status.environments.map(environment));
  const certs = status.certificates.map((x) => el("tr", {}, el("td", {}, x.file),
    el("td", {}, x.not_after || "–"), el("td", { class: x.days_left < 14 ? "expiring" : "" }, x.days_left ?? "–")));
  document.querySelector("#certificates tbody").replaceChildren(...certs);
  document.getElementById("certificates-section").hidden = certs.length === 0;
}

async function refresh() {
  try {
    const r = await fetch("/status.json", { cache: "no-store" });
    if (r.ok) render(await r.json());
  } catch (e) {
    document.getElementById("updated").textContent = `update failed: ${e}`;
  }
}

refresh();
setInterval(refresh, 2000);
