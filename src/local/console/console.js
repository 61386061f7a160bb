// zenith console: the pgs, snapshots and storages of one repo, through zenith-local's
// REST API (the same as the CLI's). Logged in by the one-time code in the link `zenith
// console` prints, traded for a session kept in this origin's local storage and sent in
// the X-Zenith-Console header (see src/local/console.rs). No framework, no build step.
"use strict";

// The view, with `nodes` as its content (nulls left out).
const view = () => ({
  replaceChildren: (...nodes) =>
    document.getElementById("view").replaceChildren(...nodes.filter((n) => n !== null && n !== undefined)),
});
let refreshTimer = null;

// ---- the API ------------------------------------------------------------------------

class ApiError extends Error {}

const SESSION = "zenith-console-session";

// Trades the login code in the address (`#code=...`) for a session, once, and takes the
// code out of the address and the history.
async function login() {
  const match = location.hash.match(/^#code=([0-9a-f]+)$/);
  if (!match) return false;
  history.replaceState(null, "", "/console#/pgs");
  const response = await fetch("/console/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ code: match[1] }),
  });
  if (!response.ok) {
    throw new ApiError("this login link is used or expired: run `zenith console` again for a new one");
  }
  localStorage.setItem(SESSION, (await response.json()).session);
  return true;
}

