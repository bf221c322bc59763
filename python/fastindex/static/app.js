// The page: pick a dataset, watch its progress live, browse its samples page by page as they
// arrive, search them once embeddings exist. No build step: plain ES modules.

import * as API from "./api.js";
import { Gallery, picture, displaySize } from "./gallery.js";
import { ProgressFeed } from "./live.js";
import { FilterBar } from "./filters.js";

const { fmt, h } = API;
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const PAGE_SIZE = Math.min(500, Math.max(12, Number(params.get("page_size")) || 60));
// While samples arrive the page reloads what it shows, at most this often, and never more
// than ~10% of the time a load takes the server (deep pages of a huge dataset cost more).
const REFRESH_MS = 700;
const FAILED_REFRESH_MS = 2000;
const FAILED_PAGE = 50;

const state = {
  datasets: [],
  ds: null, // the dataset shown: {id, name, embeddings, progress}
  p: null, // its latest progress
  feed: null,
  filter: "",
  page: 0,
  view: "browse", // or "results" (search / similar)
  items: [],
  lastRefresh: 0,
  refreshTimer: null,
  loadMs: 0, // how long the last page took to load
  loading: null, // AbortController of the page being loaded
  failedShown: 0,
  failedCount: -1,
  failedTimer: null,
  lastFailed: 0,
  failedMs: 0,
};

const gallery = new Gallery($("gallery"), { onOpen: openSample, onSimilar: showSimilar });
const filterBar = new FilterBar($("facets"), $("filters"), () => {
  state.page = 0;
  if (state.view !== "browse") backToBrowse();
  else loadPage();
});

// -- datasets ----------------------------------------------------------------------------------
async function loadDatasets() {
  state.datasets = await API.datasets();
  const select = $("dataset-select");
  select.replaceChildren(
    ...state.datasets.map((d) =>
      h("option", { value: d.id }, `${d.name} · ${fmt(d.progress.total)} images`),
    ),
  );
  select.disabled = state.datasets.length === 0;
  $("empty").hidden = state.datasets.length > 0;
}

function selectDataset(id) {
  const ds = state.datasets.find((d) => d.id === id) ?? state.datasets.at(-1);
  if (!ds) return;
  state.feed?.stop();
  clearTimeout(state.refreshTimer);
  clearTimeout(state.failedTimer);
  Object.assign(state, {
    ds,
    p: ds.progress,
    filter: "",
    page: 0,
    view: "browse",
    items: [],
    failedShown: 0,
    failedCount: -1,
    refreshTimer: null,
    failedTimer: null,
  });
  $("dataset-select").value = String(ds.id);
  const url = new URL(location.href);
  url.searchParams.set("dataset", ds.id);
  history.replaceState(null, "", url);
  $("dataset-name").textContent = ds.name;
  $("rate").textContent = "–";
  $("progress-card").hidden = false;
  $("browse").hidden = false;
  $("search-input").value = "";
  setFilterButtons();
  filterBar.setDataset(ds.id);
  gallery.render([]);
  onProgress(ds.progress);
  loadPage();
  state.feed = new ProgressFeed(ds.id, {
    onProgress,
    onTransport: showTransport,
    transport: params.get("transport") === "poll" ? "poll" : "auto",
  });
  state.feed.start();
}

// -- progress ----------------------------------------------------------------------------------
function finished(p) {
  const wantsEmbeddings = state.ds?.embeddings;
  return p.failed + (p.missing ?? 0) + (wantsEmbeddings ? p.ready : p.indexed + p.embedding + p.ready);
}

function onProgress(p) {
  const prev = state.p;
  state.p = p;
  if (prev && prev.status === "complete" && p.status !== "complete") refreshDatasetInfo();
  renderProgress(p);
  renderSearchState();
  filterBar.onProgress(p);
  if (state.view === "browse") scheduleRefresh(prev, p);
  if (p.failed !== state.failedCount) scheduleFailed();
}

