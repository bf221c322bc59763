// The JSON API, and small formatting helpers shared by the page's modules.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) throw new ApiError(res.status, data?.message ?? `${res.status} ${res.statusText}`, data);
  return data;
}

export const STATUSES = ["pending", "indexed", "embedding", "ready", "failed", "missing"];

export const datasets = () => api("/api/datasets");
export const progress = (id) => api(`/api/progress/${id}`);
export const samples = (id, { status, offset, limit, ...filters }, signal) => {
  const q = new URLSearchParams({ offset: String(offset), limit: String(limit) });
  if (status) q.set("status", status);
  for (const [k, v] of Object.entries(filters)) if (v != null && v !== "") q.set(k, String(v));
  return api(`/api/datasets/${id}/samples?${q}`, { signal });
};
export const sample = (id) => api(`/api/samples/${id}`);
export const search = (id, q, k = 48) =>
  api(`/api/datasets/${id}/search?${new URLSearchParams({ q, k: String(k) })}`);
export const similar = (id, sampleId, k = 48) => api(`/api/datasets/${id}/similar/${sampleId}?k=${k}`);
export const addDataset = (body) => api("/api/datasets", { method: "POST", body });

const nf = new Intl.NumberFormat();
export const fmt = (n) => nf.format(n ?? 0);

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds < 1) return "< 1 s";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

export function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// Create an element: h("div", { class: "x", onclick }, child, "text", ...).
export function h(tag, attrs = {}, ...children) {
  const el = tag === "svg" || tag === "rect" || tag === "title"
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
