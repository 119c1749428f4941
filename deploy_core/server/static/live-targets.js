// "Live on each target": per client of the page of clients shown (at most one page: a fleet's
// thousands are not read every few seconds), the deployment live on each of its targets (its
// newest success not rolled back), from GET /api/clients/{id} (docs/web.md). Kept apart from
// app.js; it reads the token app.js keeps in sessionStorage and shows nothing without one.
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
      const shown = [...document.querySelectorAll("#clients-body tr[data-client]")]
        .map((tr) => tr.dataset.client);
      const rows = [];
      for (const clientId of shown) {
        const detail = await getJSON("/api/clients/" + encodeURIComponent(clientId), token);
        for (const live of detail.live || []) rows.push([clientId, live]);
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
  // app.js shows another page of clients: read at once (the same page read again waits for
  // the timer).
  let lastShown = "";
  document.addEventListener("clients-shown", () => {
    const ids = [...document.querySelectorAll("#clients-body tr[data-client]")]
      .map((tr) => tr.dataset.client).join(" ");
    if (ids !== lastShown) {
      lastShown = ids;
      refresh();
    }
  });
})();
