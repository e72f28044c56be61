// Live updates for the dashboard: the jobs list polls /ui/jobs.json; a job page follows the
// job's Server-Sent Events (the cookie rides along; no key in the page) and reloads once the
// job has ended so the report and artifacts appear.
"use strict";

function fmtEta(seconds) {
  return seconds === null || seconds === undefined ? "" : Math.round(seconds) + " s";
}

function liveJobsList(table) {
  const rows = new Map();
  table.querySelectorAll("tr[data-job]").forEach((tr) => rows.set(tr.dataset.job, tr));
  async function poll() {
    try {
      const res = await fetch(table.dataset.live, { credentials: "same-origin" });
      if (res.ok) {
        const body = await res.json();
        let unseen = false;
        for (const job of body.data) {
          const tr = rows.get(job.id);
          if (!tr) { unseen = true; continue; }
          const status = tr.querySelector('[data-field="status"]');
          status.textContent = job.status;
          status.className = "status status-" + job.status;
          tr.querySelector('[data-field="stage"]').textContent = job.stage || "";
          tr.querySelector('[data-field="percent"] progress').value = job.percent;
          tr.querySelector('[data-field="percent"] span').textContent = Math.round(job.percent) + "%";
          tr.querySelector('[data-field="eta_seconds"]').textContent = fmtEta(job.eta_seconds);
        }
        if (unseen) { window.location.reload(); return; }
      }
    } catch (e) { /* the next poll retries */ }
    setTimeout(poll, 2000);
  }
  setTimeout(poll, 2000);
}

function liveJob(section) {
  const events = document.querySelector("#events tbody");
  if (section.dataset.finished === "true") return;
  const source = new EventSource(section.dataset.stream);
  const seen = new Set(Array.from(document.querySelectorAll("#events tr[data-id]")).map((tr) => tr.dataset.id));
  const handle = (msg) => {
    const e = JSON.parse(msg.data);
    if (seen.has(e.id)) return;
    seen.add(e.id);
    const tr = document.createElement("tr");
    tr.dataset.id = e.id;
    tr.className = "type-" + e.type + " level-" + e.level;
    for (const text of [new Date(e.created_at * 1000).toLocaleTimeString(), e.level, e.type, e.stage || "", e.message]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    events.appendChild(tr);
    if (e.type === "progress" && e.data && e.data.total) {
      document.getElementById("job-stage").textContent = e.stage;
    }
    if (e.type === "stage_started") {
      document.getElementById("job-stage").textContent = e.stage;
      const li = document.querySelector('#timeline li[data-stage="' + e.stage + '"]');
      if (li) li.className = "stage-running";
    }
    if (e.type === "stage_completed") {
      const li = document.querySelector('#timeline li[data-stage="' + e.stage + '"]');
      if (li) li.className = "stage-done";
    }
    if (e.type === "status" && e.data && e.data.status) {
      document.getElementById("job-status").textContent = e.data.status;
    }
  };
  for (const type of ["status", "stage_started", "stage_completed", "stage_skipped", "progress", "metrics", "warning", "error"]) {
    source.addEventListener(type, handle);
  }
  // The stream closes when the job has ended: show the finished page (report, artifacts).
  source.onerror = () => { source.close(); setTimeout(() => window.location.reload(), 500); };
  pollPercent(section);
}

async function pollPercent(section) {
  // Percent and ETA live on the job row, not in every event: read them from the jobs feed.
  try {
    const res = await fetch("/ui/jobs.json", { credentials: "same-origin" });
    if (res.ok) {
      const job = (await res.json()).data.find((j) => j.id === section.dataset.job);
      if (job) {
        document.getElementById("job-progress").value = job.percent;
        document.getElementById("job-percent").textContent = Math.round(job.percent) + "%";
        document.getElementById("job-eta").textContent = fmtEta(job.eta_seconds) || "–";
      }
    }
  } catch (e) { /* retried */ }
  setTimeout(() => pollPercent(section), 2000);
}

function tryIt(form) {
  // One question to the tuned model (the cookie rides along); the answer streams in as text.
  const answer = document.getElementById("try-answer");
  const meta = document.getElementById("try-meta");
  const button = document.getElementById("try-ask");
  document.getElementById("try-question").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) form.requestSubmit();
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const question = document.getElementById("try-question").value.trim();
    if (!question) return;
    answer.textContent = "";
    answer.classList.remove("error");
    answer.dataset.state = "asking";
    button.disabled = true;
    const started = performance.now();
    try {
      const res = await fetch(form.dataset.url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ question, model: document.getElementById("try-model").value }),
      });
      if (!res.ok) {
        answer.textContent = await res.text();
        answer.classList.add("error");
      } else {
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let text = "";
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          text += decoder.decode(value, { stream: true });
          answer.textContent = text.trimStart();
        }
        answer.textContent = text.trim() || "(no text: the answer was only blank lines or special tokens)";
      }
      meta.textContent = "Answered in " + ((performance.now() - started) / 1000).toFixed(1) + " s.";
    } catch (e) {
      answer.textContent = "The request failed: " + e;
      answer.classList.add("error");
    }
    answer.dataset.state = "done";
    button.disabled = false;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const tryForm = document.getElementById("try-it");
  if (tryForm) tryIt(tryForm);
  const table = document.getElementById("jobs");
  if (table && table.dataset.live) liveJobsList(table);
  const section = document.getElementById("summary");
  if (section) liveJob(section);
  const hide = document.getElementById("hide-progress");
  if (hide) hide.addEventListener("change", () => document.getElementById("events").classList.toggle("hide-progress", hide.checked));
});