function renderProgress(p) {
  const total = p.total || 0;
  const bar = $("bar");
  for (const seg of bar.querySelectorAll(".seg")) {
    const s = seg.dataset.status;
    if (s === "pending") continue; // fills what is left
    seg.style.width = total ? `${(100 * p[s]) / total}%` : "0";
    seg.title = `${s}: ${fmt(p[s])}`;
  }
  const done = finished(p);
  bar.setAttribute("aria-valuenow", total ? Math.round((100 * done) / total) : 0);
  bar.dataset.status = p.status;
  for (const s of API.STATUSES) $(`n-${s}`).textContent = fmt(p[s]);
  $("n-total").textContent = fmt(total);

  const pill = $("run-status");
  const state_ = p.error ? "error" : p.status;
  pill.dataset.state = state_;
  pill.textContent = p.error ? (p.status === "complete" ? "stopped" : "error") : p.status === "complete" ? "complete" : "indexing";
  const err = $("run-error");
  err.hidden = !p.error;
  err.textContent = p.error ?? "";

  // Rate and time left as the store measured them over its recent commits: the same for
  // every page, shown at once by a page opened mid-run, and never 0/s between two batch
  // commits. A finished run keeps the last rate shown.
  if (p.status !== "complete") {
    let name = p.rate_phase;
    let rate = p.rate;
    if (rate == null) {
      // The phase completion waits on has no rate yet: show the one that moves.
      const moving = Object.entries(p.phases ?? {}).find(([, ph]) => ph.rate != null);
      if (moving) [name, rate] = [moving[0], moving[1].rate];
    }
    $("rate").textContent = rate != null ? `${perSecond(rate)} · ${name}` : "–";
    $("eta").textContent = p.eta_s != null ? API.duration(p.eta_s) : "–";
  } else {
    $("eta").textContent = "done";
  }
}

// Rows a second, never rounded down to 0 while rows move.
function perSecond(rate) {
  if (rate >= 10) return `${fmt(Math.round(rate))}/s`;
  return `${rate.toPrecision(2)}/s`;
}

function showTransport(mode) {
  const el = $("transport");
  el.dataset.mode = mode;
  $("transport-text").textContent = {
    connecting: "connecting…",
    websocket: "live · WebSocket",
    polling: "live · polling",
    idle: "up to date",
    offline: "offline, retrying",
  }[mode] ?? mode;
}

async function refreshDatasetInfo() {
  if (!state.ds) return;
  try {
    const info = await API.api(`/api/datasets/${state.ds.id}`);
    Object.assign(state.ds, { embeddings: info.embeddings, name: info.name });
    renderSearchState();
  } catch {
    // keep what we have
  }
}

// -- search ------------------------------------------------------------------------------------
function searchAvailable() {
  return Boolean(state.ds?.embeddings && state.p && state.p.ready > 0);
}

function renderSearchState() {
  const ok = searchAvailable();
  const p = state.p;
  $("search-form").dataset.enabled = String(ok);
  $("search-input").disabled = !ok;
  $("search-btn").disabled = !ok;
  let hint;
  if (!state.ds?.embeddings) hint = "Search needs CLIP embeddings: add images with “Compute CLIP embeddings” on.";
  else if (!ok) hint = `Search opens once embeddings are ready (${fmt(p?.ready)} of ${fmt(p?.total)} embedded).`;
  else if (p.status !== "complete") hint = `Searching the ${fmt(p.ready)} images embedded so far.`;
  else hint = `${fmt(p.ready)} images searchable.`;
  $("search-input").title = ok ? "" : hint;
  if (!$("search-hint").dataset.error) $("search-hint").textContent = hint;
  gallery.setSimilar(ok);
  $("sample-similar").disabled = !(ok && currentSample?.status === "ready");
}

