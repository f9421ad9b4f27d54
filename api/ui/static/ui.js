// crmflow dashboard: the live list of executions (server-sent events) and the buttons.
"use strict";

function flash(message, ok) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = ok ? "flash ok" : "flash";
  box.hidden = false;
}

async function post(url) {
  const response = await fetch(url, { method: "POST", headers: { Accept: "application/json" } });
  let body = {};
  try { body = await response.json(); } catch (e) { /* not JSON: keep the status */ }
  if (response.status === 401) { window.location.reload(); }  // logged out: to the form
  if (!response.ok) { throw new Error(body.detail || `HTTP ${response.status}`); }
  return body;
}

function setBadge(badge, status) {
  badge.textContent = status;
  badge.className = badge.className.replace(/\bstatus-\S+/, "") + " status-" + status;
}

async function toggleWorkflow(button) {
  const id = button.dataset.id;
  const verb = button.dataset.status === "active" ? "pause" : "activate";
  button.disabled = true;
  try {
    const body = await post(`/ui/workflows/${id}/${verb}`);
    button.dataset.status = body.status;
    button.textContent = body.status === "active" ? "Pause" : "Activate";
    const row = button.closest("tr");
    setBadge(row.querySelector("[data-field=status]"), body.status);
    flash(`Workflow ${id} is ${body.status}.`, true);
  } catch (error) {
    flash(`Could not ${verb} workflow ${id}: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

async function replay(button) {
  const id = button.dataset.id;
  button.disabled = true;
  try {
    const body = await post(`/ui/executions/${id}/replay`);
    const row = button.closest("tr");
    const badge = row && row.querySelector("[data-field=status]");
    if (badge) { setBadge(badge, body.status); }
    button.remove();
    flash(`Execution ${id} is replaying (${body.status}).`, true);
  } catch (error) {
    button.disabled = false;
    flash(`Could not replay execution ${id}: ${error.message}`);
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) { return; }
  if (button.dataset.action === "toggle-workflow") { toggleWorkflow(button); }
  if (button.dataset.action === "replay") { replay(button); }
});

// ── live executions ──

function cell(text, className) {
  const td = document.createElement("td");
  if (className) { td.className = className; }
  if (text instanceof Node) { td.appendChild(text); } else { td.textContent = text; }
  return td;
}

function when(iso) {
  if (!iso) { return "–"; }
  const time = document.createElement("time");
  time.dateTime = iso;
  time.textContent = iso.replace("T", " ").slice(0, 19);
  return time;
}

function executionRow(x) {
  const tr = document.createElement("tr");
  tr.dataset.executionId = x.id;
  const link = document.createElement("a");
  link.href = `/ui/executions/${x.id}`;
  link.textContent = x.id;
  const workflow = document.createElement("span");
  workflow.append(`${x.workflow_name} `);
  const version = document.createElement("span");
  version.className = "dim";
  version.textContent = `v${x.workflow_version}`;
  workflow.append(version);
  const badge = document.createElement("span");
  badge.className = `badge status-${x.status}`;
  badge.textContent = x.status;
  const id = typeof x.entity_id === "object" && x.entity_id !== null ? JSON.stringify(x.entity_id) : x.entity_id;
  tr.append(
    cell(link), cell(workflow), cell(x.entity_type ? `${x.entity_type} ${id}` : "–"), cell(badge),
    cell(when(x.triggered_at)), cell(when(x.finished_at)), cell(String(x.actions_count), "num"),
    cell(x.error || "", "error-text"),
  );
  return tr;
}

function followExecutions(table) {
  const body = table.tBodies[0];
  const state = document.getElementById("live-state");
  const maxRows = parseInt(table.dataset.rows, 10) || 100;
  const source = new EventSource(table.dataset.live);
  source.onopen = () => { state.textContent = "live updates: connected"; };
  source.onerror = () => { state.textContent = "live updates: reconnecting…"; };
  // The session ended (logged out elsewhere, expired, key revoked): to the login form.
  source.addEventListener("logout", () => { source.close(); window.location.reload(); });
  source.addEventListener("execution", (event) => {
    const x = JSON.parse(event.data);
    const row = executionRow(x);
    const old = body.querySelector(`tr[data-execution-id="${x.id}"]`);
    if (old) {
      old.replaceWith(row);
    } else {
      // Newest first: before the first row with a smaller id.
      const next = Array.from(body.rows).find((r) => Number(r.dataset.executionId) < x.id);
      body.insertBefore(row, next || null);
      row.classList.add("fresh");
      while (body.rows.length > maxRows) { body.deleteRow(body.rows.length - 1); }
    }
  });
  window.addEventListener("pagehide", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("table[data-live]");
  if (table) { followExecutions(table); }
});
