// The filter bar: format and category chips with their counts (facets), size, path and
// annotation controls, plus counts on the status chips. The counts come from
// /api/datasets/{id}/facets (read from counters on the server, so cheap to poll) and are
// refreshed while indexing runs.

import { api, fmt, h, STATUSES } from "./api.js";

const FACET_REFRESH_MS = 1000;
// Also looked at this often on its own: the progress feed goes quiet once a dataset is
// complete, and work that starts and ends between its idle checks (a small COCO ingest)
// would otherwise leave stale counts.
const FACET_IDLE_MS = 4000;

export class FilterBar {
  // el: the bar's container; statusChips: the existing status chip group (counts are added
  // to its buttons); onChange: called when a filter changes.
  constructor(el, statusChips, onChange) {
    this.el = el;
    this.statusChips = statusChips;
    this.onChange = onChange;
    this.datasetId = null;
    this.values = {};
    this.facets = null;
    this.timer = null;
    this.last = 0;
    this.build();
    setInterval(() => {
      if (!document.hidden && performance.now() - this.last >= FACET_IDLE_MS) this.refresh();
    }, FACET_IDLE_MS);
  }

  build() {
    const num = (name, label) =>
      h("label", { class: "filter-num" }, label,
        h("input", { type: "number", min: "0", step: "1", name, "data-filter-input": name, inputmode: "numeric" }));
    this.formats = h("div", { class: "chips facet", role: "group", "aria-label": "Format", "data-facet": "format" });
    this.categories = h("div", { class: "chips facet", role: "group", "aria-label": "Category", "data-facet": "category" });
    this.el.replaceChildren(
      h("div", { class: "facet-row" }, h("span", { class: "facet-label" }, "Format"), this.formats),
      h("div", { class: "facet-row", "data-row": "category" }, h("span", { class: "facet-label" }, "Category"), this.categories),
      h("form", { class: "facet-row filter-form", "data-filter-form": "" },
        num("min_width", "min width"),
        num("min_height", "min height"),
        num("max_width", "max width"),
        num("max_height", "max height"),
        h("label", { class: "filter-glob" }, "path",
          h("input", { type: "search", name: "path_glob", placeholder: "part1/*.jpg", "data-filter-input": "path_glob" })),
        h("label", {}, "boxes",
          h("select", { name: "has_annotations", "data-filter-input": "has_annotations" },
            h("option", { value: "" }, "any"),
            h("option", { value: "true" }, "with"),
            h("option", { value: "false" }, "without"))),
        h("button", { class: "btn ghost small", type: "button", "data-filter-clear": "" }, "Clear filters")),
    );
    this.el.addEventListener("click", (e) => {
      const chip = e.target.closest("[data-facet-value]");
      if (chip) {
        const key = chip.closest("[data-facet]").dataset.facet;
        const v = chip.dataset.facetValue;
        this.set(key, this.values[key] === v ? undefined : v);
        return;
      }
      if (e.target.closest("[data-filter-clear]")) this.clear();
    });
    this.el.addEventListener("change", (e) => {
      const input = e.target.closest("[data-filter-input]");
      if (input) this.set(input.name, input.value.trim() || undefined);
    });
    this.el.querySelector("form").addEventListener("submit", (e) => e.preventDefault());
  }

  set(key, value) {
    if (value === undefined) delete this.values[key];
    else this.values[key] = value;
    this.render();
    this.onChange();
  }

  clear() {
    this.values = {};
    for (const input of this.el.querySelectorAll("[data-filter-input]")) input.value = "";
    this.render();
    this.onChange();
  }

  // Query parameters for /samples (the status filter stays the page's own).
  params() {
    return { ...this.values };
  }

  active() {
    return Object.keys(this.values).length > 0;
  }

  setDataset(id) {
    this.datasetId = id;
    this.values = {};
    this.facets = null;
    for (const input of this.el.querySelectorAll("[data-filter-input]")) input.value = "";
    this.render();
    this.refresh();
  }

  // A progress message arrived: refresh the counts, at most once a second.
  onProgress() {
    if (this.timer) return;
    const wait = Math.max(0, this.last + FACET_REFRESH_MS - performance.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.refresh();
    }, wait);
  }

  async refresh() {
    const id = this.datasetId;
    if (id == null) return;
    this.last = performance.now();
    try {
      const f = await api(`/api/datasets/${id}/facets`);
      if (id !== this.datasetId) return;
      this.facets = f;
      this.render();
    } catch {
      // the next progress message tries again
    }
  }

  // The count of a value, or that of the chosen value when the counters have not seen it.
  chips(container, key, counts) {
    const chosen = this.values[key];
    const names = Object.keys(counts);
    if (chosen !== undefined && !names.includes(chosen)) names.push(chosen);
    container.replaceChildren(
      ...names.map((name) =>
        h("button", {
          type: "button",
          class: "chip",
          "data-facet-value": name,
          "aria-pressed": String(chosen === name),
        }, name, " ", h("span", { class: "count", "data-count": name }, fmt(counts[name] ?? 0))),
      ),
    );
    if (!names.length) container.append(h("span", { class: "muted small" }, "none yet"));
  }

  render() {
    const f = this.facets ?? { format: {}, category: {}, status: {} };
    this.chips(this.formats, "format", f.format);
    this.chips(this.categories, "category", f.category);
    this.el.querySelector('[data-row="category"]').hidden = Object.keys(f.category).length === 0;
    for (const b of this.statusChips.querySelectorAll(".chip")) {
      const s = b.dataset.filter;
      let span = b.querySelector(".count");
      if (!span) {
        span = h("span", { class: "count" });
        b.append(" ", span);
      }
      span.textContent = fmt(s ? f.status?.[s] : f.total);
    }
    this.el.querySelector("[data-filter-clear]").disabled = !this.active();
    this.el.dataset.active = String(this.active());
  }
}

export { STATUSES };
