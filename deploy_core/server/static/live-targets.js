// "Live on each target": per client, the deployment live on each of its targets (its newest
// success not rolled back), from GET /api/clients/{id} (docs/web.md). Kept apart from app.js;
// it reads the token app.js keeps in sessionStorage and shows nothing without one.
(function () {
  "use strict";

  const TOKEN_KEY = "deploy-center.token";
  const REFRESH_MS = 5000;
  let running = false;

  async function getJSON(path, token) {
    const response = await fetch(path, { headers: { Authorization: "Bearer " + token } });
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  function cell(content) {
    const td = document.createElement("td");
    if (typeof content === "string") td.textContent = content;
    else td.appendChild(content);
    return td;
  }

  function render(rows) {
    const body = document.getElementById("live-body");
    const empty = document.getElementById("live-empty");
    if (!body || !empty) return;
    const trs = rows.map(([clientId, live]) => {
      const link = document.createElement("a");
      link.href = "#deploy/" + live.deploy_id;
      link.className = "mono";
      link.textContent = live.deploy_id;
      const tr = document.createElement("tr");
      tr.dataset.target = live.target;
      tr.append(
        cell(clientId),
        cell(live.target),
        cell(link),
        cell(live.finished_at ? new Date(live.finished_at).toLocaleString() : "")
      );
      return tr;
    });
    body.replaceChildren(...trs);
    empty.hidden = rows.length > 0;
  }

  async function refresh() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const app = document.getElementById("app");
    if (running || !token || !app || app.hidden) return;
    running = true;
    try {
      const list = await getJSON("/api/clients", token);
      const rows = [];
      for (const client of list.clients) {
        const id = encodeURIComponent(client.client_id);
        const detail = await getJSON("/api/clients/" + id, token);
        for (const live of detail.live || []) rows.push([client.client_id, live]);
      }
      render(rows);
    } catch (err) {
      // app.js reports API errors; this section keeps what it last showed.
    } finally {
      running = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    refresh();
    setInterval(refresh, REFRESH_MS);
  });
})();
