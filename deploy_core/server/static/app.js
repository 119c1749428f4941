// Deploy Center web page: plain JavaScript, no build step, nothing from other sites.
//
// Data comes from two places, both with the operator's API token:
// - the REST API (fetch with "Authorization: Bearer"), for the current state when the page
//   connects, the clients a page at a time (GET /api/clients with filters and a cursor), the
//   rollouts, and one deployment's history and log stream (?follow=1, NDJSON);
// - the live socket /api/live, which pushes every changed deployment and rollout, and the
//   clients' counts (asked for with "clients": "summary": a fleet's whole list is not sent);
//   a change of those counts makes the page read its page of clients again.
// The token is given to the socket as its first message (browsers cannot set headers on a
// WebSocket) and kept in sessionStorage, so it lives only as long as this tab.
"use strict";

(function () {
  const TOKEN_KEY = "deploy-center.token";
  const MAX_LISTED = 100;
  const TERMINAL = new Set(["success", "failed", "timeout", "rolled_back", "rollback_failed"]);
  const CLIENT_PAGE = 25;
  const CLIENT_STATES = ["connected", "disconnected", "revoked"];
  const ROLLOUTS_LISTED = 20;
  const ROLLOUT_FINAL = new Set(["succeeded", "failed", "aborted", "rolled_back"]);
  // A rollout's target counts as failed with these (docs/rollouts.md, max_failures).
  const FAILED = new Set(["failed", "timeout", "rolled_back", "rollback_failed", "not_started"]);
  const UNDONE = new Set(["rolled_back", "rollback_failed"]);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    socket: null,
    retryDelay: 1000,
    retryTimer: null,
    pingTimer: null,
    loaded: false, // the deployment list was read since the socket (re)opened
    clients: [], // the page of clients shown
    clientQuery: { state: null, q: "", labels: [] }, // labels: ["key=value", …]
    clientCursors: [null], // the cursor of each page up to the one shown
    clientNext: null,
    clientTotal: 0,
    clientSummary: null,
    clientsBusy: false,
    clientsAgain: false,
    clientsTimer: null,
    enrolled: null, // the live socket's summary: every enrolled client
    deployments: new Map(),
    rollouts: new Map(),
    rolloutsListed: 20, // how many of the newest the list shows ("Older" adds more)
    rolloutsTotal: 0,
    rolloutSelected: null,
    rollout: null, // GET /api/rollouts/{id} of the selected one
    rolloutBusy: false,
    rolloutAgain: false,
    selected: null,
    logAbort: null,
    logsDone: null, // the deployment whose log stream ended
    historyBusy: false,
    historyAgain: false,
    rollbackDefault: null, // GET /api/info's rollback_defaults["deploy.shell"]
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ small helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Today's times as a time of day, older ones with their date; the exact time is its title.
  function time(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (isNaN(date)) return iso;
    return date.toDateString() === new Date().toDateString()
      ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function timeNode(iso) {
    return iso ? el("time", { datetime: iso, title: iso, text: time(iso) }) : "—";
  }

  function shortId(id) {
    return id.slice(0, 8);
  }

  function statusBadge(status) {
    return el("span", { class: "badge", "data-status": status, text: status });
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
    });
  }

  // ------------------------------------------------------------------ the REST API

  class ApiFailure extends Error {
    constructor(method, path, status, body, text) {
      super(body && typeof body.error === "string" ? body.error : text);
      this.method = method;
      this.path = path;
      this.status = status;
      this.body = body;
      this.text = text;
    }
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: "Bearer " + state.token }, extra || {});
  }

  async function api(method, path, body) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }),
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiFailure(method, path, 0, null, "the server did not answer: " + err.message);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = null;
    }
    if (!response.ok) throw new ApiFailure(method, path, response.status, data, text);
    return data;
  }

  // Errors are shown as the API wrote them: its "error" text and its "detail", unchanged.
  function showError(box, err) {
    box.replaceChildren();
    if (err instanceof ApiFailure) {
      const where = err.status ? `${err.method} ${err.path} → ${err.status}` : `${err.method} ${err.path}`;
      box.append(el("p", { class: "where", text: where }));
      box.append(el("p", { class: "message", text: err.message || "(empty answer)" }));
      if (err.body && err.body.detail !== undefined) {
        box.append(el("pre", { text: JSON.stringify(err.body.detail, null, 2) }));
      }
    } else {
      box.append(el("p", { class: "message", text: String(err && err.message ? err.message : err) }));
    }
    box.append(el("button", { type: "button", class: "quiet", text: "Dismiss",
      onclick: () => { box.hidden = true; } }));
    box.hidden = false;
  }

  function clearError(box) {
    box.hidden = true;
    box.replaceChildren();
  }

  // ------------------------------------------------------------------ signing in

  function showLogin(message) {
    $("login").hidden = false;
    $("app").hidden = true;
    $("signout").hidden = true;
    if (message) {
      $("login-error").replaceChildren(el("p", { class: "message", text: message }));
      $("login-error").hidden = false;
    }
    $("token").focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    closeSocket();
    stopLogs();
    setConn("off", "Not connected");
    showLogin(message);
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    clearError($("login-error"));
    openSocket();
  });

  $("signout").addEventListener("click", () => signOut(null));

  // ------------------------------------------------------------------ the live socket

  function setConn(kind, text) {
    const conn = $("conn");
    conn.dataset.state = kind;
    conn.textContent = text;
  }

  function closeSocket() {
    clearTimeout(state.retryTimer);
    clearInterval(state.pingTimer);
    if (state.socket) {
      state.socket.onclose = null;
      state.socket.close(1000);
      state.socket = null;
    }
  }

  function openSocket() {
    closeSocket();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/api/live`);
    state.socket = socket;
    state.loaded = false;
    setConn("wait", "Connecting…");
    socket.onopen = () => {
      socket.send(JSON.stringify({ type: "auth", token: state.token, clients: "summary" }));
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      onMessage(message);
    };
    socket.onclose = (event) => {
      clearInterval(state.pingTimer);
      state.socket = null;
      if (event.code === 4401 || event.code === 4403) {
        signOut(`The server refused the token (${event.code}): ${event.reason || "no reason given"}`);
        return;
      }
      const seconds = Math.round(state.retryDelay / 1000);
      setConn("lost", `Connection lost (code ${event.code}); reconnecting in ${seconds} s`);
      state.retryTimer = setTimeout(openSocket, state.retryDelay);
      state.retryDelay = Math.min(state.retryDelay * 2, 15000);
    };
  }

  function onMessage(message) {
    switch (message.type) {
      case "hello": {
        state.retryDelay = 1000;
        // "Live" once the first page of clients is read too, so the form has its client.
        const socket = state.socket;
        const live = `Live · signed in as ${message.caller} (${message.scope})`;
        loadClients().finally(() => { if (state.socket === socket) setConn("live", live); });
        $("login").hidden = true;
        $("app").hidden = false;
        $("signout").hidden = false;
        clearInterval(state.pingTimer);
        state.pingTimer = setInterval(() => {
          if (state.socket) state.socket.send(JSON.stringify({ type: "ping" }));
        }, 25000);
        if (state.selected) refreshSelected();
        else route(false);
        if (state.rolloutSelected) refreshRollout();
        loadRollbackDefault();
        if (!state.loaded) {
          state.loaded = true;
          loadDeployments();
          loadRollouts();
        }
        break;
      }
      case "clients_summary":
        state.enrolled = message.summary;
        renderEnrolled();
        scheduleClients();
        break;
      case "deployment":
        upsert(message.record);
        rolloutTargetChanged(message.record);
        break;
      case "rollout":
        upsertRollout(message.rollout);
        break;
      case "error":
        showError($("api-error"), new Error("live feed: " + message.error));
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ clients
  //
  // A fleet has thousands of clients: the page shows their counts (by state and by label,
  // counted by the server) and one page of them at a time, filtered by state, a search text
  // and labels — never the whole list (docs/web.md).

  function number(n) {
    return Number(n).toLocaleString("en-US");
  }

  function clientPath() {
    const query = state.clientQuery;
    const params = new URLSearchParams();
    params.set("limit", String(CLIENT_PAGE));
    params.set("summary", "1");
    if (query.state) params.set("state", query.state);
    if (query.q) params.set("q", query.q);
    for (const label of query.labels) params.append("label", label);
    const cursor = state.clientCursors[state.clientCursors.length - 1];
    if (cursor) params.set("cursor", cursor);
    return "/api/clients?" + params.toString();
  }

  // Read the page shown again soon (the live counts changed): at most one read at a time,
  // and one more after it if something changed meanwhile.
  function scheduleClients() {
    if (state.clientsTimer) return;
    state.clientsTimer = setTimeout(() => {
      state.clientsTimer = null;
      loadClients();
    }, 250);
  }

  async function loadClients() {
    if (state.clientsBusy) {
      state.clientsAgain = true;
      return;
    }
    state.clientsBusy = true;
    try {
      do {
        state.clientsAgain = false;
        const path = clientPath();
        let page;
        try {
          page = await api("GET", path);
        } catch (err) {
          if (path === clientPath()) {
            showError($("clients-error"), err);
            break;
          }
          state.clientsAgain = true; // the filters or page changed meanwhile
          continue;
        }
        if (path !== clientPath()) {
          state.clientsAgain = true; // an answer for filters or a page no longer shown
          continue;
        }
        if (page.clients.length === 0 && state.clientCursors.length > 1) {
          // The clients of this page went away: back to the first page.
          state.clientCursors = [null];
          state.clientsAgain = true;
          continue;
        }
        clearError($("clients-error"));
        state.clients = page.clients;
        state.clientNext = page.next_cursor;
        state.clientTotal = page.total;
        state.clientSummary = page.summary || null;
        renderClients();
      } while (state.clientsAgain);
    } finally {
      state.clientsBusy = false;
    }
  }

  function setClientQuery(change) {
    Object.assign(state.clientQuery, change);
    state.clientCursors = [null];
    renderFilters();
    loadClients();
  }

  function toggleLabel(pair) {
    const labels = state.clientQuery.labels.filter((l) => l !== pair);
    if (labels.length === state.clientQuery.labels.length) labels.push(pair);
    setClientQuery({ labels });
  }

  function renderEnrolled() {
    const summary = state.enrolled;
    $("clients-enrolled").textContent = summary
      ? `· ${number(summary.total)} enrolled, ${number(summary.states.connected)} connected` : "";
  }

  function renderFilters() {
    const query = state.clientQuery;
    const summary = state.clientSummary;
    const states = summary ? summary.states : null;
    const all = states ? CLIENT_STATES.reduce((n, s) => n + states[s], 0) : null;
    const stateButton = (value, text, count) => el("button", {
      type: "button",
      class: "facet",
      "data-state": value || "all",
      "aria-pressed": String((query.state || null) === value),
      onclick: () => setClientQuery({ state: value }),
    }, el("span", { class: "facet-name", text }), " ",
    el("span", { class: "count", text: count === null ? "…" : number(count) }));
    $("clients-states").replaceChildren(
      stateButton(null, "all", all),
      ...CLIENT_STATES.map((s) => stateButton(s, s, states ? states[s] : null)));

    const groups = [];
    const labels = summary ? summary.labels : {};
    for (const key of Object.keys(labels).sort()) {
      const values = Object.entries(labels[key]).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
      groups.push(el("div", { class: "facet-group" },
        el("span", { class: "facet-key", text: key }),
        ...values.map(([value, count]) => {
          const pair = `${key}=${value}`;
          return el("button", {
            type: "button",
            class: "facet",
            "data-label": pair,
            "aria-pressed": String(query.labels.includes(pair)),
            onclick: () => toggleLabel(pair),
          }, el("span", { class: "facet-name", text: value || "(empty)" }), " ",
          el("span", { class: "count", text: number(count) }));
        })));
    }
    if (summary && summary.labels_truncated) {
      groups.push(el("p", { class: "hint", text: "Only the 500 most common labels are counted; type a label filter to find the others." }));
    }
    $("clients-labels").replaceChildren(...groups);

    const active = query.labels.map((pair) => el("button", {
      type: "button", class: "chip-filter", "data-filter": pair,
      "aria-label": `remove label filter ${pair}`,
      onclick: () => toggleLabel(pair),
    }, pair, " ×"));
    $("clients-active").replaceChildren(...active);
  }

  function stateCell(client) {
    if (client.revoked_at) {
      return el("td", {}, el("span", { class: "dot off", "aria-hidden": "true" }), "revoked ",
        timeNode(client.revoked_at));
    }
    if (client.connected) {
      return el("td", {}, el("span", { class: "dot on", "aria-hidden": "true" }),
        el("strong", { text: "connected" }), " since ", timeNode(client.connected_since),
        client.remote ? el("div", { class: "muted", text: client.remote }) : null);
    }
    const cell = el("td", {}, el("span", { class: "dot off", "aria-hidden": "true" }),
      el("strong", { text: "disconnected" }));
    if (client.disconnected_since) cell.append(" since ", timeNode(client.disconnected_since));
    return cell;
  }

  function renderClients() {
    const rows = state.clients.map((client) => {
      const caps = client.capabilities || {};
      const list = (items) => (items && items.length ? items.join(", ") : "—");
      const labels = Object.entries(client.labels || {}).sort();
      const pick = client.revoked_at ? null : el("button", {
        type: "button", class: "quiet pick", "data-pick": client.client_id,
        "aria-label": `deploy to ${client.client_id}`,
        onclick: () => { $("f-client").value = client.client_id; $("f-script").focus(); },
        text: "Deploy here",
      });
      return el("tr", { "data-client": client.client_id, "data-connected": String(client.connected),
        "data-plugins": Object.keys(client.plugins || {}).join(" ") }, // containers.js reads it
        el("th", { scope: "row" }, client.client_id, pick),
        stateCell(client),
        el("td", {}, ...labels.flatMap(([k, v]) => [el("span", { class: "label", text: `${k}=${v}` }), " "])),
        el("td", {
          text: list(caps.deploy_types),
          title: `health checks: ${list(caps.health_checks)}; rollback strategies: ${list(caps.rollback_strategies)}`,
        }));
    });
    $("clients-body").replaceChildren(...rows);
    const filtered = state.clientQuery.state || state.clientQuery.q || state.clientQuery.labels.length;
    const empty = $("clients-empty");
    empty.hidden = rows.length > 0;
    if (!rows.length) {
      empty.replaceChildren(filtered ? "No client matches these filters."
        : el("span", {}, "No agent has enrolled yet. Start one with ", el("code", { text: "deployctl agent" }), "."));
    }
    const first = (state.clientCursors.length - 1) * CLIENT_PAGE;
    $("clients-range").textContent = rows.length
      ? `${number(first + 1)}–${number(first + rows.length)} of ${number(state.clientTotal)}`
      : `0 of ${number(state.clientTotal)}`;
    $("clients-prev").disabled = state.clientCursors.length <= 1;
    $("clients-next").disabled = !state.clientNext;
    renderFilters();
    renderClientChoice();
    document.dispatchEvent(new CustomEvent("clients-shown"));
  }

  // The deploy form's client: any id may be typed; the connected clients shown are offered.
  function renderClientChoice() {
    const usable = state.clients.filter((client) => !client.revoked_at);
    $("f-client-list").replaceChildren(...usable.map((client) => el("option", {
      value: client.client_id, label: client.connected ? "connected" : "disconnected" })));
    const field = $("f-client");
    const connected = usable.find((c) => c.connected);
    if (!field.value && connected && document.activeElement !== field) field.value = connected.client_id;
  }

  // One page move at a time: the buttons come back when the page has been read.
  function movePage(change) {
    change();
    state.clientNext = null;
    $("clients-prev").disabled = true;
    $("clients-next").disabled = true;
    loadClients();
  }
  $("clients-prev").addEventListener("click", () => {
    if (state.clientCursors.length > 1) movePage(() => state.clientCursors.pop());
  });
  $("clients-next").addEventListener("click", () => {
    const next = state.clientNext;
    if (next) movePage(() => state.clientCursors.push(next));
  });

  let searchTimer = null;
  $("clients-q").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => setClientQuery({ q: $("clients-q").value.trim() }), 250);
  });

  $("clients-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(searchTimer);
    const pair = $("clients-label").value.trim();
    if (pair && !state.clientQuery.labels.includes(pair)) {
      // Checked by the server: a wrong one comes back as its 422, shown above the list.
      $("clients-label").value = "";
      setClientQuery({ q: $("clients-q").value.trim(), labels: [...state.clientQuery.labels, pair] });
    } else {
      setClientQuery({ q: $("clients-q").value.trim() });
    }
  });

  // ------------------------------------------------------------------ deployments list

  async function loadDeployments() {
    try {
      const page = await api("GET", "/api/deployments?limit=" + MAX_LISTED);
      page.items.forEach(upsertQuietly);
    } catch (err) {
      if (!(err instanceof ApiFailure && err.status === 404)) {
        showError($("api-error"), err);
        return;
      }
      // A server without the all-clients list: read each client's.
      for (const client of state.clients) {
        try {
          const page = await api("GET", `/api/deploy/${encodeURIComponent(client.client_id)}/list?limit=50`);
          page.items.forEach(upsertQuietly);
        } catch (inner) {
          showError($("api-error"), inner);
        }
      }
    }
    renderDeployments();
  }

  function upsertQuietly(record) {
    const known = state.deployments.get(record.deploy_id);
    if (!known || record.updated_ts >= known.updated_ts) state.deployments.set(record.deploy_id, record);
  }

  function upsert(record) {
    upsertQuietly(record);
    renderDeployments();
    if (record.deploy_id === state.selected) {
      renderDetail(state.deployments.get(record.deploy_id));
      refreshHistory();
    }
  }

  function renderDeployments() {
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.deploy : null;
    const records = [...state.deployments.values()]
      .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0))
      .slice(0, MAX_LISTED);
    const rows = records.map((rec) => {
      const selected = rec.deploy_id === state.selected;
      const link = el("a", {
        href: "#deploy/" + rec.deploy_id,
        "data-deploy": rec.deploy_id,
        "aria-current": selected ? "true" : null,
        "aria-label": `deployment ${rec.deploy_id}, ${rec.command_type} on ${rec.client_id}, ${rec.status}`,
        class: "mono",
        text: shortId(rec.deploy_id),
      });
      return el("tr", { class: selected ? "selected" : null, "data-deploy-row": rec.deploy_id },
        el("th", { scope: "row" }, link, el("div", { class: "muted", text: rec.command_type })),
        el("td", { class: "id", text: rec.client_id }),
        el("td", {}, statusBadge(rec.status)),
        el("td", {}, el("progress", { max: "100", value: String(rec.progress),
          "aria-label": `progress ${rec.progress} %` }), ` ${rec.progress} %`),
        el("td", {}, timeNode(rec.created_at)));
    });
    $("deployments-body").replaceChildren(...rows);
    $("deployments-empty").hidden = records.length > 0;
    if (focused) {
      const again = document.querySelector(`a[data-deploy="${focused}"]`);
      if (again) again.focus();
    }
  }

  // ------------------------------------------------------------------ one deployment

  // "#deploy/<id>" shows a deployment, "#rollout/<id>" a rollout (the deployment shown stays).
  function route(moveFocus) {
    const rollout = /^#rollout\/([0-9a-f]{32})$/.exec(location.hash);
    if (rollout) {
      selectRollout(rollout[1], !!moveFocus);
      return;
    }
    const match = /^#deploy\/([0-9a-f]{32})$/.exec(location.hash);
    select(match ? match[1] : null, !!moveFocus);
  }

  window.addEventListener("hashchange", () => {
    if (state.token && !$("app").hidden) route(true);
  });

  function select(deployId, moveFocus) {
    if (deployId && deployId === state.selected) return;
    stopLogs();
    state.selected = deployId;
    state.logsDone = null;
    clearError($("detail-error"));
    clearError($("d-rollback-error"));
    $("d-rollback-result").textContent = "";
    renderDeployments();
    if (!deployId) {
      $("detail-h").textContent = "Deployment";
      $("detail-none").hidden = false;
      $("detail-body").hidden = true;
      return;
    }
    $("detail-h").textContent = "Deployment " + deployId;
    $("detail-none").hidden = true;
    $("detail-body").hidden = false;
    $("history-body").replaceChildren();
    $("logs").replaceChildren();
    const known = state.deployments.get(deployId);
    if (known) renderDetail(known);
    if (moveFocus) $("detail-h").focus();
    refreshSelected();
  }

  async function refreshSelected() {
    const deployId = state.selected;
    try {
      const record = await api("GET", "/api/deploy/" + deployId);
      if (state.selected !== deployId) return;
      upsertQuietly(record);
      renderDetail(state.deployments.get(deployId));
      renderDeployments();
    } catch (err) {
      if (state.selected === deployId) showError($("detail-error"), err);
      return;
    }
    refreshHistory();
    if (!state.logAbort && state.logsDone !== deployId) followLogs(deployId);
  }

  function canRollBack(rec) {
    return rec.finished && rec.command_type !== "deploy.rollback" && !rec.rolled_back_by &&
      !UNDONE.has(rec.status) && rec.request && rec.request.rollback;
  }

  function setLink(termId, valueId, deployId) {
    $(termId).hidden = !deployId;
    $(valueId).hidden = !deployId;
    $(valueId).replaceChildren(deployId
      ? el("a", { href: "#deploy/" + deployId, class: "mono", text: deployId }) : "");
  }

  function setText(termId, valueId, text) {
    $(termId).hidden = !text;
    $(valueId).hidden = !text;
    $(valueId).textContent = text;
  }

  function renderDetail(rec) {
    if (!rec) return;
    const status = $("d-status");
    status.textContent = rec.status;
    status.dataset.status = rec.status;
    $("d-stage").textContent = rec.stage;
    $("d-client").textContent = rec.client_id;
    $("d-type").textContent = rec.command_type;
    $("d-created").replaceChildren(timeNode(rec.created_at));
    $("d-updated").replaceChildren(timeNode(rec.updated_at));
    $("d-finished").replaceChildren(timeNode(rec.finished_at));
    $("d-deadline").replaceChildren(timeNode(rec.deadline));
    setLink("d-rollback-of-t", "d-rollback-of", rec.rollback_of);
    setLink("d-rolled-back-by-t", "d-rolled-back-by", rec.rolled_back_by);
    $("d-progress").value = rec.progress;
    $("d-progress-text").textContent = rec.progress + " %";
    $("d-message").hidden = !rec.error;
    $("d-message").textContent = rec.error || "";
    $("d-rollback").hidden = !canRollBack(rec);
    // What the server decided to do on failure when it accepted the request, and what the
    // rollback said it did (e.g. "nothing to roll back to: first release").
    const plan = rec.request && rec.request.rollback_plan;
    setText("d-plan-t", "d-plan", plan ? plan.note : "");
    const undo = rec.rollback;
    setText("d-undo-t", "d-undo", undo
      ? `${undo.success ? "done" : "FAILED"}: ${undo.error || undo.message || ""}` : "");
    const outcome = {};
    if (rec.result) outcome.result = rec.result;
    if (rec.health && rec.health.length) outcome.health = rec.health;
    if (rec.rollback) outcome.rollback = rec.rollback;
    outcome.request = rec.request;
    $("d-result").textContent = JSON.stringify(outcome, null, 2);
  }

  // Several changes can arrive while the history is being read: read once more after.
  async function refreshHistory() {
    if (state.historyBusy) {
      state.historyAgain = true;
      return;
    }
    state.historyBusy = true;
    try {
      do {
        state.historyAgain = false;
        const deployId = state.selected;
        if (!deployId) break;
        try {
          const answer = await api("GET", `/api/deploy/${deployId}/status`);
          if (state.selected === deployId) renderHistory(answer.history);
        } catch (err) {
          if (state.selected === deployId) showError($("detail-error"), err);
        }
      } while (state.historyAgain);
    } finally {
      state.historyBusy = false;
    }
  }

  function renderHistory(rows) {
    $("history-body").replaceChildren(...rows.map((row) => el("tr", {},
      el("td", {}, timeNode(row.timestamp)),
      el("td", {}, statusBadge(row.status), row.stage !== row.status ? ` ${row.stage}` : ""),
      el("td", { class: "num", text: row.progress + " %" }),
      el("td", { text: row.message || "" }),
      el("td", { text: row.source }))));
  }

  // ------------------------------------------------------------------ logs, streamed

  function stopLogs() {
    if (state.logAbort) state.logAbort.abort();
    state.logAbort = null;
  }

  function appendLines(items) {
    const box = $("logs");
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    const fragment = document.createDocumentFragment();
    for (const item of items) {
      fragment.append(el("span", { class: "line", "data-stream": item.stream,
        title: `${item.stream} · ${item.stage || ""} · ${item.timestamp}`, text: item.line + "\n" }));
    }
    box.append(fragment);
    if (atEnd) box.scrollTop = box.scrollHeight;
  }

  async function followLogs(deployId) {
    const controller = new AbortController();
    state.logAbort = controller;
    const signal = controller.signal;
    const status = $("logs-state");
    let after = 0;
    status.textContent = "(following…)";
    while (!signal.aborted) {
      let response;
      try {
        response = await fetch(`/api/deploy/${deployId}/logs?follow=1&after=${after}`, {
          headers: authHeaders(), signal, cache: "no-store" });
      } catch (err) {
        if (signal.aborted) return;
        status.textContent = "(stream interrupted; retrying)";
        await sleep(2000, signal);
        continue;
      }
      if (!response.ok) {
        const text = await response.text();
        let body = null;
        try { body = JSON.parse(text); } catch (err) { body = null; }
        showError($("detail-error"),
          new ApiFailure("GET", `/api/deploy/${deployId}/logs`, response.status, body, text));
        status.textContent = "";
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          const parts = buffer.split("\n");
          buffer = parts.pop();
          const lines = [];
          for (const part of parts) {
            if (!part.trim()) continue; // keep-alive
            const item = JSON.parse(part);
            if (typeof item.line === "string") {
              lines.push(item);
              after = item.id;
            } else if (item.end === true) {
              appendLines(lines);
              status.textContent = `(ended: ${item.status})`;
              if (state.logAbort === controller) {
                state.logAbort = null;
                state.logsDone = deployId;
              }
              return;
            } else if (item.end === false && typeof item.next_after === "number") {
              after = item.next_after;
            }
          }
          if (lines.length) appendLines(lines);
        }
      } catch (err) {
        if (signal.aborted) return;
        status.textContent = "(stream interrupted; retrying)";
        await sleep(2000, signal);
        status.textContent = "(following…)";
      }
    }
  }

  // ------------------------------------------------------------------ rollouts
  //
  // The list (GET /api/rollouts, then "rollout" events on the live socket) and one rollout
  // (GET /api/rollouts/{id}): its batches as rows of host chips coloured by the status of
  // each host's deployment, its counts, and pause / resume / promote / abort.

  async function loadRollouts() {
    try {
      const page = await api("GET", "/api/rollouts?limit=" + ROLLOUTS_LISTED);
      for (const item of page.items) upsertRolloutQuietly(item);
      state.rolloutsTotal = page.total;
    } catch (err) {
      if (!(err instanceof ApiFailure && err.status === 404)) showError($("api-error"), err);
    }
    renderRollouts();
  }

  // The next older rollouts, by offset (a rollout made meanwhile shifts them by one: the
  // list is keyed by id, so a repeat does no harm).
  $("rollouts-older").addEventListener("click", async () => {
    const button = $("rollouts-older");
    button.disabled = true;
    try {
      const page = await api("GET", `/api/rollouts?limit=${ROLLOUTS_LISTED}&offset=${state.rolloutsListed}`);
      for (const item of page.items) upsertRolloutQuietly(item);
      state.rolloutsTotal = page.total;
      state.rolloutsListed += ROLLOUTS_LISTED;
      renderRollouts();
    } catch (err) {
      showError($("api-error"), err);
    } finally {
      button.disabled = false;
    }
  });

  function upsertRolloutQuietly(summary) {
    const known = state.rollouts.get(summary.rollout_id);
    if (!known || summary.updated_at >= known.updated_at) state.rollouts.set(summary.rollout_id, summary);
  }

  function upsertRollout(summary) {
    upsertRolloutQuietly(summary);
    renderRollouts();
    if (summary.rollout_id === state.rolloutSelected) refreshRollout();
  }

  function doneCount(summary) {
    const counts = summary.counts || {};
    let done = 0;
    for (const [status, n] of Object.entries(counts)) {
      if (TERMINAL.has(status) || status === "skipped" || status === "not_started") done += n;
    }
    return done;
  }

  function renderRollouts() {
    const items = [...state.rollouts.values()]
      .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0))
      .slice(0, state.rolloutsListed);
    const rows = items.map((r) => {
      const selected = r.rollout_id === state.rolloutSelected;
      return el("tr", { class: selected ? "selected" : null, "data-rollout-row": r.rollout_id },
        el("th", { scope: "row" },
          el("a", { href: "#rollout/" + r.rollout_id, class: "mono", "data-rollout": r.rollout_id,
            "aria-current": selected ? "true" : null,
            "aria-label": `rollout ${r.rollout_id}, ${r.type} to ${r.total} hosts, ${r.status}`,
            text: shortId(r.rollout_id) }),
          el("div", { class: "muted", text: r.command_type })),
        el("td", {}, statusBadge(r.status),
          r.paused_for ? el("div", { class: "muted", text: "paused for " + r.paused_for }) : null),
        el("td", { class: "num", text: `${doneCount(r)}/${r.total} done` + (r.failures ? `, ${r.failures} failed` : "") }),
        el("td", {}, timeNode(r.created_at)));
    });
    $("rollouts-body").replaceChildren(...rows);
    $("rollouts-empty").hidden = rows.length > 0;
    const total = Math.max(state.rolloutsTotal, state.rollouts.size);
    $("rollouts-more").hidden = total <= rows.length;
    $("rollouts-count").textContent = `${number(rows.length)} newest of ${number(total)}`;
  }

  function selectRollout(rolloutId, moveFocus) {
    if (rolloutId === state.rolloutSelected) return;
    state.rolloutSelected = rolloutId;
    state.rollout = null;
    clearError($("rollout-error"));
    clearError($("r-action-error"));
    $("r-result").textContent = "";
    renderRollouts();
    $("rollout-none").hidden = !!rolloutId;
    $("rollout-body").hidden = !rolloutId;
    $("rollout-h").textContent = rolloutId ? "Rollout " + rolloutId : "Rollout";
    $("r-batches").replaceChildren();
    if (!rolloutId) return;
    if (moveFocus) $("rollout-h").focus();
    refreshRollout();
  }

  // Read the selected rollout again: one read at a time, and once more if it changed meanwhile
  // — at most two reads a second, however many of its hosts report (the chips change colour
  // from the deployment events at once).
  async function refreshRollout() {
    if (state.rolloutBusy) {
      state.rolloutAgain = true;
      return;
    }
    state.rolloutBusy = true;
    let first = true;
    try {
      do {
        if (!first) await sleep(500);
        first = false;
        state.rolloutAgain = false;
        const rolloutId = state.rolloutSelected;
        if (!rolloutId) break;
        try {
          const view = await api("GET", "/api/rollouts/" + rolloutId);
          if (state.rolloutSelected !== rolloutId) continue;
          state.rollout = view;
          upsertRolloutQuietly(view);
          renderRollouts();
          renderRollout();
        } catch (err) {
          if (state.rolloutSelected === rolloutId) showError($("rollout-error"), err);
        }
      } while (state.rolloutAgain);
    } finally {
      state.rolloutBusy = false;
    }
  }

  // A target's deployment changed: recolour its chip now, and read the rollout again for its
  // counts and batch states.
  function rolloutTargetChanged(record) {
    const view = state.rollout;
    if (!view) return;
    const chip = document.querySelector(`#r-batches a[data-deploy="${record.deploy_id}"]`);
    if (!chip) return;
    chip.dataset.status = record.status;
    chip.title = `${chip.dataset.client}: ${record.status}` + (record.error ? ` — ${record.error}` : "");
    chip.setAttribute("aria-label", chip.title);
    refreshRollout();
  }

  function chipStatus(target) {
    if (target.status) return target.status;
    return target.state === "failed" ? "not_started" : target.state; // waiting, skipped
  }

  function renderRollout() {
    const view = state.rollout;
    if (!view) return;
    const status = $("r-status");
    status.textContent = view.status;
    status.dataset.status = view.status;
    $("r-paused").textContent = view.paused_for ? `(${view.paused_for === "canary" ? "after the canary: promote to go on" : "paused by an operator"})` : "";
    $("r-type").textContent = `${view.type} (${view.command_type})` + (view.created_by ? ` by ${view.created_by}` : "");
    const selector = view.selector && Object.keys(view.selector).length
      ? " selected by " + Object.entries(view.selector).map(([k, v]) => `${k}=${v}`).join(", ") : "";
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : word.endsWith("h") ? "es" : "s"}`;
    $("r-targets").textContent = `${plural(view.total, "host")} in ${plural(view.batch_count, "batch")}${selector}; ` +
      `batch ${view.current_batch + 1} of ${view.batch_count}`;
    $("r-failures").textContent = `${view.failures} (at most ${view.max_failures} allowed)`;
    const strategy = view.strategy || {};
    $("r-strategy").textContent = Object.entries(strategy)
      .filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => `${k} ${v}`).join(" · ");
    $("r-created").replaceChildren(timeNode(view.created_at));
    setText("r-reason-t", "r-reason", view.reason || "");

    const counts = Object.entries(view.counts || {}).sort((a, b) => b[1] - a[1]);
    $("r-counts").replaceChildren(...counts.map(([name, n]) =>
      el("span", { class: "count-chip", "data-status": name, "data-count": name, text: `${name} ${n}` })));

    const final = ROLLOUT_FINAL.has(view.status);
    $("r-pause").hidden = !(view.status === "pending" || view.status === "running");
    $("r-resume").hidden = !(view.status === "paused" && view.paused_for !== "canary");
    $("r-promote").hidden = !(view.status === "paused" && view.paused_for === "canary");
    $("r-abort").hidden = final;

    const batches = view.batches.map((batch) => {
      const chips = batch.targets.map((target) => {
        const shown = chipStatus(target);
        const title = `${target.client_id}: ${shown}` + (target.error ? ` — ${target.error}` : "") +
          (target.rollback_status ? ` (rollback ${target.rollback_status})` : "");
        const attrs = {
          class: "chip", "data-status": shown, "data-client": target.client_id,
          title, "aria-label": title, text: target.client_id,
        };
        if (target.deploy_id) {
          attrs.href = "#deploy/" + target.deploy_id;
          attrs["data-deploy"] = target.deploy_id;
          return el("a", attrs);
        }
        return el("span", attrs);
      });
      const name = batch.canary ? `Batch ${batch.index + 1} (canary)` : `Batch ${batch.index + 1}`;
      return el("li", { class: "batch", "data-batch": String(batch.index), "data-state": batch.state },
        el("div", { class: "batch-head" }, el("strong", { text: name }), " ",
          el("span", { class: "muted", text: `${batch.state} · ${batch.targets.length} hosts` })),
        el("div", { class: "chips" }, ...chips));
    });
    $("r-batches").replaceChildren(...batches);
    // The hosts that failed (or could not start), with what went wrong: the first 50.
    const failing = view.batches.flatMap((batch) => batch.targets)
      .filter((t) => FAILED.has(chipStatus(t)) || (t.rollback_status && t.rollback_status !== "rolled_back"));
    $("r-failing").replaceChildren(...failing.slice(0, 50).map((t) => el("li", { "data-client": t.client_id },
      el("strong", { text: t.client_id }), " ", statusBadge(chipStatus(t)),
      t.error ? " " + t.error : "",
      t.rollback_status ? ` · rollback ${t.rollback_status}` + (t.rollback_error ? `: ${t.rollback_error}` : "") : "",
      t.deploy_id ? " " : null,
      t.deploy_id ? el("a", { href: "#deploy/" + t.deploy_id, class: "mono", text: shortId(t.deploy_id) }) : null)));
    if (failing.length > 50) $("r-failing").append(el("li", { class: "muted", text: `… and ${failing.length - 50} more` }));
    $("r-failing-box").hidden = failing.length === 0;
    $("r-history").replaceChildren(...(view.history || []).map((h) => el("li", {},
      timeNode(h.ts), " ", statusBadge(h.status), h.message ? " " + h.message : "")));
  }

  async function controlRollout(action) {
    const rolloutId = state.rolloutSelected;
    if (!rolloutId) return;
    if (action === "abort" && !window.confirm(`Abort rollout ${rolloutId}? Nothing more starts; running deployments finish.`)) return;
    clearError($("r-action-error"));
    $("r-result").textContent = "";
    const buttons = ["r-pause", "r-resume", "r-promote", "r-abort"].map($);
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const view = await api("POST", `/api/rollouts/${rolloutId}/${action}`, {});
      if (state.rolloutSelected === rolloutId) {
        state.rollout = view;
        upsertRolloutQuietly(view);
        renderRollouts();
        renderRollout();
        $("r-result").textContent = `${action}: the rollout is ${view.status}.`;
      }
    } catch (err) {
      showError($("r-action-error"), err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  for (const action of ["pause", "resume", "promote", "abort"]) {
    $("r-" + action).addEventListener("click", () => controlRollout(action));
  }

  // ------------------------------------------------------------------ actions

  // What a shell deployment gets when the form names no strategy: the server's [defaults]
  // or the deploy type's own default, as GET /api/info tells (docs/api.md, "Rollback").
  async function loadRollbackDefault() {
    let view = null;
    try {
      const info = await api("GET", "/api/info");
      view = (info.rollback_defaults || {})["deploy.shell"] || null;
    } catch (err) {
      view = null;
    }
    state.rollbackDefault = view;
    const option = $("f-rollback-default");
    if (!view) {
      option.textContent = "the server's default (unknown)";
    } else if (view.strategy) {
      option.textContent = `default: ${view.strategy}`;
    } else {
      option.textContent = "default: none (nothing is undone)";
    }
    showRollbackChoice();
  }

  function showRollbackChoice() {
    const on = $("f-rollback-on").checked;
    const strategy = $("f-rollback").value;
    const view = state.rollbackDefault;
    $("f-rollback").disabled = !on;
    $("f-rollback-script-row").hidden = !on || strategy !== "script";
    $("f-rollback-script").required = on && strategy === "script";
    $("f-workdir").required = on && strategy === "snapshot";
    let hint;
    if (!on) hint = 'Not rolled back: the request says "rollback": false.';
    else if (strategy === "snapshot") hint = "The working directory is copied before the script runs and put back on failure; what the script started there is stopped.";
    else if (strategy) hint = `Rolled back with the ${strategy} strategy.`;
    else if (view && view.strategy) hint = `On failure: ${view.note}.`;
    else if (view) hint = `On failure nothing is undone: ${view.note}. Pick a strategy to roll back.`;
    else hint = "The server decides (its default could not be read).";
    $("f-rollback-hint").textContent = hint;
  }

  $("f-rollback").addEventListener("change", showRollbackChoice);
  $("f-rollback-on").addEventListener("change", showRollbackChoice);

  $("deploy-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("f-submit");
    clearError($("deploy-error"));
    $("deploy-result").textContent = "";
    const body = {
      client_id: $("f-client").value.trim(),
      script: $("f-script").value,
      timeout: Number($("f-timeout").value),
    };
    const workdir = $("f-workdir").value.trim();
    if (workdir) body.workdir = workdir;
    const strategy = $("f-rollback").value;
    if (!$("f-rollback-on").checked) body.rollback = false;
    else if (strategy === "inline") body.rollback = { strategy: "inline" };
    else if (strategy === "script") body.rollback = { strategy: "script", script: $("f-rollback-script").value };
    else if (strategy === "snapshot") body.rollback = { strategy: "snapshot", path: workdir };
    // else: no "rollback" field, so the server's default applies
    button.disabled = true;
    try {
      const answer = await api("POST", "/api/deploy/shell", body);
      location.hash = "#deploy/" + answer.deploy_id;
      select(answer.deploy_id, false);
      $("deploy-result").textContent = `Started deployment ${answer.deploy_id} (${answer.status}).`;
    } catch (err) {
      showError($("deploy-error"), err);
    } finally {
      button.disabled = false;
    }
  });

  $("d-rollback").addEventListener("click", async () => {
    const deployId = state.selected;
    if (!deployId || !window.confirm(`Roll back deployment ${deployId}?`)) return;
    clearError($("d-rollback-error"));
    const button = $("d-rollback");
    button.disabled = true;
    try {
      const answer = await api("POST", `/api/deploy/${deployId}/rollback`, {});
      location.hash = "#deploy/" + answer.deploy_id;
      select(answer.deploy_id, true);
      $("d-rollback-result").textContent = `Rollback ${answer.deploy_id} of ${deployId} started.`;
    } catch (err) {
      showError($("d-rollback-error"), err);
    } finally {
      button.disabled = false;
    }
  });

  // ------------------------------------------------------------------ start

  if (state.token) openSocket();
  else showLogin(null);
})();
