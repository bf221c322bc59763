// Live progress of one dataset: a WebSocket while it works, polling every second when the
// WebSocket fails, and a look every second once complete (to notice new work: a watched
// folder's new files can be pending and indexed between two looks).

import { progress as fetchProgress } from "./api.js";

const POLL_MS = 1000; // polling fallback
const IDLE_MS = 1000; // after `complete`: is there new work?
const COUNTS = ["total", "pending", "indexed", "embedding", "ready", "failed", "missing"];
const SILENCE_MS = 4500; // the server speaks at least every second while work runs

export class ProgressFeed {
  // onProgress(p) for every answer; onTransport(mode) with "connecting" | "websocket" |
  // "polling" | "idle" | "offline". `transport`: "auto" (WebSocket first) or "poll".
  constructor(datasetId, { onProgress, onTransport, transport = "auto" }) {
    this.id = datasetId;
    this.onProgress = onProgress;
    this.onTransport = onTransport;
    this.wsBroken = transport === "poll";
    this.stopped = false;
    this.ws = null;
    this.timer = null;
    this.silence = null;
    this.last = null; // the last progress shown
  }

  start() {
    this.#live();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.silence);
    if (this.ws) {
      this.ws.onclose = this.ws.onmessage = this.ws.onerror = null;
      this.ws.close();
      this.ws = null;
    }
  }

  #emit(p) {
    if (this.stopped) return;
    this.last = p;
    this.onProgress(p);
  }

  #mode(m) {
    if (!this.stopped) this.onTransport(m);
  }

  #live() {
    if (this.stopped) return;
    if (this.wsBroken || typeof WebSocket === "undefined") {
      this.#poll();
      return;
    }
    const url = new URL(`/ws/progress/${this.id}`, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this.#fallback();
      return;
    }
    this.ws = ws;
    let complete = false;
    this.#mode("connecting");
    const quiet = () => {
      clearTimeout(this.silence);
      // Open but silent (a proxy that swallows frames, a stuck server): poll instead.
      this.silence = setTimeout(() => ws.close(), SILENCE_MS);
    };
    ws.onopen = () => {
      this.#mode("websocket");
      quiet();
    };
    ws.onmessage = (ev) => {
      quiet();
      let p;
      try {
        p = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (p.status === "complete") complete = true;
      this.#emit(p);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = () => {
      clearTimeout(this.silence);
      this.ws = null;
      if (this.stopped) return;
      if (complete) this.#idle();
      else this.#fallback();
    };
  }

  #fallback() {
    this.wsBroken = true;
    this.#poll();
  }

  async #poll() {
    if (this.stopped) return;
    this.#mode("polling");
    let p = null;
    try {
      p = await fetchProgress(this.id);
      this.#emit(p);
    } catch {
      this.#mode("offline");
    }
    if (this.stopped) return;
    if (p && p.status === "complete") this.#idle();
    else this.timer = setTimeout(() => this.#poll(), POLL_MS);
  }

  #idle() {
    if (this.stopped) return;
    this.#mode("idle");
    this.timer = setTimeout(async () => {
      if (this.stopped) return;
      try {
        const p = await fetchProgress(this.id);
        if (p.status !== "complete") {
          this.#emit(p);
          this.#live();
          return;
        }
        // Still complete, but rows came, went or changed (a watched folder): show them.
        if (COUNTS.some((k) => p[k] !== this.last?.[k])) this.#emit(p);
      } catch {
        // try again later
      }
      this.#idle();
    }, IDLE_MS);
  }
}

// Phase 3 on a Ray cluster: one row per worker (node, GPU, state, rows, img/s, restarts) under
// the progress bar, from `p.cluster` (absent on one machine: nothing is shown).
export function renderWorkers(p) {
  const card = document.getElementById("progress-card");
  if (!card) return;
  let box = document.getElementById("workers");
  const c = p.cluster;
  if (!c || !c.workers?.length) {
    if (box) box.hidden = true;
    return;
  }
  if (!box) {
    box = document.createElement("table");
    box.id = "workers";
    box.className = "workers";
    const err = document.getElementById("run-error");
    card.insertBefore(box, err);
  }
  box.hidden = false;
  const nf = new Intl.NumberFormat();
  const cell = (tag, text) => {
    const el = document.createElement(tag);
    el.textContent = text;
    return el;
  };
  const head = document.createElement("tr");
  for (const t of ["worker", "node", "GPU", "state", "rows", "img/s", "restarts"]) head.append(cell("th", t));
  const rows = c.workers.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.state = w.state;
    for (const v of [w.worker, w.host || w.node || "…", w.gpu ?? "CPU", w.state, nf.format(w.rows),
      w.img_per_s == null ? "–" : nf.format(w.img_per_s), w.restarts]) tr.append(cell("td", String(v)));
    return tr;
  });
  const cap = document.createElement("caption");
  cap.textContent = `Ray workers · ${nf.format(c.released)} rows given back after a worker died`;
  box.replaceChildren(cap, head, ...rows);
}
