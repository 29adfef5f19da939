// DPIP dashboard: plain JavaScript, no build step, no CDN. The token lives in sessionStorage;
// live data comes from GET /events (server-sent events read with fetch, so the token travels
// in the Authorization header and never in a URL): a whole snapshot first, then its changes.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: sessionStorage.getItem("dpip-token"), user: sessionStorage.getItem("dpip-user"),
                snapshot: null, refreshed: 0, history: new Map(), stream: null, thumbs: new Map() };

// -- HTTP -------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401 && path !== "/login") { logout(false); throw new Error("session expired: log in again"); }
  if (!resp.ok) {
    let message = `HTTP ${resp.status}`;
    try { message = (await resp.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

// -- login ------------------------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const user = $("#user").value, password = $("#password").value;
  $("#login-error").textContent = "";
  try {
    const resp = await api("/login", { method: "POST",
      headers: { Authorization: "Basic " + btoa(unescape(encodeURIComponent(`${user}:${password}`))) } });
    const body = await resp.json();
    state.token = body.token; state.user = body.user;
    sessionStorage.setItem("dpip-token", state.token); sessionStorage.setItem("dpip-user", state.user);
    $("#password").value = "";
    start();
  } catch (e) { $("#login-error").textContent = e.message; }
}

function logout(revoke = true) {
  if (revoke && state.token) fetch("/logout", { method: "DELETE", headers: { Authorization: `Bearer ${state.token}` } });
  state.token = null; sessionStorage.removeItem("dpip-token");
  if (state.stream) state.stream.abort();
  route();
}

// -- live stream ------------------------------------------------------------------------------

async function follow() {
  const controller = new AbortController();
  state.stream = controller;
  while (state.token && !controller.signal.aborted) {
    try {
      const resp = await api("/events", { signal: controller.signal });
      setLive(true);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const lines = message.split("\n");
          const type = (lines.find((l) => l.startsWith("event: ")) || "event: message").slice(7);
          const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) onEvent(type, JSON.parse(data));  // a ": keep-alive" comment has no data
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, 2000));  // the server restarted or the network blinked
  }
}

function setLive(on) { const el = $("#live"); el.textContent = on ? "live" : "offline"; el.classList.toggle("off", !on); el.hidden = !state.token; }

// The stream's first event is the whole snapshot; then come only its changes, to merge in.
function onEvent(type, body) {
  if (type === "snapshot") state.snapshot = body;
  else if (type === "changes" && state.snapshot) merge(state.snapshot, body);
  else return;
  refresh();
}

function merge(snap, changes) {
  snap.server_time = changes.server_time;
  if (changes.workers) snap.workers = mergeList(snap.workers, changes.workers, "name");
  if (changes.workloads) snap.workloads = mergeList(snap.workloads, changes.workloads, "workload_id");
  for (const k of ["queued_jobs", "autoscale", "servers"]) if (k in changes) snap[k] = changes[k];
}

// set: entries new or changed (replaced in place, new ones last); removed: keys gone; order:
// every key in order, sent only when that merge would not give it
function mergeList(list, { set = [], removed = [], order }, key) {
  const fresh = new Map(set.map((x) => [x[key], x]));
  const gone = new Set(removed);
  const out = list.filter((x) => !gone.has(x[key])).map((x) => {
    const y = fresh.get(x[key]);
    fresh.delete(x[key]);
    return y || x;
  });
  out.push(...fresh.values());
  if (order) { const at = new Map(order.map((k, i) => [k, i])); out.sort((a, b) => at.get(a[key]) - at.get(b[key])); }
  return out;
}

function refresh() {
  const now = Date.now();
  state.refreshed = now;
  for (const w of state.snapshot.workloads) {  // keep ~10 s of (time, finished) to compute a rate
    const h = state.history.get(w.workload_id) || [];
    h.push([now, w.filtered + w.failed]);
    while (h.length > 1 && now - h[0][0] > 10000) h.shift();
    state.history.set(w.workload_id, h);
  }
  renderHome();
  renderWorkload();
}

// a quiet stream sends nothing: sample and redraw anyway, so that a rate falls to 0
setInterval(() => { if (state.token && state.snapshot && Date.now() - state.refreshed >= 1000) refresh(); }, 1000);

