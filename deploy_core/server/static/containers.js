// "Containers": for a client whose agent runs the Docker monitor (plugin monitor_docker), each
// managed container's state and health, and its CPU % and memory over the retained window as
// two small charts drawn here as SVG from GET /api/docker/monitor/{id}/series (docs/web.md).
//
// Kept apart from app.js: it reads the token app.js keeps in sessionStorage, and puts a
// "Containers" button on the rows app.js draws (on its "clients-shown" event) for clients
// whose row says data-plugins="… monitor_docker …". A client without the monitor gets nothing.
//
// Live: the monitor's samples do not travel on the live socket (only deployments, rollouts
// and client counts do), so while the section is open and the tab visible it reads the one
// client's series again every monitor interval (at least 2 s, at most 60 s), backing off to
// 60 s while the server fails. Every name, label and value is data: text and attributes only.
(function () {
  "use strict";

  const TOKEN_KEY = "deploy-center.token";
  const SHOWN_KEY = "deploy-center.containers"; // the client shown, kept for a reload
  const PLUGIN = "monitor_docker";
  const POINTS = 120; // asked of the server per series; also the most drawn
  const MIN_POLL_MS = 2000;
  const MAX_POLL_MS = 60000;
  const SVG = "http://www.w3.org/2000/svg";
  const W = 240;
  const H = 56;
  const PAD = 4;

  const view = {
    client: null,
    timer: null,
    busy: false,
    failures: 0,
    abort: null,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  // ------------------------------------------------------------------ formatting

  const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  function bytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return "—";
    let value = Number(n);
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < BYTE_UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
    return `${value.toFixed(digits)} ${BYTE_UNITS[unit]}`;
  }

  function percent(n) {
    if (n === null || n === undefined || !isFinite(n)) return "—";
    const value = Number(n);
    return `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} %`;
  }

  function clock(ts) {
    return new Date(ts * 1000).toLocaleTimeString();
  }

  function span(seconds) {
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
    return `${Math.round(seconds / 86400)} days`;
  }

  // ------------------------------------------------------------------ the chart

  // A sparkline of one series: x by time over the series' span, y by value between its
  // minimum and maximum (labelled); a missing value (no CPU figure yet) breaks the line.
  // The <svg> carries data-min/data-max/data-t0/data-t1 so what is drawn can be checked.
  function chart(kind, label, ts, values, format, suffix) {
    const shown = [];
    for (let i = Math.max(0, ts.length - POINTS); i < ts.length; i++) {
      const v = values[i];
      if (v !== null && v !== undefined && isFinite(v) && isFinite(ts[i])) shown.push([ts[i], Number(v)]);
    }
    const box = el("figure", { class: "spark", "data-chart": kind });
    const latest = shown.length ? shown[shown.length - 1] : null;
    box.append(el("figcaption", {},
      el("span", { class: "spark-label", text: label }), " ",
      el("span", { class: "spark-latest", "data-latest": kind, text: latest ? format(latest[1]) + (suffix || "") : "no data" })));
    if (!shown.length) {
      box.append(el("p", { class: "spark-empty", text: "No samples yet." }));
      return box;
    }
    const lo = Math.min(...shown.map((p) => p[1]));
    const hi = Math.max(...shown.map((p) => p[1]));
    const t0 = shown[0][0];
    const t1 = latest[0];
    const x = (t) => (t1 > t0 ? PAD + ((t - t0) / (t1 - t0)) * (W - 2 * PAD) : W - PAD);
    const y = (v) => (hi > lo ? H - PAD - ((v - lo) / (hi - lo)) * (H - 2 * PAD) : H / 2);
    const round = (n) => Math.round(n * 100) / 100;
    const graphic = svg("svg", {
      class: "spark-svg", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "data-min": lo, "data-max": hi, "data-t0": t0, "data-t1": t1,
      "data-width": W, "data-height": H, "data-pad": PAD,
    });
    const title = `${label}: ${format(latest[1])} at ${clock(latest[0])}; ` +
      `min ${format(lo)}, max ${format(hi)} over ${span(t1 - t0)} (${shown.length} points)`;
    graphic.setAttribute("aria-label", title);
    const titleNode = svg("title");
    titleNode.textContent = title;
    graphic.append(titleNode);
    graphic.append(svg("line", { class: "spark-axis", x1: PAD, x2: W - PAD, y1: H - PAD, y2: H - PAD }));
    // Runs of consecutive present values, each its own line.
    let run = [];
    const runs = [run];
    for (let i = Math.max(0, ts.length - POINTS); i < ts.length; i++) {
      const v = values[i];
      if (v === null || v === undefined || !isFinite(v)) {
        if (run.length) runs.push((run = []));
      } else {
        run.push(`${round(x(ts[i]))},${round(y(Number(v)))}`);
      }
    }
    for (const points of runs) {
      if (points.length) graphic.append(svg("polyline", { class: "spark-line", points: points.join(" ") }));
    }
    graphic.append(svg("circle", { class: "spark-dot", cx: round(x(t1)), cy: round(y(latest[1])), r: 2.5 }));
    box.append(el("div", { class: "spark-body" },
      graphic,
      el("div", { class: "spark-axis-labels" },
        el("span", { class: "spark-max", text: format(hi) }),
        el("span", { class: "spark-min", text: format(lo) }))));
    box.append(el("div", { class: "spark-time muted" },
      el("span", { text: clock(t0) }), el("span", { text: clock(t1) })));
    return box;
  }

  // ------------------------------------------------------------------ the section

  function card(c) {
    const series = c.series || { ts: [], cpu_percent: [], memory_usage: [] };
    const title = c.logical_name || c.name;
    const limit = c.memory_limit ? ` of ${bytes(c.memory_limit)}` : "";
    return el("article", { class: "ctr", "data-container": c.id, "aria-label": `container ${title}` },
      el("header", { class: "ctr-head" },
        el("h3", { class: "ctr-name", text: title }),
        el("span", { class: "badge ctr-state", "data-state": c.state, text: c.state }),
        c.health ? el("span", { class: "badge ctr-health", "data-health": c.health, text: c.health }) : null),
      el("p", { class: "ctr-facts muted" },
        el("span", { class: "mono", text: c.name }), " · ",
        el("span", { text: c.image || "(no image)" }), " · ",
        el("span", { text: `restarts ${c.restarts}` }),
        c.exit_code !== null && c.exit_code !== undefined && c.state !== "running"
          ? el("span", { text: ` · exit ${c.exit_code}` }) : null),
      el("div", { class: "ctr-charts" },
        chart("cpu", "CPU", series.ts, series.cpu_percent, percent),
        chart("memory", "Memory", series.ts, series.memory_usage, bytes, limit)));
  }

  function render(data) {
    const list = $("containers-list");
    const status = $("containers-status");
    const containers = data.containers || [];
    list.replaceChildren(...containers.map(card));
    const empty = $("containers-empty");
    empty.hidden = containers.length > 0;
    if (!data.last_report) {
      empty.textContent = "The Docker monitor of this client has not reported yet.";
    } else if (data.error) {
      empty.textContent = "The monitor could not read the Docker engine: " + data.error;
    } else {
      empty.textContent = "No container managed by Deploy Center runs on this client.";
    }
    const parts = [];
    if (data.last_report) parts.push(`last report ${new Date(data.last_report).toLocaleTimeString()}`);
    if (data.interval) parts.push(`every ${data.interval} s`);
    parts.push(`window ${span(data.retention_seconds)}`);
    if (data.truncated) parts.push(`the first ${containers.length} containers shown`);
    status.textContent = parts.join(" · ");
    $("containers-error").hidden = !data.error || containers.length === 0;
    if (data.error && containers.length) $("containers-error").textContent = "Last report: " + data.error;
  }

  function showFailure(message) {
    const box = $("containers-error");
    box.textContent = message;
    box.hidden = false;
  }

  async function refresh() {
    const clientId = view.client;
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!clientId || view.busy) return;
    if (!token || $("app").hidden) {
      close();
      return;
    }
    if (document.hidden) {
      schedule(MIN_POLL_MS); // nothing read while nobody looks
      return;
    }
    view.busy = true;
    const abort = new AbortController();
    view.abort = abort;
    let interval = 15;
    try {
      const path = `/api/docker/monitor/${encodeURIComponent(clientId)}/series?points=${POINTS}`;
      const response = await fetch(path, {
        headers: { Authorization: "Bearer " + token }, cache: "no-store", signal: abort.signal,
      });
      if (view.client !== clientId) return;
      if (!response.ok) {
        let text = "";
        try {
          const body = await response.json();
          text = typeof body.error === "string" ? body.error : "";
        } catch (err) {
          text = "";
        }
        throw new Error(`GET ${path} → ${response.status}` + (text ? `: ${text}` : ""));
      }
      const data = await response.json();
      if (view.client !== clientId) return;
      view.failures = 0;
      render(data);
      if (isFinite(data.interval) && data.interval > 0) interval = data.interval;
      $("containers").dataset.loaded = "true";
    } catch (err) {
      if (view.client !== clientId || (err && err.name === "AbortError")) return;
      view.failures += 1;
      showFailure(`${err.message || err}; trying again in ${Math.round(backoff() / 1000)} s`);
    } finally {
      if (view.abort === abort) {
        view.abort = null; // else close() or open() took over and reset these
        view.busy = false;
      }
      if (view.client === clientId && view.abort === null && !view.busy) schedule(view.failures ? backoff() : interval * 1000);
    }
  }

  function backoff() {
    return Math.min(MAX_POLL_MS, MIN_POLL_MS * 2 ** Math.min(view.failures, 10));
  }

  function schedule(ms) {
    clearTimeout(view.timer);
    view.timer = setTimeout(refresh, Math.max(MIN_POLL_MS, Math.min(MAX_POLL_MS, ms)));
  }

  function open(clientId) {
    close();
    view.client = clientId;
    sessionStorage.setItem(SHOWN_KEY, clientId);
    const section = $("containers");
    section.hidden = false;
    delete section.dataset.loaded;
    $("containers-h").textContent = "Containers on " + clientId;
    $("containers-list").replaceChildren();
    $("containers-status").textContent = "Reading…";
    $("containers-empty").hidden = true;
    $("containers-error").hidden = true;
    markButtons();
    refresh();
  }

  function close() {
    clearTimeout(view.timer);
    if (view.abort) view.abort.abort();
    view.abort = null;
    view.busy = false;
    view.failures = 0;
    view.client = null;
    sessionStorage.removeItem(SHOWN_KEY);
    const section = $("containers");
    if (section) section.hidden = true;
    markButtons();
  }

  // A "Containers" button on each row of a client with the monitor.
  function markButtons() {
    for (const row of document.querySelectorAll("#clients-body tr[data-client]")) {
      const plugins = (row.dataset.plugins || "").split(" ");
      const cell = row.querySelector("th");
      let button = row.querySelector("button[data-containers]");
      if (!plugins.includes(PLUGIN) || !cell) {
        if (button) button.remove();
        continue;
      }
      if (!button) {
        const clientId = row.dataset.client;
        button = el("button", {
          type: "button", class: "quiet pick", "data-containers": clientId,
          "aria-label": `containers of ${clientId}`, text: "Containers",
        });
        button.addEventListener("click", () => open(clientId));
        cell.append(button);
      }
      button.setAttribute("aria-pressed", String(row.dataset.client === view.client));
    }
  }

  document.addEventListener("clients-shown", () => {
    markButtons();
    const kept = sessionStorage.getItem(SHOWN_KEY);
    if (!view.client && kept) open(kept);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && view.client && !view.busy) refresh();
  });
  document.addEventListener("DOMContentLoaded", () => {
    $("containers-close").addEventListener("click", close);
  });
})();