async function api(method, path, body) {
  const init = { method, credentials: "omit", headers: { "X-Zenith-Console": localStorage.getItem(SESSION) || "none" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError("zenith-local does not answer; is it running? (`zenith start`)");
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (response.status === 401) {
    throw new ApiError("not logged in, or the session ended: run `zenith console` and open the link it prints");
  }
  if (!response.ok) {
    throw new ApiError((data && data.error) || `zenith-local answered HTTP ${response.status}`);
  }
  return data;
}

// ---- small helpers ------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else if (k === "class") node.className = v;
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function size(bytes) {
  if (bytes === undefined || bytes === null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = bytes, u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return `${n.toFixed(u ? 1 : 0)} ${units[u]}`;
}

function ago(unixSecs) {
  if (!unixSecs) return "";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixSecs));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

// A connection string with its password hidden (the copy button copies it whole).
function masked(connstr) {
  return connstr.replace(/^(postgres(?:ql)?:\/\/[^:@/]*:)[^@]*@/, "$1•••@");
}

function label(snap) {
  return snap.name ? `${snap.name} (${snap.id.slice(0, 12)})` : snap.id;
}

function showError(message) {
  document.getElementById("error-text").textContent = message;
  document.getElementById("error").hidden = false;
}

function clearError() {
  document.getElementById("error").hidden = true;
}

// ---- long operations ----------------------------------------------------------------

// Runs `work` as a named operation: listed with its elapsed time while it runs, then
// done or failed (with the API's message); the view is refreshed afterwards.
async function operation(name, work) {
  const item = el("li", { "data-op": name }, `${name}: running…`);
  document.getElementById("ops-list").prepend(item);
  const started = Date.now();
  const tick = setInterval(() => {
    item.textContent = `${name}: running, ${Math.round((Date.now() - started) / 1000)} s`;
  }, 500);
  try {
    const result = await work();
    clearInterval(tick);
    item.textContent = `${name}: done in ${((Date.now() - started) / 1000).toFixed(1)} s`;
    item.className = "done";
    clearError();
    return result;
  } catch (e) {
    clearInterval(tick);
    item.textContent = `${name}: failed`;
    item.className = "failed";
    showError(`${name} failed: ${e.message}`);
    return undefined;
  } finally {
    route();
  }
}

// What zenith-local is doing, whoever asked (the CLI too), with progress in bytes.
async function pollOperations() {
  if (!localStorage.getItem(SESSION)) return;
  let ops;
  try { ops = await api("GET", "/operations"); } catch (e) { return; }
  const items = ops.filter((o) => o.running || o.total_bytes || o.done_bytes).map((o) => {
    const pct = o.total_bytes ? Math.min(100, Math.floor((100 * o.done_bytes) / o.total_bytes)) : null;
    const amount = o.total_bytes ? `${pct}% (${size(o.done_bytes)} of ${size(o.total_bytes)})` : size(o.done_bytes);
    const text = o.running ? `${o.what}: ${amount}`
      : o.error ? `${o.what}: failed after ${amount}` : `${o.what}: finished, ${amount}`;
    const item = el("li", { "data-what": o.what, class: o.running ? "" : o.error ? "failed" : "done" }, text);
    if (o.running && pct !== null) item.append(el("progress", { max: "100", value: String(pct) }));
    return item;
  });
  document.getElementById("ops-server").replaceChildren(...items);
}

// ---- dialogs ------------------------------------------------------------------------

// Asks a question; with `input`, resolves to the text typed (or null), else to a bool.
// With `mustType`, the ok button stays disabled until exactly that is typed.
function ask({ title, text, input, placeholder, mustType, ok }) {
  const dialog = document.getElementById("ask");
  const field = document.getElementById("ask-input");
  const okButton = document.getElementById("ask-ok");
  document.getElementById("ask-title").textContent = title;
  document.getElementById("ask-text").textContent = text || "";
  document.getElementById("ask-label").hidden = !input;
  document.getElementById("ask-label-text").textContent = input || "";
  field.value = "";
  field.placeholder = placeholder || "";
  okButton.textContent = ok || "ok";
  const check = () => { okButton.disabled = mustType !== undefined && field.value !== mustType; };
  field.oninput = check;
  check();
  return new Promise((resolve) => {
    const finish = (value) => {
      dialog.close();
      document.getElementById("ask-form").onsubmit = null;
      resolve(value);
    };
    document.getElementById("ask-cancel").onclick = () => finish(input ? null : false);
    document.getElementById("ask-form").onsubmit = (e) => {
      e.preventDefault();
      if (okButton.disabled) return;
      finish(input ? field.value.trim() : true);
    };
    dialog.showModal();
    if (input) field.focus();
  });
}

// ---- actions ------------------------------------------------------------------------

const act = (pg, body) => api("POST", `/pgs/${encodeURIComponent(pg)}/actions`, body);

async function snapshotNow(pg) {
  const tag = await ask({
    title: `Snapshot of pg ${pg}`,
    text: "A consistent snapshot, taken while it runs. A tag names it (optional).",
    input: "tag", placeholder: "before-migration", ok: "snapshot",
  });
  if (tag === null) return;
  const name = tag ? `${pg}@${tag}` : pg;
  await operation(`snapshot of ${pg}`, () => api("POST", "/snapshots", { name }));
}

async function branch(snap) {
  const name = await ask({
    title: "Branch a new pg",
    text: `A new pg from snapshot ${label(snap)}, started at once.`,
    input: "name of the new pg", ok: "create",
  });
  if (!name) return;
  await operation(`branch ${name}`, () => api("PUT", "/pgs", { name, snapshot: snap.id, start: true }));
}

async function checkout(pg, snap) {
  const yes = await ask({
    title: `Check out pg ${pg}`,
    text: `pg ${pg} goes back to ${label(snap)}. Its present state is kept as ${pg}@HEAD{0}, so nothing is lost.`,
    ok: "check out",
  });
  if (!yes) return;
  await operation(`checkout of ${pg}`, () => act(pg, { action: "checkout", snapshot: snap.id }));
}

async function restoreToTime(pg) {
  const at = await ask({
    title: `Restore pg ${pg} to a point in time`,
    text: "From the newest snapshot before it and the WAL archived in storage_dest. The present state is kept as HEAD{0}.",
    input: "time (2026-12-07 10:30:00+00) or LSN", ok: "restore",
  });
  if (!at) return;
  await operation(`restore of ${pg} to ${at}`, () => act(pg, { action: "checkout", at }));
}

async function destroy(pg) {
  const typed = await ask({
    title: `Destroy pg ${pg}`,
    text: `Its data directory is deleted. Its snapshots stay. Type the pg's name to confirm.`,
    input: "name", mustType: pg, ok: "destroy",
  });
  if (typed !== pg) return;
  await operation(`destroy ${pg}`, () => api("DELETE", `/pgs/${encodeURIComponent(pg)}`));
}

function copy(text, button) {
  const done = () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => showError("the browser refused the clipboard; select the text instead"));
  } else {
    showError("the browser offers no clipboard here; select the text instead");
  }
}