// -- rendering --------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function meter(percent, kind) {
  const p = Math.max(0, Math.min(100, percent || 0));
  const bar = el("div", { class: `bar ${kind}` }, el("div", { style: `width:${p}%` }));
  return el("div", { class: "meter" }, bar, el("span", {}, `${p.toFixed(0)}%`));
}

function rate(id) {
  const h = state.history.get(id) || [];
  if (h.length < 2) return 0;
  const [t0, n0] = h[0], [t1, n1] = h[h.length - 1];
  return t1 > t0 ? (n1 - n0) / ((t1 - t0) / 1000) : 0;
}

function renderHome() {
  const snap = state.snapshot;
  if (!snap) return;
  const alive = snap.workers.filter((w) => w.alive).length;
  const scale = snap.autoscale ? ` · autoscale ${snap.autoscale.minimum}..${snap.autoscale.maximum}: ${snap.autoscale.last_action.action} (${snap.autoscale.last_action.reason})` : "";
  $("#workers-summary").textContent = `${alive} alive of ${snap.workers.length}${scale}`;
  const servers = snap.servers || [];
  $("#servers").textContent = servers.length > 1 || servers.some((s) => !s.leader)
    ? "servers: " + servers.map((s) => `${s.name}${s.leader ? " (schedules)" : s.alive ? " (standby)" : " (gone)"}${s.this_server ? " ← this one" : ""}`).join(", ")
    : "";
  $("#workers tbody").replaceChildren(...snap.workers.map((w) => el("tr", { "data-worker": w.name, class: w.alive ? "alive" : "dead" },
    el("td", {}, w.name, w.autoscaled ? el("span", { class: "auto", title: "started by the autoscaler" }, " auto") : ""),
    el("td", {}, el("span", { class: `pill ${w.alive ? "alive" : "dead"}` }, w.alive ? "alive" : "gone")),
    el("td", {}, w.tags.join(", ") || "–"),
    el("td", { class: "plugins", title: (w.filters || []).join(", ") },  // what it runs beyond the built-ins
      Object.entries(w.filter_versions || {}).map(([n, v]) => `${n} ${v}`).join(", ") || "built-ins"),
    el("td", {}, w.alive ? meter(w.cpu_percent, "cpu") : "–"),  // a worker that left has no load to show
    el("td", {}, w.alive ? meter(w.memory_percent, "mem") : "–"),
    el("td", {}, w.gpu && w.gpu.count ? meter(w.gpu.utilization_percent, "gpu") : "none"),
    el("td", { class: "num" }, `${w.running_jobs}/${w.capacity}`),
    el("td", { class: "num" }, w.jobs_done))));
  $("#queued").textContent = `${snap.queued_jobs} jobs queued`;
  const rows = [...snap.workloads].reverse().map((w) => {
    const total = w.images || 0, finished = w.filtered + w.failed;
    const pct = total ? Math.round((100 * finished) / total) : 0;
    return el("tr", { class: "clickable", "data-workload": w.workload_id, onclick: () => { location.hash = `#/workloads/${w.workload_id}`; } },
      el("td", {}, w.workload_name), el("td", {}, w.filter),
      el("td", {}, el("span", { class: `pill ${w.status}` }, w.status),
        partialOf(w) ? el("span", { class: "pill partial", title: "an interrupted push" }, ` partial (${total} of ${partialOf(w)})`) : ""),
      el("td", {}, el("div", { class: "meter" }, el("div", { class: "bar" }, el("div", { style: `width:${pct}%` })),
        el("span", { class: "progress" }, `${pct}%`), el("span", {}, `${finished}/${total}`))),
      el("td", { class: "num" }, `${rate(w.workload_id).toFixed(1)}/s`),
      el("td", { class: "num" }, w.failed), el("td", { class: "num" }, w.running_jobs));
  });
  $("#workloads tbody").replaceChildren(...rows);
}