function showResults(title, items) {
  state.view = "results";
  $("results-head").hidden = false;
  $("results-title").textContent = title;
  $("pager").hidden = true;
  state.items = items;
  gallery.render(items);
  $("gallery-empty").hidden = items.length > 0;
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function backToBrowse() {
  state.view = "browse";
  $("results-head").hidden = true;
  $("pager").hidden = false;
  delete $("search-hint").dataset.error;
  renderSearchState();
  loadPage();
}

function searchError(e) {
  $("search-hint").dataset.error = "1";
  $("search-hint").textContent = e.message;
  setTimeout(() => {
    delete $("search-hint").dataset.error;
    renderSearchState();
  }, 6000);
}

async function runSearch(ev) {
  ev.preventDefault();
  const q = $("search-input").value.trim();
  if (!q || !searchAvailable()) return;
  try {
    const res = await API.search(state.ds.id, q);
    showResults(`Results for “${q}”`, res.items);
  } catch (e) {
    searchError(e);
  }
}

async function showSimilar(s) {
  if (!searchAvailable()) return;
  $("sample-dialog").open && $("sample-dialog").close();
  try {
    const res = await API.similar(state.ds.id, s.id);
    showResults(`Images similar to ${s.file_name}`, res.items);
  } catch (e) {
    searchError(e);
  }
}

// -- browsing ----------------------------------------------------------------------------------
function filterTotal() {
  const p = state.p;
  if (!p) return 0;
  // With the bar's filters the server counts when a counter knows (else null: unknown).
  if (filterBar.active()) return state.filteredTotal ?? state.page * PAGE_SIZE + state.items.length;
  return state.filter ? p[state.filter] : p.total;
}

function pageCount() {
  const more = filterBar.active() && state.filteredTotal == null && state.items.length === PAGE_SIZE;
  return Math.max(1, Math.ceil(filterTotal() / PAGE_SIZE) + (more ? 1 : 0));
}

function renderPager() {
  const n = pageCount();
  if (state.page > n - 1) state.page = n - 1;
  const input = $("page-input");
  if (document.activeElement !== input) input.value = String(state.page + 1);
  input.max = String(n);
  $("page-count").textContent = fmt(n);
  const first = state.page * PAGE_SIZE;
  const total = filterTotal();
  $("page-range").textContent = total ? `${fmt(first + 1)}–${fmt(Math.min(total, first + PAGE_SIZE))} of ${fmt(total)}` : "";
  const nav = $("pager");
  nav.querySelector('[data-page="first"]').disabled = state.page === 0;
  nav.querySelector('[data-page="prev"]').disabled = state.page === 0;
  nav.querySelector('[data-page="next"]').disabled = state.page >= n - 1;
  nav.querySelector('[data-page="last"]').disabled = state.page >= n - 1;
}

// Whether the page shown can still change: it is not full, or some of its samples are still
// on their way (pending, or waiting for an embedding), or the filter moves samples in and out.
function pageMayChange() {
  if (state.filter || filterBar.active()) return true;
  if (state.items.length < PAGE_SIZE) return true;
  const waitingFor = state.ds?.embeddings ? new Set(["pending", "indexed", "embedding"]) : new Set(["pending"]);
  return state.items.some((s) => waitingFor.has(s.status));
}

function scheduleRefresh(prev, p) {
  renderPager();
  const changed = !prev || API.STATUSES.some((s) => prev[s] !== p[s]);
  if (!changed || !pageMayChange() || state.refreshTimer) return;
  const gap = Math.max(REFRESH_MS, 10 * state.loadMs);
  const wait = Math.max(0, state.lastRefresh + gap - performance.now());
  state.refreshTimer = setTimeout(() => {
    state.refreshTimer = null;
    if (state.view === "browse") loadPage({ quiet: true });
  }, wait);
}

async function loadPage({ quiet = false } = {}) {
  if (!state.ds) return;
  const id = state.ds.id;
  state.loading?.abort();
  const ctl = new AbortController();
  state.loading = ctl;
  state.lastRefresh = performance.now();
  renderPager();
  try {
    const t0 = performance.now();
    const query = { status: state.filter, offset: state.page * PAGE_SIZE, limit: PAGE_SIZE, ...filterBar.params() };
    const res = await API.samples(id, query, ctl.signal);
    state.loadMs = performance.now() - t0;
    if (ctl.signal.aborted || state.ds?.id !== id || state.view !== "browse") return;
    state.items = res.items;
    state.filteredTotal = res.total;
    renderPager();
    gallery.render(res.items);
    $("gallery-empty").hidden = res.items.length > 0;
    $("gallery-empty").textContent = state.p?.status === "complete" ? "No images here." : "No images here yet.";
  } catch (e) {
    if (e.name === "AbortError") return;
    if (!quiet) $("gallery-empty").textContent = `Could not load the images: ${e.message}`;
    $("gallery-empty").hidden = state.items.length > 0;
  } finally {
    if (state.loading === ctl) state.loading = null;
  }
}

function goTo(page) {
  const n = pageCount();
  const next = Math.min(n - 1, Math.max(0, page));
  if (next === state.page && state.items.length) {
    renderPager();
    return;
  }
  state.page = next;
  loadPage();
  $("gallery").scrollIntoView({ block: "start", behavior: "smooth" });
}

function setFilterButtons() {
  for (const b of $("filters").querySelectorAll(".chip")) b.setAttribute("aria-pressed", String(b.dataset.filter === state.filter));
}

// -- failed files -------------------------------------------------------------------------------
function scheduleFailed() {
  if (state.failedTimer) return;
  const gap = Math.max(FAILED_REFRESH_MS, 10 * state.failedMs);
  const wait = state.failedCount < 0 ? 0 : Math.max(0, state.lastFailed + gap - performance.now());
  state.failedTimer = setTimeout(() => {
    state.failedTimer = null;
    loadFailed(true);
  }, wait);
}

async function loadFailed(reset) {
  if (!state.ds || !state.p) return;
  const count = state.p.failed;
  state.failedCount = count;
  $("failed-card").hidden = count === 0;
  $("failed-count").textContent = fmt(count);
  if (!count) return;
  const list = $("failed-list");
  // Only the first rows are kept live; "Show more" appends.
  const offset = reset ? 0 : state.failedShown;
  const limit = reset ? Math.max(FAILED_PAGE, state.failedShown) : FAILED_PAGE;
  state.lastFailed = performance.now();
  try {
    const t0 = performance.now();
    const res = await API.samples(state.ds.id, { status: "failed", offset, limit });
    state.failedMs = performance.now() - t0;
    const rows = res.items.map((s) =>
      h("li", {}, h("span", { class: "path", title: s.path }, s.path), h("span", { class: "reason" }, s.error ?? "failed")),
    );
    if (reset) list.replaceChildren(...rows);
    else list.append(...rows);
    state.failedShown = offset + res.items.length;
    $("failed-more").hidden = state.failedShown >= count;
  } catch {
    // the next change tries again
  }
}

// -- one sample ---------------------------------------------------------------------------------
let currentSample = null;

async function openSample(s) {
  currentSample = s;
  const dlg = $("sample-dialog");
  $("sample-title").textContent = s.file_name;
  const fig = $("sample-figure");
  const viewable = ["JPEG", "PNG", "GIF", "WEBP", "BMP"].includes((s.format ?? "").toUpperCase());
  fig.replaceChildren(picture(s, { src: viewable ? `/api/samples/${s.id}/image` : undefined }));
  const size = displaySize(s);
  const props = [
    ["path", s.path],
    ["status", s.status + (s.error ? `: ${s.error}` : "")],
    ["size", size ? `${size.w} × ${size.h}` : "–"],
    ["format", s.format ?? "–"],
    ["orientation", s.orientation ?? "–"],
    ["file", API.bytes(s.size_bytes)],
  ];
  if (s.coco_width) props.push(["COCO frame", `${s.coco_width} × ${s.coco_height}${s.size_mismatch ? " (differs from the file)" : ""}`]);
  $("sample-props").replaceChildren(...props.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  $("sample-anns").replaceChildren();
  const open = $("sample-open");
  open.hidden = !["indexed", "embedding", "ready"].includes(s.status);
  open.href = `/api/samples/${s.id}/image`;
  $("sample-similar").disabled = !(searchAvailable() && s.status === "ready");
  if (!dlg.open) dlg.showModal();
  try {
    const full = await API.sample(s.id);
    if (currentSample?.id !== s.id) return;
    const counts = new Map();
    for (const a of full.annotations) counts.set(a.category, (counts.get(a.category) ?? 0) + 1);
    $("sample-anns").replaceChildren(...[...counts].map(([c, n]) => h("li", {}, n > 1 ? `${c} × ${n}` : c)));
  } catch {
    // the tile's data is enough
  }
}

// -- adding a dataset -----------------------------------------------------------------------------
function openAdd() {
  $("add-error").hidden = true;
  const form = $("add-form");
  if (state.ds && !form.elements.name.value) form.elements.name.value = state.ds.name;
  $("add-dialog").showModal();
}

async function submitAdd(ev) {
  ev.preventDefault();
  const f = $("add-form").elements;
  const body = {
    name: f.name.value.trim(),
    images_path: f.images_path.value.trim(),
    embed: f.embed.checked,
  };
  if (f.annotations_json.value.trim()) body.annotations_json = f.annotations_json.value.trim();
  try {
    const res = await API.addDataset(body);
    $("add-dialog").close();
    await loadDatasets();
    selectDataset(res.dataset_id);
  } catch (e) {
    $("add-error").hidden = false;
    $("add-error").textContent = e.message;
  }
}

// -- wiring -------------------------------------------------------------------------------------
function wire() {
  $("dataset-select").addEventListener("change", (e) => selectDataset(Number(e.target.value)));
  $("add-open").addEventListener("click", openAdd);
  for (const b of document.querySelectorAll("[data-open-add]")) b.addEventListener("click", openAdd);
  $("add-form").addEventListener("submit", submitAdd);
  for (const b of document.querySelectorAll("[data-close]")) b.addEventListener("click", () => b.closest("dialog").close());
  $("sample-dialog").addEventListener("close", () => (currentSample = null));
  $("sample-dialog").addEventListener("click", (e) => e.target === e.currentTarget && e.currentTarget.close());
  $("sample-similar").addEventListener("click", () => currentSample && showSimilar(currentSample));
  $("search-form").addEventListener("submit", runSearch);
  $("results-clear").addEventListener("click", backToBrowse);
  $("failed-more").addEventListener("click", () => loadFailed(false));
  $("filters").addEventListener("click", (e) => {
    const b = e.target.closest(".chip");
    if (!b) return;
    state.filter = b.dataset.filter;
    state.page = 0;
    setFilterButtons();
    if (state.view !== "browse") backToBrowse();
    else loadPage();
  });
  $("pager").addEventListener("click", (e) => {
    const b = e.target.closest("[data-page]");
    if (!b) return;
    const to = { first: 0, prev: state.page - 1, next: state.page + 1, last: pageCount() - 1 }[b.dataset.page];
    goTo(to);
  });
  $("page-input").addEventListener("change", (e) => goTo(Number(e.target.value) - 1));
  document.addEventListener("keydown", (e) => {
    if (e.target.closest("input, select, textarea, dialog[open]") || state.view !== "browse") return;
    if (e.key === "ArrowRight") goTo(state.page + 1);
    if (e.key === "ArrowLeft") goTo(state.page - 1);
  });
}

async function main() {
  wire();
  try {
    await loadDatasets();
  } catch (e) {
    $("empty").hidden = false;
    $("empty").querySelector("p").textContent = `The server did not answer: ${e.message}`;
    return;
  }
  if (state.datasets.length) selectDataset(Number(params.get("dataset")) || state.datasets.at(-1).id);
  document.body.dataset.ready = "1";
}

main();
