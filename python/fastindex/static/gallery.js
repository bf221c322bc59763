// Tiles of samples: a thumbnail (upright), COCO boxes drawn over it in the frame the COCO file
// declared, dimensions and status. Tiles are reused by sample id so a refresh only touches the
// ones that changed.

import { h, fmt } from "./api.js";

const ROTATED = new Set([5, 6, 7, 8]); // EXIF orientations that swap width and height
const INDEXED = new Set(["indexed", "embedding", "ready"]);

// Width and height as displayed (after the EXIF orientation), or null before the probe.
export function displaySize(s) {
  if (!s.width || !s.height) return null;
  return ROTATED.has(s.orientation) ? { w: s.height, h: s.width } : { w: s.width, h: s.height };
}

function hue(text) {
  let x = 0;
  for (const c of text) x = (x * 31 + c.codePointAt(0)) >>> 0;
  return x % 360;
}

export function boxesSvg(s, frame) {
  const anns = s.annotations ?? [];
  const fw = s.coco_width || frame?.w;
  const fh = s.coco_height || frame?.h;
  if (!anns.length || !fw || !fh) return null;
  const svg = h("svg", {
    viewBox: `0 0 ${fw} ${fh}`,
    preserveAspectRatio: "none",
    class: "boxes",
    "aria-hidden": "true",
  });
  for (const a of anns) {
    const [x, y, w, hh] = a.bbox;
    const rect = h("rect", { x, y, width: w, height: hh, stroke: `hsl(${hue(a.category)} 85% 55%)` });
    rect.append(h("title", {}, a.category));
    svg.append(rect);
  }
  return svg;
}

// The picture of a sample: its thumbnail with boxes, or a placeholder saying why there is none.
export function picture(s, { src } = {}) {
  const size = displaySize(s);
  const ar = size ? size.w / size.h : 4 / 3;
  const pic = h("div", { class: "pic", style: `--ar:${ar.toFixed(5)}` });
  if (INDEXED.has(s.status)) {
    pic.append(
      h("img", {
        src: src ?? `/api/samples/${s.id}/thumbnail`,
        alt: s.file_name,
        loading: "lazy",
        decoding: "async",
        draggable: "false",
      }),
    );
    const svg = boxesSvg(s, size);
    if (svg) pic.append(svg);
  } else if (s.status === "failed") {
    pic.append(h("div", { class: "placeholder" }, s.error ?? "failed"));
  } else if (s.status === "missing") {
    pic.append(h("div", { class: "placeholder" }, "file missing from its folder"));
  } else {
    pic.append(h("div", { class: "placeholder" }, "reading header…"));
  }
  return pic;
}

function key(s, canSimilar) {
  return [s.status, s.width, s.height, s.orientation, s.annotations?.length ?? 0, s.score ?? "", canSimilar].join("|");
}

export class Gallery {
  constructor(root, { onOpen, onSimilar }) {
    this.root = root;
    this.onOpen = onOpen;
    this.onSimilar = onSimilar;
    this.canSimilar = false;
    this.items = [];
  }

  setSimilar(enabled) {
    if (enabled === this.canSimilar) return;
    this.canSimilar = enabled;
    this.render(this.items);
  }

  render(items) {
    this.items = items;
    const old = new Map();
    for (const el of this.root.children) old.set(el.dataset.id, el);
    const tiles = items.map((s) => {
      const k = key(s, this.canSimilar);
      const prev = old.get(String(s.id));
      return prev && prev.dataset.key === k ? prev : this.#tile(s, k);
    });
    this.root.replaceChildren(...tiles);
  }

  #tile(s, k) {
    const size = displaySize(s);
    const dims = size ? `${size.w} × ${size.h}` : "–";
    const similarOk = this.canSimilar && s.status === "ready";
    const nboxes = s.annotations?.length ?? 0;
    return h(
      "article",
      { class: "tile", "data-id": s.id, "data-key": k, "data-status": s.status },
      h("div", { class: "frame", onclick: () => this.onOpen(s), title: s.path }, picture(s)),
      h(
        "div",
        { class: "caption" },
        h("div", { class: "name", title: s.path }, s.file_name),
        h(
          "div",
          { class: "row" },
          h("span", { class: "dims" }, dims),
          s.format ? h("span", {}, "· ", s.format.toLowerCase()) : null,
          nboxes ? h("span", { title: "COCO boxes" }, "· ", `${fmt(nboxes)} box${nboxes === 1 ? "" : "es"}`) : null,
        ),
        h(
          "div",
          { class: "row" },
          h("span", { class: "status-dot", "data-status": s.status }),
          h("span", { class: "status" }, s.status),
          s.score != null ? h("span", { class: "score", title: "cosine similarity" }, s.score.toFixed(3)) : null,
          h("span", { class: "spacer" }),
          h(
            "button",
            {
              class: "link-btn similar",
              type: "button",
              disabled: !similarOk,
              title: similarOk ? "Find similar images" : "Needs this image's embedding",
              onclick: () => this.onSimilar(s),
            },
            "Similar",
          ),
        ),
      ),
    );
  }
}