function currentWorkload() {
  const m = location.hash.match(/^#\/workloads\/([\w-]+)/);
  return m ? m[1] : null;
}

function renderWorkload() {
  const id = currentWorkload();
  const w = id && state.snapshot && state.snapshot.workloads.find((x) => x.workload_id === id);
  if (!w) return;
  const total = w.images || 0, finished = w.filtered + w.failed;
  $("#wl-title").textContent = `${w.workload_name} (${w.filter})`;
  $("#wl-summary").textContent = `${w.status}: ${w.filtered} filtered, ${w.failed} failed, ${w.running_jobs} running, of ${total} images; ${rate(id).toFixed(1)} images/s`;
  const expected = partialOf(w);
  $("#wl-partial").hidden = !expected;
  $("#wl-partial").textContent = expected ? `partial: ${total} of the ${expected} images its client meant to upload arrived (an interrupted push: resume it)` : "";
  $("#wl-bar").style.width = `${total ? (100 * finished) / total : 0}%`;
  $("#wl-failures").replaceChildren(...(w.failed_images || []).map((f) => el("li", {}, `image ${f.image_id}: ${f.reason}`)));
  renderGallery(w).catch(() => {});
}

// A push that stopped half-way: its client said how many images it would send (meta).
function partialOf(w) {
  const expected = w.meta && Number.isInteger(w.meta.expected_images) ? w.meta.expected_images : 0;
  return expected > (w.images || 0) ? expected : 0;
}

async function deleteWorkload() {
  const id = currentWorkload();
  const w = id && state.snapshot && state.snapshot.workloads.find((x) => x.workload_id === id);
  if (!w || !window.confirm(`Delete workload ${w.workload_name} and its ${w.images || 0} images? This cannot be undone.`)) return;
  try {
    const removed = await (await api(`/workloads/${id}`, { method: "DELETE" })).json();
    $("#wl-delete-status").textContent = `deleted ${removed.workload_name}: ${removed.images} images, ${removed.filtered_images} results`;
    state.snapshot.workloads = state.snapshot.workloads.filter((x) => x.workload_id !== id);
    location.hash = "#/";
  } catch (e) { $("#wl-delete-status").textContent = `not deleted: ${e.message}`; }
}

const fetchSlots = { free: 4, waiting: [] };  // a big gallery must not fire hundreds of requests at once

async function limited(work) {
  if (fetchSlots.free > 0) fetchSlots.free--; else await new Promise((r) => fetchSlots.waiting.push(r));
  try { return await work(); } finally {
    const next = fetchSlots.waiting.shift();
    if (next) next(); else fetchSlots.free++;
  }
}

async function thumb(workloadId, imageId, type) {
  const key = `${workloadId}/${type}/${imageId}`;
  if (!state.thumbs.has(key)) {
    state.thumbs.set(key, limited(() => api(`/images/${imageId}?workload_id=${workloadId}&type=${type}&size=small`))
      .then((r) => r.blob()).then((b) => URL.createObjectURL(b))
      .catch((e) => { state.thumbs.delete(key); throw e; }));
  }
  return state.thumbs.get(key);
}

const gallery = { workload: null, count: -1, ids: [], info: new Map(), shown: new Set() };

async function renderGallery(w) {
  const box = $("#gallery");
  if (gallery.workload !== w.workload_id) {  // another workload: drop the old tiles and their blobs
    for (const url of state.thumbs.values()) url.then((u) => URL.revokeObjectURL(u)).catch(() => {});
    state.thumbs.clear();
    Object.assign(gallery, { workload: w.workload_id, count: -1, ids: [], info: new Map(), shown: new Set() });
    box.replaceChildren();
  }
  if (gallery.count !== w.images) {  // ids may have gaps (clients may choose them): ask for the list
    gallery.count = w.images;
    const list = await (await api(`/images?workload_id=${w.workload_id}&type=original`)).json();
    gallery.ids = list.map((e) => e.image_id);
    gallery.info = new Map(list.map((e) => [e.image_id, e]));
  }
  const filtered = new Set(w.filtered_images);
  for (const i of gallery.ids) {
    let pair = box.querySelector(`[data-image="${i}"]`);
    if (!pair) {
      const info = (gallery.info && gallery.info.get(i)) || {};
      const photo = info.photo || {};
      const where = photo.gps
        ? el("a", { class: "where", href: `https://www.openstreetmap.org/?mlat=${photo.gps.lat}&mlon=${photo.gps.lon}#map=15/${photo.gps.lat}/${photo.gps.lon}`,
                    target: "_blank", rel: "noopener", title: "where it was taken" }, ` taken at ${photo.gps.lat.toFixed(4)}, ${photo.gps.lon.toFixed(4)}`)
        : "";
      const caption = [info.filename || `image ${i}`, photo.camera, photo.taken_at && photo.taken_at.replace("T", " ")].filter(Boolean).join(" · ");
      pair = el("div", { class: "pair", "data-image": i },
        el("div", { class: "imgs" }, el("img", { class: "original", alt: `original ${i}` }), el("div", { class: "missing filtered-slot" }, "waiting")),
        el("p", {}, caption, where));
      box.append(pair);
      thumb(w.workload_id, i, "original").then((url) => { pair.querySelector("img.original").src = url; }).catch(() => {});
    }
    if (filtered.has(i) && !gallery.shown.has(i)) {
      gallery.shown.add(i);
      thumb(w.workload_id, i, "filtered").then((url) => {
        pair.querySelector(".filtered-slot").replaceWith(el("img", { class: "filtered", alt: `filtered ${i}`, src: url }));
      }).catch(() => gallery.shown.delete(i));
    }
  }
}

// -- upload -----------------------------------------------------------------------------------

async function uploadFiles(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|gif|bmp|webp|tiff?)$/i.test(f.name));
  const status = $("#upload-status");
  if (!images.length) { status.textContent = "no image files in that drop"; return; }
  images.sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
  try {
    const steps = $("#new-pipeline").value.trim();
    const body = { filter: steps || $("#new-filter").value };
    if (!steps) {  // the filter's own parameters, as the course's form gives them
      for (const input of document.querySelectorAll("#new-params .param")) if (input.value !== "") body[input.name] = input.value;
    }
    if ($("#new-name").value.trim()) body.workload_name = $("#new-name").value.trim();
    const w = await (await api("/workloads", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(body) })).json();
    let sent = 0;
    for (const [i, file] of images.entries()) {  // ids follow the names' natural order
      const form = new FormData();
      form.append("workload_id", w.workload_id); form.append("image_id", i); form.append("data", file, file.name);
      await api("/images", { method: "POST", body: form });
      status.textContent = `uploaded ${++sent}/${images.length} to ${w.workload_name}`;
    }
    $("#new-name").value = "";
  } catch (e) { status.textContent = `upload failed: ${e.message}`; status.classList.add("error"); }
}

