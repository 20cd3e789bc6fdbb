// The operator's dashboard: opened with the admin token (typed in, or given once in the
// address as #token=…, then kept for this tab only), pushed by taskd once a second over the
// page's WebSocket. Actions ask for confirmation; taskd logs each. Texts from jobs (recipients,
// failure reasons, results) are set as text, never as HTML.
"use strict";
(function () {
  const taskd = window.taskd;
  const $ = id => document.getElementById(id);
  const KEY = "taskd-admin-token";
  const HISTORY = 300;
  let token = null;
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem(KEY, fromHash);
    // Out of the address bar (and of what a screenshot or a shared link shows).
    history.replaceState(null, "", location.pathname + location.search);
  }
  token = sessionStorage.getItem(KEY);

  const series = { t: [], done: [], failed: [], p50: [], p99: [] };
  let charts = null;

  function hello() {
    if (token) taskd.send({ admin: "hello", token });
  }
  taskd.onopen.push(hello);

  $("token-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const given = ev.target.token.value.trim();
    if (!given) return;
    token = given;
    sessionStorage.setItem(KEY, token);
    ev.target.token.value = "";
    $("token-status").textContent = "";
    hello();
  });

  function makeCharts() {
    const width = Math.max(300, $("chart-jobs").clientWidth || 500);
    const opts = (s1, s2) => ({
      width, height: 180,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      series: [{}, s1, s2],
      axes: [{}, { size: 64 }],
    });
    charts = window.taskdCharts = {
      jobs: new uPlot(opts({ label: "done/s", stroke: "#1b7f3b", fill: "rgba(27,127,59,.1)" },
                           { label: "failed/s", stroke: "#b3261e" }),
                      [series.t, series.done, series.failed], $("chart-jobs")),
      latency: new uPlot(opts({ label: "p50", stroke: "#3465a4", spanGaps: true },
                              { label: "p99", stroke: "#a66b00", spanGaps: true }),
                         [series.t, series.p50, series.p99], $("chart-latency")),
    };
  }

  function addSample(s) {
    series.t.push(s.t); series.done.push(s.done); series.failed.push(s.failed);
    series.p50.push(s.p50); series.p99.push(s.p99);
    for (const k in series) if (series[k].length > HISTORY) series[k].shift();
  }

  function redraw() {
    if (!charts) makeCharts();
    charts.jobs.setData([series.t, series.done, series.failed]);
    charts.latency.setData([series.t, series.p50, series.p99]);
  }

  const restarts = new Map();
  function processes(list) {
    const rows = list.map(p => {
      const name = p.role + (p.slot === null || p.slot === undefined ? "" : " " + p.slot);
      const job = p.job ? `${p.job.task_id} ${p.job.type || ""} ${p.job.to || ""}`.trim() +
        (p.job.running_ms !== null && p.job.running_ms !== undefined ? ` (${(p.job.running_ms / 1000).toFixed(1)} s)` : "") : "";
      const tr = taskd.cells(document.createElement("tr"), [
        name, p.pid, p.state, p.served, p.restarts,
        p.rss_kib === null || p.rss_kib === undefined ? "" : (p.rss_kib / 1024).toFixed(1) + " MiB", job]);
      tr.dataset.role = p.role;
      if (p.slot !== null && p.slot !== undefined) tr.dataset.slot = p.slot;
      tr.dataset.pid = p.pid || "";
      tr.dataset.restarts = p.restarts || 0;
      // A process replaced since the last push is marked for a while.
      const key = name, before = restarts.get(key);
      if (before !== undefined && (p.restarts || 0) > before.n) before.until = Date.now() + 10000;
      restarts.set(key, { n: p.restarts || 0, until: before ? before.until : 0 });
      if (restarts.get(key).until > Date.now()) tr.className = "restarted";
      return tr;
    });
    $("dash-procs").tBodies[0].replaceChildren(...rows);
  }

  function failures(list) {
    $("failures").tBodies[0].replaceChildren(...list.map(f => {
      const tr = taskd.cells(document.createElement("tr"), [
        new Date(f.t).toLocaleTimeString(), f.task_id, f.type, f.to, f.attempts, f.error]);
      tr.cells[5].className = "reason";
      return tr;
    }));
  }

  function durable(d) {
    $("durable").hidden = false;
    if (d.nodes) {
      $("nodes").tBodies[0].replaceChildren(...d.nodes.map(n => taskd.cells(document.createElement("tr"),
        [n.node, n.state, n.lease_ms === null || n.lease_ms === undefined ? "" : `${(n.lease_ms / 1000).toFixed(1)} s left`,
         n.consumers === undefined ? "" : n.consumers])));
    }
    if (d.dead) {
      $("dead").tBodies[0].replaceChildren(...d.dead.map(x => {
        const tr = taskd.cells(document.createElement("tr"), [x.id, x.task_id, x.type, x.to, x.reason, ""]);
        tr.dataset.id = x.id;
        tr.cells[4].className = "reason";
        for (const [action, label] of [["replay", "replay"], ["discard", "discard"]]) {
          const b = document.createElement("button");
          b.textContent = label;
          b.className = action;
          b.addEventListener("click", () => act({ admin: action, id: x.id },
            `${label === "replay" ? "Run" : "Delete"} dead letter ${x.id} (task ${x.task_id}${x.to ? ", to " + x.to : ""})${label === "replay" ? " again" : " for good"}?`));
          tr.cells[5].appendChild(b);
        }
        return tr;
      }));
    }
  }

  function dashboard(m) {
    if (m.history) { for (const k in series) series[k].length = 0; m.history.forEach(addSample); }
    if (m.sample) addSample(m.sample);
    const last = m.sample || (m.history && m.history[m.history.length - 1]);
    if (last) {
      $("tile-jobs").textContent = last.done;
      $("tile-p50").textContent = last.p50 === null ? "–" : last.p50;
      $("tile-p99").textContent = last.p99 === null ? "–" : last.p99;
    }
    const q = m.queues;
    $("tile-queued").textContent = q.queued;
    $("tile-running").textContent = q.running;
    $("tile-retrying").textContent = q.retrying;
    $("tile-limited").textContent = q.rate_limited;
    $("tile-done").textContent = m.totals.done;
    $("tile-failed").textContent = m.totals.failed;
    processes(m.processes);
    failures(m.failures);
    if (m.durable) durable(m.durable);
    $("status").textContent = `dashboard: ${m.totals.connections} connection(s), ${m.task_worker_num} of at most ` +
      `${m.task_worker_max} task processes, up ${Math.round(m.uptime_ms / 1000)} s`;
    redraw();
  }

  function act(req, question) {
    if (question && !confirm(question)) return;
    taskd.send(req);
  }

  for (const b of document.querySelectorAll(".actions button[data-action]")) {
    b.addEventListener("click", () => {
      const a = b.dataset.action;
      const q = a === "grow" ? "Add one task process?" : a === "shrink" ? "Remove one task process (it finishes its jobs first)?"
        : `Reload every ${b.dataset.role} process, one at a time?`;
      act({ admin: a, role: b.dataset.role }, q);
    });
  }
  $("lookup").addEventListener("submit", ev => {
    ev.preventDefault();
    // Reads only: nothing to confirm.
    act({ admin: "lookup", task_id: ev.target.task_id.value.trim() });
  });

  taskd.handlers.push(m => {
    if (m.event === "dashboard") { dashboard(m); return true; }
    if (m.event === "admin") {
      if (m.action === "hello" && m.ok) {
        taskd.dashboard = true;
        $("dashboard").hidden = false;
        $("token-form").hidden = true;
        $("procs").hidden = true;
        $("jobs-title").hidden = false;
        return true;
      }
      $("action-result").textContent = JSON.stringify(m);
      return true;
    }
    if (m.event === "error" && /^admin /.test(m.error)) {
      if (m.error === "admin token refused") {
        sessionStorage.removeItem(KEY);
        token = null;
        $("token-status").textContent = "the token was refused";
      } else {
        $("action-result").textContent = m.error;
      }
      return true;
    }
    return false;
  });
})();
