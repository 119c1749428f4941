// Deploy Center web page: plain JavaScript, no build step, nothing from other sites.
//
// Data comes from two places, both with the operator's API token:
// - the REST API (fetch with "Authorization: Bearer"), for the current state when the page
//   connects and for one deployment's history and log stream (?follow=1, NDJSON);
// - the live socket /api/live, which pushes every changed deployment and the client list.
// The token is given to the socket as its first message (browsers cannot set headers on a
// WebSocket) and kept in sessionStorage, so it lives only as long as this tab.
"use strict";

(function () {
  const TOKEN_KEY = "deploy-center.token";
  const MAX_LISTED = 100;
  const TERMINAL = new Set(["success", "failed", "timeout", "rolled_back", "rollback_failed"]);
  const UNDONE = new Set(["rolled_back", "rollback_failed"]);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    socket: null,
    retryDelay: 1000,
    retryTimer: null,
    pingTimer: null,
    loaded: false, // the deployment list was read since the socket (re)opened
    clients: [],
    deployments: new Map(),
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
      socket.send(JSON.stringify({ type: "auth", token: state.token }));
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
      case "hello":
        state.retryDelay = 1000;
        setConn("live", `Live · signed in as ${message.caller} (${message.scope})`);
        $("login").hidden = true;
        $("app").hidden = false;
        $("signout").hidden = false;
        clearInterval(state.pingTimer);
        state.pingTimer = setInterval(() => {
          if (state.socket) state.socket.send(JSON.stringify({ type: "ping" }));
        }, 25000);
        if (state.selected) refreshSelected();
        else route();
        loadRollbackDefault();
        break;
      case "clients":
        state.clients = message.clients;
        renderClients();
        if (!state.loaded) {
          state.loaded = true;
          loadDeployments();
        }
        break;
      case "deployment":
        upsert(message.record);
        break;
      case "error":
        showError($("api-error"), new Error("live feed: " + message.error));
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ clients

  function renderClients() {
    const body = $("clients-body");
    const rows = state.clients.map((client) => {
      const caps = client.capabilities || {};
      let stateCell;
      if (client.revoked_at) {
        stateCell = el("td", {}, el("span", { class: "dot off", "aria-hidden": "true" }), "revoked ",
          timeNode(client.revoked_at));
      } else if (client.connected) {
        stateCell = el("td", {}, el("span", { class: "dot on", "aria-hidden": "true" }),
          el("strong", { text: "connected" }), " since ", timeNode(client.connected_since),
          client.remote ? el("div", { class: "muted", text: client.remote }) : null);
      } else {
        stateCell = el("td", {}, el("span", { class: "dot off", "aria-hidden": "true" }),
          el("strong", { text: "disconnected" }));
        if (client.disconnected_since) stateCell.append(" since ", timeNode(client.disconnected_since));
      }
      const list = (items) => (items && items.length ? items.join(", ") : "—");
      return el("tr", { "data-client": client.client_id, "data-connected": String(client.connected) },
        el("th", { scope: "row", text: client.client_id }),
        stateCell,
        el("td", { text: list(caps.deploy_types) }),
        el("td", { text: list(caps.health_checks) }),
        el("td", { text: list(caps.rollback_strategies) }));
    });
    body.replaceChildren(...rows);
    $("clients-empty").hidden = state.clients.length > 0;
    renderClientChoice();
  }

  function renderClientChoice() {
    const select = $("f-client");
    const current = select.value;
    const options = state.clients
      .filter((client) => !client.revoked_at)
      .map((client) => el("option", { value: client.client_id,
        text: client.client_id + (client.connected ? "" : " (disconnected)") }));
    select.replaceChildren(...options);
    const connected = state.clients.find((c) => c.connected && !c.revoked_at);
    if (current && state.clients.some((c) => c.client_id === current)) select.value = current;
    else if (connected) select.value = connected.client_id;
  }

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

  function route() {
    const match = /^#deploy\/([0-9a-f]{32})$/.exec(location.hash);
    select(match ? match[1] : null, false);
  }

  window.addEventListener("hashchange", () => {
    if (state.token && !$("app").hidden) {
      const match = /^#deploy\/([0-9a-f]{32})$/.exec(location.hash);
      select(match ? match[1] : null, true);
    }
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
      client_id: $("f-client").value,
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
