// The job form and the live list of jobs: what the page offers to everyone on this host.
// Every text that comes from a job reaches the page as text (textContent), never as HTML.
"use strict";
const taskd = window.taskd = { ws: null, handlers: [], onopen: [] };
const rows = new Map();
const status = document.getElementById("status");
const list = document.getElementById("joblist");
const MAX_ROWS = 100;

function cells(tr, values) {
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = v === undefined || v === null ? "" : String(v);
    tr.appendChild(td);
  }
  return tr;
}
taskd.cells = cells;

function row(id) {
  let tr = rows.get(id);
  if (!tr) {
    tr = cells(document.createElement("tr"), ["", "", "", "", ""]);
    tr.id = "job-" + id;
    list.prepend(tr);
    rows.set(id, tr);
    // The newest jobs only: a page left open under load must not grow without end.
    while (list.rows.length > MAX_ROWS) {
      const old = list.rows[list.rows.length - 1];
      rows.delete(Number(old.cells[0].textContent));
      old.remove();
    }
  }
  return tr;
}

function show(reply) {
  for (const h of taskd.handlers) if (h(reply)) return;
  if (reply.event === "stats") return procs(reply);
  if (reply.event === "error") {
    const tr = cells(document.createElement("tr"), ["–", "", "", "error", reply.error]);
    tr.className = "error";
    list.prepend(tr);
    return;
  }
  if (reply.task_id === undefined) return;
  const tr = row(reply.task_id);
  tr.className = reply.event;
  tr.cells[0].textContent = reply.task_id;
  if (reply.type) tr.cells[1].textContent = reply.type;
  if (reply.to) tr.cells[2].textContent = reply.to;
  tr.cells[3].textContent = reply.event;
  if (reply.event === "done") tr.cells[4].textContent = reply.result || JSON.stringify(reply.results);
  if (reply.event === "failed") tr.cells[4].textContent = reply.error;
}

function procs(stats) {
  const body = document.getElementById("proclist");
  body.replaceChildren(...stats.processes.map(p => {
    const name = p.role + (p.slot === undefined ? "" : " " + p.slot);
    return cells(document.createElement("tr"), [name, p.pid, p.state || "", p.served === undefined ? "" : p.served]);
  }));
  status.textContent = `connected: ${stats.connection_num} connection(s), ${stats.tasks_done} done, ` +
    `${stats.tasks_failed} failed, ${stats.tasking_num} running`;
}

function submit(type, to, text) {
  const job = { type, to };
  if (text) job[type === "sms" ? "text" : "body"] = text;
  taskd.ws.send(JSON.stringify(job));
}

taskd.send = obj => { if (taskd.ws && taskd.ws.readyState === 1) taskd.ws.send(JSON.stringify(obj)); };

function connect() {
  const ws = taskd.ws = new WebSocket(`ws://${location.host}/`);
  ws.onopen = () => {
    status.textContent = "connected";
    ws.send("stats");
    for (const f of taskd.onopen) f();
    // A link can carry a job to send at once: /?submit=alice@example.com
    const auto = new URLSearchParams(location.search).get("submit");
    if (auto) submit(auto.includes("@") ? "email" : "sms", auto, "");
  };
  ws.onmessage = ev => ev.data.split("\n").filter(Boolean).forEach(l => show(JSON.parse(l)));
  ws.onclose = () => { status.textContent = "disconnected; retrying…"; setTimeout(connect, 1000); };
}

document.getElementById("job").addEventListener("submit", ev => {
  ev.preventDefault();
  const f = ev.target;
  submit(f.type.value, f.to.value.trim(), f.text.value.trim());
  f.to.value = ""; f.text.value = "";
});
// Without the dashboard, the process list is refreshed from `stats`; the dashboard is pushed.
setInterval(() => { if (!taskd.dashboard && taskd.ws && taskd.ws.readyState === 1) taskd.ws.send("stats"); }, 2000);
window.addEventListener("DOMContentLoaded", connect);
