// The sweep viewer: the grid of a sweep folder (rows prompt × seed, columns the LoRA mixes), filters by axis value,
// a cell's full image and manifest line; while the sweep runs it refreshes every two seconds.
"use strict";

const $ = (id) => document.getElementById(id);
const view = { data: null, filters: {}, selected: null, timer: null, blobs: new Map() };
const TOKEN_KEY = "lorablend.viewer.token";

// The token (when the viewer has one) goes in an Authorization header, never in a URL: images are fetched as blobs.
function authorized(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return fetch(path, { cache: "no-store", headers: token ? { Authorization: `Bearer ${token}` } : {} });
}

async function imageUrl(file) {
  if (!view.blobs.has(file)) {
    view.blobs.set(file, authorized(`/api/image/${file}`).then(async (r) => {
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      return URL.createObjectURL(await r.blob());
    }));
  }
  return view.blobs.get(file);
}

function setImage(img, file) {
  imageUrl(file).then((url) => { img.src = url; }).catch(() => { img.alt = "image not readable"; });
}

function mixLabel(cell) {  // the LoRA weights, and the schedule that moves them over the steps (a sweep axis)
  const mix = Object.entries(cell.loras).map(([n, w]) => `${n}=${w}`).join(" ") || "no LoRA";
  return cell.schedule ? `${mix} @ ${cell.schedule}` : mix;
}

function axes(cells, names) {
  const uniq = (values) => [...new Set(values)];
  const out = { prompt: uniq(cells.map((c) => c.prompt)), seed: uniq(cells.map((c) => c.seed)).sort((a, b) => a - b) };
  for (const name of names) out[`lora:${name}`] = uniq(cells.map((c) => c.loras[name])).sort((a, b) => a - b);
  if (cells.some((c) => c.schedule)) out.schedule = uniq(cells.map((c) => value(c, "schedule")));
  return out;
}

function axisName(axis) { return axis.startsWith("lora:") ? `${axis.slice(5)} weight` : axis; }

function value(cell, axis) {
  if (axis === "schedule") return cell.schedule || "constant";
  return axis.startsWith("lora:") ? cell.loras[axis.slice(5)] : cell[axis];
}

function renderFilters(all) {
  const box = $("filters");
  if (box.childElementCount) return;  // built once: the axes of a sweep do not change while it runs
  for (const [axis, values] of Object.entries(all)) {
    const wrap = document.createElement("div");
    const label = document.createElement("label");
    label.htmlFor = `f-${axis}`;
    label.textContent = axisName(axis);
    const select = document.createElement("select");
    select.id = `f-${axis}`;
    select.dataset.axis = axis;
    select.append(new Option("all", ""));
    values.forEach((v, i) => select.append(new Option(String(v), String(i))));
    select.addEventListener("change", () => {
      view.filters[axis] = select.value === "" ? null : all[axis][Number(select.value)];
      renderGrid();
    });
    wrap.append(label, select);
    box.append(wrap);
  }
}

function visible(cell) {
  return Object.entries(view.filters).every(([axis, v]) => v == null || value(cell, axis) === v);
}

function renderGrid() {
  const data = view.data;
  const cells = data.cells.filter(visible);
  const mixes = [...new Map(cells.map((c) => [mixLabel(c), c.loras])).keys()];
  const rows = [...new Map(cells.map((c) => [`${c.prompt_index}|${c.seed}`, c])).values()];
  const grid = $("grid");
  grid.replaceChildren();
  grid.style.gridTemplateColumns = `minmax(8rem, 14rem) repeat(${mixes.length}, minmax(48px, 128px))`;
  grid.append(Object.assign(document.createElement("div"), { className: "head", textContent: "" }));
  for (const m of mixes) {
    const head = Object.assign(document.createElement("div"), { className: "head", textContent: m });
    head.setAttribute("role", "columnheader");
    grid.append(head);
  }
  const byKey = new Map(cells.map((c) => [`${c.prompt_index}|${c.seed}|${mixLabel(c)}`, c]));
  for (const row of rows) {
    const head = Object.assign(document.createElement("div"), { className: "head",
                                                                textContent: `${row.prompt} · seed ${row.seed}` });
    head.setAttribute("role", "rowheader");
    grid.append(head);
    for (const m of mixes) {
      const cell = byKey.get(`${row.prompt_index}|${row.seed}|${m}`);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "cell";
      button.setAttribute("role", "gridcell");
      if (!cell || !cell.done) {
        button.classList.add("pending");
        button.disabled = true;
        button.setAttribute("aria-label", `${row.prompt}, seed ${row.seed}, ${m}: not made yet`);
      } else {
        const img = document.createElement("img");
        setImage(img, cell.file);
        img.alt = "";
        img.loading = "lazy";
        button.append(img);
        button.setAttribute("aria-label", `${row.prompt}, seed ${row.seed}, ${m}`);
        button.addEventListener("click", () => select(cell));
      }
      grid.append(button);
    }
  }
}

function select(cell) {
  view.selected = cell.key;
  $("detail-empty").classList.add("hidden");
  $("detail").classList.remove("hidden");
  $("detail-line").classList.remove("hidden");
  setImage($("detail-image"), cell.file);
  $("detail-image").alt = `${cell.prompt}, seed ${cell.seed}, ${mixLabel(cell)}`;
  $("detail-caption").textContent = `${cell.prompt} · seed ${cell.seed} · ${mixLabel(cell)}`;
  $("detail-line").textContent = JSON.stringify(cell.line || cell, null, 2);
}

async function refresh() {
  const response = await authorized("/api/sweep");
  if (response.status === 401) {
    $("signin-view").classList.remove("hidden");
    $("app-view").classList.add("hidden");
    $("token").focus();
    return;
  }
  $("signin-view").classList.add("hidden");
  $("app-view").classList.remove("hidden");
  if (!response.ok) {
    $("summary").textContent = `The sweep could not be read: HTTP ${response.status}`;
    return;
  }
  view.data = await response.json();
  const d = view.data;
  const made = d.cells.filter((c) => c.done).length;
  $("summary").textContent = `${d.folder}: ${made} of ${d.total ?? d.cells.length} cells` +
    (d.finished ? " (finished)" : " (running: refreshing)");
  renderFilters(axes(d.cells, d.names));
  renderGrid();
  if (d.finished && view.timer) {
    clearInterval(view.timer);
    view.timer = null;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    refresh();
  });
  refresh();
  view.timer = setInterval(refresh, 2000);
});