// -- the filters and their parameters, from the server's registry ----------------------------

async function loadFilters() {
  const r = await fetch("/filters", { headers: state.token ? { Authorization: `Bearer ${state.token}` } : {} });
  if (!r.ok) return;
  const list = await r.json();  // this server's and (for a user) every live worker's, with how many run each
  const select = $("#new-filter");
  select.replaceChildren(...list.map((f) => el("option", { value: f.name, title: f.help },
    f.workers ? f.name : `${f.name} (no live worker)`)));
  const input = (p) => p.type === "string"
    ? el("select", { name: p.name, class: "param" }, ...p.enum.map((v) => el("option", { value: v }, v)))
    : el("input", { name: p.name, type: "number", min: p.minimum, max: p.maximum, step: p.type === "integer" ? 1 : "any",
                    placeholder: p.default === null ? "" : String(p.default), class: "param" });
  const showParams = () => {
    const f = list.find((x) => x.name === select.value);
    $("#new-params").replaceChildren(...(f ? f.params : []).map((p) => el("label", { title: p.help }, `${p.name} `, input(p))));
  };
  select.addEventListener("change", showParams);
  showParams();
}

function setupDrop() {
  const zone = $("#dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); uploadFiles(e.dataTransfer.files); });
  $("#file-input").addEventListener("change", (e) => uploadFiles(e.target.files));
}

// -- routing ----------------------------------------------------------------------------------

function route() {
  const loggedIn = Boolean(state.token);
  $("#login-view").hidden = loggedIn;
  $("#logout").hidden = !loggedIn;
  $("#whoami").textContent = loggedIn ? state.user : "";
  if (!loggedIn) $("#live").hidden = true;  // nothing to be live about before logging in
  const id = currentWorkload();
  $("#home-view").hidden = !loggedIn || Boolean(id);
  $("#workload-view").hidden = !loggedIn || !id;
  if (loggedIn) { renderHome(); renderWorkload(); }
}

function start() {
  route();
  loadFilters();  // with the token now: the workers' plugins too
  if (!state.stream || state.stream.signal.aborted) follow();
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", () => logout(true));
  $("#wl-delete").addEventListener("click", deleteWorkload);
  setupDrop();
  if (state.token) start(); else { loadFilters(); route(); }
});