// ---- views --------------------------------------------------------------------------

async function pgsView() {
  const [status, snapshots] = await Promise.all([api("GET", "/status"), api("GET", "/snapshots")]);
  const local = status.zenith_local;
  document.getElementById("local").textContent =
    `repo ${status.repo} · zenith-local ${local.running ? `pid ${local.pid}` : "stopped"}`;
  const newest = {};
  for (const s of snapshots) if (s.pg) newest[s.pg] = s;
  const rows = status.pgs.map((p) => {
    const running = p.status === "running";
    const last = newest[p.name];
    const copyButton = el("button", { type: "button", "data-act": "copy", onclick: (e) => copy(p.connstr, e.target) }, "copy");
    return el("tr", { "data-pg": p.name },
      el("td", {}, el("a", { href: `#/pg/${encodeURIComponent(p.name)}` }, p.name)),
      el("td", { class: `status-${p.failed ? "failed" : p.status}`, "data-field": "status" }, p.failed ? `failed: ${p.failed}` : p.status),
      el("td", {}, p.primary ? `replica of ${p.primary}` : p.role),
      el("td", { class: "num" }, p.port),
      el("td", {}, el("code", { class: "connstr", "data-field": "connstr", "data-connstr": p.connstr }, masked(p.connstr)), " ", copyButton),
      el("td", {}, last ? el("span", { title: last.id }, `${last.name || last.id.slice(0, 12)}, ${last.created_at}`) : el("span", { class: "muted" }, "none")),
      el("td", { class: "num" }, p.restarts),
      el("td", {},
        running
          ? el("button", { type: "button", "data-act": "stop", onclick: () => operation(`stop ${p.name}`, () => act(p.name, { action: "stop" })) }, "stop")
          : el("button", { type: "button", "data-act": "start", onclick: () => operation(`start ${p.name}`, () => act(p.name, { action: "start" })) }, "start"),
        el("button", { type: "button", "data-act": "snapshot", onclick: () => snapshotNow(p.name) }, "snapshot now"),
        el("button", { type: "button", "data-act": "timeline", onclick: () => { location.hash = `#/pg/${encodeURIComponent(p.name)}`; } }, "timeline"),
        p.name === "main" ? null : el("button", { type: "button", class: "danger", "data-act": "destroy", onclick: () => destroy(p.name) }, "destroy")));
  });
  view().replaceChildren(
    el("h2", {}, "pgs"),
    el("table", {},
      el("thead", {}, el("tr", {}, ["name", "status", "role", "port", "connection", "last snapshot", "restarts", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
}

// Which storages hold which snapshot ids (each storage is read once per visit).
async function holders() {
  const storages = await api("GET", "/storages");
  const byId = {};
  await Promise.all(storages.map(async (s) => {
    try {
      const detail = await api("GET", `/storages/${encodeURIComponent(s.name)}`);
      for (const snap of detail.snapshots) (byId[snap.id] = byId[snap.id] || []).push(s.name);
    } catch (e) {
      showError(`storage ${s.name}: ${e.message}`);
    }
  }));
  return byId;
}

function snapshotTable(snaps, held, pgName) {
  const rows = snaps.map((s) => el("tr", { "data-snapshot": s.id, "data-name": s.name || "" },
    el("td", {}, s.created_at),
    el("td", {}, s.name || el("span", { class: "muted" }, s.id)),
    el("td", {}, s.pg || ""),
    el("td", {}, el("code", {}, s.stop_lsn)),
    el("td", { class: "num" }, size(s.total_size)),
    el("td", {}, (held[s.id] || []).join(", ") || el("span", { class: "muted" }, "this repo only")),
    el("td", {},
      el("button", { type: "button", "data-act": "branch", onclick: () => branch(s) }, "branch…"),
      pgName ? el("button", { type: "button", "data-act": "checkout", onclick: () => checkout(pgName, s) }, "check out") : null)));
  return el("table", {},
    el("thead", {}, el("tr", {}, ["time", "name", "pg", "LSN", "size", "held by", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

async function pgView(name) {
  const [snapshots, held] = await Promise.all([api("GET", "/snapshots"), holders()]);
  const mine = snapshots.filter((s) => s.pg === name).reverse();
  view().replaceChildren(
    el("h2", {}, `pg ${name}: snapshot timeline`),
    el("div", { class: "toolbar" },
      el("button", { type: "button", "data-act": "snapshot", onclick: () => snapshotNow(name) }, "snapshot now"),
      el("button", { type: "button", "data-act": "restore-to-time", onclick: () => restoreToTime(name) }, "restore to a time…")),
    mine.length ? snapshotTable(mine, held, name) : el("p", { class: "muted" }, "no snapshots of this pg yet"));
}

async function snapshotsView() {
  const [snapshots, held] = await Promise.all([api("GET", "/snapshots"), holders()]);
  view().replaceChildren(el("h2", {}, "snapshots"), snapshotTable(snapshots.slice().reverse(), held, null));
}

async function storagesView() {
  const [status, storages] = await Promise.all([api("GET", "/status"), api("GET", "/storages")]);
  const push = status.push;
  const rows = storages.map((s) => {
    const dest = s.name === "storage_dest" && push;
    return el("tr", { "data-storage": s.name },
      el("td", {}, s.name),
      el("td", {}, el("code", {}, s.url)),
      el("td", {}, dest && push.last_pushed ? `${push.last_pushed}, ${ago(push.last_pushed_unix)}` : el("span", { class: "muted" }, dest ? "not yet" : "—")),
      el("td", {}, dest && push.failures ? el("span", { class: "warn" }, `${push.failures} in a row: ${push.last_error || ""}`) : el("span", { class: "muted" }, dest ? "none" : "—")));
  });
  view().replaceChildren(
    el("h2", {}, "storages"),
    storages.length
      ? el("table", {},
        el("thead", {}, el("tr", {}, ["name", "URL", "last push", "failures"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows))
      : el("p", { class: "muted" }, "no storages: `zenith storage attach -n NAME --path URL` adds one"));
}

// ---- routing ------------------------------------------------------------------------

let routing = false;
let again = false;

async function route() {
  // One load at a time; a route asked for meanwhile runs once the load ends.
  if (routing) { again = true; return; }
  routing = true;
  const hash = location.hash || "#/pgs";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", hash.startsWith(`#/${a.dataset.nav}`));
  try {
    if (hash.startsWith("#/pg/")) await pgView(decodeURIComponent(hash.slice(5)));
    else if (hash === "#/snapshots") await snapshotsView();
    else if (hash === "#/storages") await storagesView();
    else await pgsView();
    document.body.dataset.ready = hash;
  } catch (e) {
    showError(e.message);
  } finally {
    routing = false;
    if (again) { again = false; route(); }
  }
}

function scheduleRefresh() {
  clearInterval(refreshTimer);
  // The pgs page follows status; pages that read storages are refreshed by hand.
  refreshTimer = setInterval(() => {
    const hash = location.hash || "#/pgs";
    if (hash === "#/pgs" && !document.getElementById("ask").open) route();
  }, 4000);
}

// A login link opened in a console already open only changes the address's fragment: the
// code is taken on every change of it, not only on loading.
async function start() {
  try {
    if (await login()) clearError();
    route();
  } catch (e) {
    showError(e.message);
  }
}

window.addEventListener("hashchange", start);
window.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("error-close").addEventListener("click", clearError);
  await start();
  scheduleRefresh();
  setInterval(pollOperations, 1000);
});
