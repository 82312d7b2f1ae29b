// Bearpaw console: the only script. Pages work without it; it adds the copy
// button and the live fleet table.
"use strict";

function copySecret(button) {
  const field = document.querySelector(button.dataset.copy);
  const state = document.getElementById("copy-state");
  field.select();
  const done = () => { if (state) state.textContent = "Copied."; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, () => {
      document.execCommand("copy"); done();
    });
  } else {
    document.execCommand("copy");
    done();
  }
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fmt(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
}

function renderFleet(data) {
  const reps = document.querySelector("#replicas tbody");
  const rows = data.replicas.map((r) => {
    const tr = document.createElement("tr");
    cell(tr, r.model);
    const url = document.createElement("td");
    const code = document.createElement("code");
    code.textContent = r.url;
    url.appendChild(code);
    tr.appendChild(url);
    cell(tr, r.healthy ? "healthy" : "down", r.healthy ? "ok" : "bad");
    cell(tr, r.breaker, r.breaker === "closed" ? "ok" : "bad");
    cell(tr, fmt(r.running), "n");
    cell(tr, fmt(r.waiting), "n");
    cell(tr, r.kv_pct === null ? "–" : r.kv_pct + "%", "n");
    cell(tr, fmt(r.outstanding), "n");
    cell(tr, fmt(r.requests_total), "n");
    cell(tr, fmt(r.failures_total), "n");
    cell(tr, r.took_last ? "← took the last request" : "");
    return tr;
  });
  if (rows.length) reps.replaceChildren(...rows);
  const recent = document.querySelector("#recent tbody");
  const last = data.recent.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.requestId = r.request_id;
    cell(tr, r.time);
    cell(tr, r.request_id.slice(0, 18));
    cell(tr, r.tenant);
    cell(tr, r.model);
    cell(tr, r.backend);
    cell(tr, r.status, "n");
    cell(tr, r.latency_ms + " ms", "n");
    return tr;
  });
  if (last.length) recent.replaceChildren(...last);
  document.getElementById("fleet-updated").textContent =
    "Updated " + new Date().toLocaleTimeString("en-GB") + ".";
}

function pollFleet(live) {
  const tick = () => {
    fetch(live.dataset.src, { credentials: "same-origin", cache: "no-store" })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then(renderFleet)
      .catch(() => {
        document.getElementById("fleet-updated").textContent = "Update failed; retrying.";
      })
      .finally(() => setTimeout(tick, 2000));
  };
  setTimeout(tick, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button[data-copy]").forEach((b) => {
    b.addEventListener("click", () => copySecret(b));
  });
  const live = document.getElementById("fleet-live");
  if (live) pollFleet(live);
});
