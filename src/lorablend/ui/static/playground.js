// The playground: sign in with the server's token (kept in this tab's sessionStorage, sent only as an
// Authorization header — never in a URL), choose LoRAs and their weights, generate, follow the progress, compare,
// restore earlier results, download PNGs that carry their settings.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "lorablend.token";
const state = { loras: [], chosen: new Map(), history: [], busy: false };

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = `Bearer ${token()}`;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401 || response.status === 403) {
    signOut("The token was refused: sign in again.");
    throw new Error("signed out");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    return body.error || JSON.stringify(body).slice(0, 300);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

function show(view) {
  $("signin-view").classList.toggle("hidden", view !== "signin");
  $("app-view").classList.toggle("hidden", view !== "app");
  $("sign-out").classList.toggle("hidden", view !== "app");
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  show("signin");
  $("signin-status").textContent = message || "";
  $("signin-status").classList.toggle("bad", Boolean(message));
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  $("signin-status").textContent = "Signing in…";
  try {
    await loadLoras();
    show("app");
    $("prompt").focus();
  } catch (err) {
    if (err.message !== "signed out") signOut(`Could not reach the server: ${err.message}`);
  }
}

function humanBytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function loadLoras() {
  const response = await api("/v1/loras");
  if (!response.ok) throw new Error(await errorText(response));
  state.loras = (await response.json()).loras;
  const body = $("lora-table").tBodies[0];
  body.replaceChildren();
  for (const lora of state.loras) {
    const row = body.insertRow();
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `use-${lora.name}`;
    box.dataset.name = lora.name;
    box.setAttribute("aria-label", `use ${lora.name}`);
    box.checked = state.chosen.has(lora.name);
    box.addEventListener("change", () => choose(lora.name, box.checked));
    row.insertCell().append(box);
    const name = document.createElement("label");
    name.htmlFor = box.id;
    name.textContent = lora.name;
    row.insertCell().append(name);
    row.insertCell().textContent = lora.family || "";
    row.insertCell().textContent = lora.rank == null ? "" : String(lora.rank);
    row.insertCell().textContent = humanBytes(lora.bytes);
  }
  if (!state.loras.length) body.insertRow().insertCell().textContent = "No LoRA served: start the server with --lora-dir.";
  try {
    const models = await api("/sdapi/v1/sd-models");
    if (models.ok) {
      const list = await models.json();
      if (list.length) $("model").textContent = `model: ${list[0].model_name || list[0].title}`;
    }
  } catch (_) { /* the model name is only shown when the server says it */ }
}

function choose(name, on, weight = 1.0, blocks = "") {
  if (on) state.chosen.set(name, { weight, blocks });
  else state.chosen.delete(name);
  renderSliders();
}

function renderSliders() {
  const box = $("sliders");
  box.replaceChildren();
  for (const [name, value] of state.chosen) {
    const id = `w-${name}`;
    const line = document.createElement("div");
    line.className = "slider";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = name;
    const range = document.createElement("input");
    Object.assign(range, { type: "range", id, min: "-1", max: "2", step: "0.05", value: String(value.weight) });
    range.dataset.name = name;
    const out = document.createElement("output");
    out.htmlFor = id;
    out.textContent = Number(value.weight).toFixed(2);
    range.addEventListener("input", () => {
      value.weight = Number(range.value);
      out.textContent = value.weight.toFixed(2);
    });
    line.append(label, range, out);
    const more = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "per-block weights";
    const blocksId = `b-${name}`;
    const blocksLabel = document.createElement("label");
    blocksLabel.htmlFor = blocksId;
    blocksLabel.textContent = "Block weights (A1111 LoRA Block Weight): blocks with weights, e.g. IN04:0.5;OUT03, or one number per block (17 for SD1.x, 12 for SDXL); other blocks 0";
    const blocks = document.createElement("input");
    Object.assign(blocks, { type: "text", id: blocksId, value: value.blocks });
    blocks.addEventListener("input", () => { value.blocks = blocks.value.trim(); });
    more.append(summary, blocksLabel, blocks);
    box.append(line, more);
  }
}

function settings() {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const s = { prompt: $("prompt").value, negative_prompt: $("negative").value || null, seed: number("seed"),
              steps: number("steps"), width: number("width"), height: number("height"), loras: {}, blocks: {} };
  for (const [name, value] of state.chosen) {
    s.loras[name] = value.weight;
    if (value.blocks) s.blocks[name] = value.blocks;
  }
  return s;
}

// The request body: plain weights in "loras"; a LoRA with block weights goes in as a prompt token instead
// (<lora:name:w:lbw=…>, the A1111 LoRA Block Weight syntax the server reads), since "loras" holds numbers only.
function body(s, withLoras) {
  let prompt = s.prompt;
  const loras = {};
  if (withLoras) {
    for (const [name, weight] of Object.entries(s.loras)) {
      if (s.blocks[name]) prompt += ` <lora:${name}:${weight}:lbw=${s.blocks[name]}>`;
      else loras[name] = weight;
    }
  }
  const out = { prompt, loras, response_format: "png" };
  for (const key of ["negative_prompt", "seed", "steps", "width", "height"]) if (s[key] != null) out[key] = s[key];
  return out;
}

async function pollProgress(until) {
  const bar = $("progress");
  while (!until.done) {
    try {
      const response = await api("/sdapi/v1/progress?skip_current_image=true");
      if (response.ok) {
        const p = await response.json();
        const st = p.state || {};
        if (st.sampling_steps) {
          bar.max = st.sampling_steps;
          bar.value = st.sampling_step;
          $("status").textContent = `${until.what}: step ${st.sampling_step} of ${st.sampling_steps}` +
            (p.eta_relative ? `, about ${p.eta_relative.toFixed(1)} s left` : "");
        }
      }
    } catch (_) { /* progress is best effort; the image request says how it ended */ }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function render(s, withLoras, what) {
  const watch = { done: false, what };
  const polling = pollProgress(watch);
  try {
    const response = await api("/v1/images", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(body(s, withLoras)) });
    if (!response.ok) throw new Error(await errorText(response));
    return { bytes: new Uint8Array(await response.arrayBuffer()), seed: Number(response.headers.get("X-Seed")) };
  } finally {
    watch.done = true;
    await polling;
  }
}

async function imageSize(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  return [img.naturalWidth, img.naturalHeight];
}

async function finish(s, result) {
  const plainUrl = URL.createObjectURL(new Blob([result.bytes], { type: "image/png" }));
  const [w, h] = await imageSize(plainUrl);
  const text = window.pngText.a1111Parameters(Object.assign({}, s, { seed: result.seed }), w, h);
  const tagged = window.pngText.pngWithText(result.bytes, "parameters", text);
  URL.revokeObjectURL(plainUrl);
  return { url: URL.createObjectURL(new Blob([tagged], { type: "image/png" })), text, width: w, height: h };
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  state.busy = true;
  $("generate").disabled = true;
  $("status").classList.remove("bad");
  const bar = $("progress");
  bar.value = 0;
  const s = settings();
  try {
    const mixed = await render(s, true, "Generating");
    s.seed = mixed.seed;  // a random seed comes back from the server: the entry restores the same image
    const a = await finish(s, mixed);
    let b = null;
    if ($("compare").checked) b = await finish(Object.assign({}, s, { loras: {} }), await render(s, false, "Generating the base"));
    bar.value = bar.max;
    const entry = { settings: s, a, b, chosen: [...state.chosen].map(([n, v]) => [n, Object.assign({}, v)]),
                    compare: $("compare").checked };
    state.history.push(entry);
    showEntry(entry);
    renderHistory();
    $("status").textContent = `Done: seed ${s.seed}.`;
  } catch (err) {
    if (err.message !== "signed out") {
      $("status").textContent = `Not generated: ${err.message}`;
      $("status").classList.add("bad");
    }
  } finally {
    state.busy = false;
    $("generate").disabled = false;
  }
}

function caption(s) {
  const mix = Object.entries(s.loras).map(([n, w]) => `${n} ${Number(w).toFixed(2)}`).join(", ") || "no LoRA";
  return `${mix} · seed ${s.seed} · ${s.steps} steps`;
}

function showEntry(entry) {
  $("fig-a").classList.remove("hidden");
  $("image-a").src = entry.a.url;
  $("image-a").alt = `generated: ${entry.settings.prompt} (${caption(entry.settings)})`;
  $("cap-a").textContent = caption(entry.settings);
  $("download-a").href = entry.a.url;
  $("download-a").download = `lorablend-${entry.settings.seed}.png`;
  $("fig-b").classList.toggle("hidden", !entry.b);
  if (entry.b) {
    $("image-b").src = entry.b.url;
    $("cap-b").textContent = `base · seed ${entry.settings.seed}`;
  }
}

function restore(entry) {
  const s = entry.settings;
  $("prompt").value = s.prompt;
  $("negative").value = s.negative_prompt || "";
  for (const key of ["seed", "steps", "width", "height"]) $(key).value = s[key] == null ? "" : s[key];
  $("compare").checked = entry.compare;
  state.chosen = new Map(entry.chosen.map(([n, v]) => [n, Object.assign({}, v)]));
  for (const box of document.querySelectorAll("#lora-table input[type=checkbox]")) box.checked = state.chosen.has(box.dataset.name);
  renderSliders();
  showEntry(entry);
  renderHistory(entry);
  $("status").textContent = `Restored: ${caption(s)}.`;
}

function renderHistory(current = state.history[state.history.length - 1]) {
  const strip = $("history");
  strip.replaceChildren();
  state.history.forEach((entry, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.setAttribute("role", "listitem");
    button.setAttribute("aria-current", String(entry === current));
    button.setAttribute("aria-label", `result ${i + 1}: ${caption(entry.settings)}; restore`);
    const img = document.createElement("img");
    img.src = entry.a.url;
    img.alt = "";
    button.append(img);
    button.addEventListener("click", () => restore(entry));
    strip.append(button);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", signIn);
  $("generate-form").addEventListener("submit", generate);
  $("sign-out").addEventListener("click", () => signOut(""));
  if (sessionStorage.getItem(TOKEN_KEY) !== null) {
    loadLoras().then(() => show("app")).catch((err) => { if (err.message !== "signed out") signOut(err.message); });
  } else {
    show("signin");
  }
});
