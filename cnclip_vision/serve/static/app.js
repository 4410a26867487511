// cnclip serve: the page's only script (plain JavaScript, no build step, nothing from a CDN).
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "cnclip-api-key";
const state = { info: null, key: sessionStorage.getItem(KEY_STORE) || "", detections: [], blobs: [] };

// ------------------------------------------------------------------------------------------ requests
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("X-API-Key", state.key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "无法连接服务器");
  }
  if (response.status === 401) showKeyForm();
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (err) { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  return response;
}

function errorText(err) {
  const prefix = { 401: "需要 API 密钥", 413: "文件太大", 415: "不是图片", 422: "请求有误", 503: "服务暂不可用" };
  const head = prefix[err.status] || (err.status ? `请求失败（${err.status}）` : "请求失败");
  return `${head}：${err.message}`;
}

function setMsg(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function busy(button, work) {
  if (button) button.disabled = true;
  try { return await work(); } finally { if (button) button.disabled = false; }
}

// ---------------------------------------------------------------------------------------- thumbnails
function releaseBlobs() {
  state.blobs.forEach((url) => URL.revokeObjectURL(url));
  state.blobs = [];
}

async function setThumbnail(img, url) {
  if (!url) return;
  if (!state.key) { img.src = url; return; }  // plain <img> loading (and browser caching)
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    state.blobs.push(objectUrl);
    img.src = objectUrl;
  } catch (err) { img.alt = "缩略图加载失败"; }
}

// ------------------------------------------------------------------------------------------- results
function renderResults(list, results, msgEl, what) {
  releaseBlobs();
  list.replaceChildren();
  if (!results.length) { setMsg(msgEl, `${what}：没有结果`); return; }
  const best = Math.max(...results.map((r) => r.score), 1e-6);
  for (const hit of results) {
    const li = document.createElement("li");
    li.className = "card";
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.alt = hit.id;
    img.loading = "lazy";
    img.decoding = "async";
    thumb.append(img);
    setThumbnail(img, hit.thumbnail ? `${hit.thumbnail}&size=256` : null);

    const meta = document.createElement("div");
    meta.className = "meta";
    const line = document.createElement("div");
    line.className = "line";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `相似度 ${hit.score.toFixed(3)}`;
    line.append(rank, score);
    const bar = document.createElement("div");
    bar.className = "scorebar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, hit.score / best)) * 100}%`;
    bar.append(fill);
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    id.title = hit.id;
    meta.append(line, bar, id);
    if (hit.thumbnail) {
      const similar = document.createElement("button");
      similar.type = "button";
      similar.textContent = "找相似的图";
      similar.setAttribute("aria-label", `以 ${hit.id} 搜索相似的图片`);
      similar.addEventListener("click", () => searchSimilar(hit));
      meta.append(similar);
    }
    li.append(thumb, meta);
    list.append(li);
  }
}

async function searchText(event) {
  if (event) event.preventDefault();
  const input = $("#query");
  const text = input.value.trim();
  const msg = $("#search-msg");
  if (!text) { setMsg(msg, "请输入要搜索的内容", true); input.focus(); return; }
  const k = Number($("#search-k").value);
  setMsg(msg, "正在搜索…");
  await busy($("#search-form button[type=submit]"), async () => {
    try {
      const body = await (await api("/api/search", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k }),
      })).json();
      setMsg(msg, `“${body.query}” 的前 ${body.results.length} 个结果（${body.took_ms.toFixed(0)} 毫秒）`);
      renderResults($("#search-results"), body.results, msg, "搜索");
    } catch (err) { setMsg(msg, errorText(err), true); }
  });
}

async function searchImage(file) {
  const msg = $("#image-msg");
  if (!file) return;
  const preview = $("#image-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  setMsg(msg, "正在搜索相似图片…");
  const form = new FormData();
  form.append("image", file, file.name || "query.png");
  form.append("k", "24");
  try {
    const body = await (await api("/api/search/image", { method: "POST", body: form })).json();
    setMsg(msg, `最相似的 ${body.results.length} 张图片（${body.took_ms.toFixed(0)} 毫秒）`);
    renderResults($("#image-results"), body.results, msg, "以图搜图");
  } catch (err) { setMsg(msg, errorText(err), true); }
}

async function searchSimilar(hit) {
  selectTab($("#tab-image"));
  try {
    const blob = await (await api(`${hit.thumbnail}&size=512`)).blob();
    await searchImage(new File([blob], hit.id.split("/").pop() || "query.jpg", { type: blob.type }));
  } catch (err) { setMsg($("#image-msg"), errorText(err), true); }
}

// ------------------------------------------------------------------------------------------ detection
const PALETTE = ["#e6194b", "#1c64f2", "#0e9f6e", "#f08c00", "#9333ea", "#0891b2", "#db2777", "#65a30d",
  "#b45309", "#4f46e5"];

function labelColor(name) {  // one colour per label of the request, in the order they were typed
  const i = state.detectLabels ? state.detectLabels.indexOf(name) : -1;
  if (i >= 0) return PALETTE[i % PALETTE.length];
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${h}, 75%, 40%)`;
}

function renderDetections() {
  const boxes = $("#detect-boxes");
  const tbody = $("#detect-table tbody");
  const img = $("#detect-image");
  boxes.replaceChildren();
  tbody.replaceChildren();
  const W = state.detectSize ? state.detectSize[0] : img.naturalWidth;
  const H = state.detectSize ? state.detectSize[1] : img.naturalHeight;
  for (const det of state.detections) {
    const [x1, y1, x2, y2] = det.box;
    const color = labelColor(det.label);
    const box = document.createElement("div");
    box.className = "box";
    box.dataset.score = det.score;
    box.style.setProperty("--c", color);
    box.style.left = `${(100 * x1) / W}%`;
    box.style.top = `${(100 * y1) / H}%`;
    box.style.width = `${(100 * (x2 - x1)) / W}%`;
    box.style.height = `${(100 * (y2 - y1)) / H}%`;
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = `${det.label} ${det.score.toFixed(2)}`;
    box.append(tag);
    boxes.prepend(box);  // the best last in the DOM, so drawn on top of weaker overlapping boxes

    const tr = document.createElement("tr");
    tr.dataset.score = det.score;
    const name = document.createElement("td");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.setProperty("--c", color);
    name.append(sw, det.label);
    const score = document.createElement("td");
    score.className = "num";
    score.textContent = det.score.toFixed(3);
    const where = document.createElement("td");
    where.className = "num";
    where.textContent = det.box.map((v) => Math.round(v)).join(", ");
    tr.append(name, score, where);
    tbody.append(tr);
  }
  applyThreshold();
}

function applyThreshold() {
  const t = Number($("#threshold").value);
  $("#threshold-value").textContent = t.toFixed(2);
  let shown = 0;
  for (const el of document.querySelectorAll("#detect-boxes .box, #detect-table tbody tr")) {
    const hide = Number(el.dataset.score) < t;
    el.classList.toggle("hidden", hide);
    if (!hide && el.classList.contains("box")) shown += 1;
  }
  const total = state.detections.length;
  $("#detect-count").textContent = total || state.detectDone ? `显示 ${shown} / ${total} 个目标` : "";
  $("#detect-table").hidden = !state.detectDone;
  placeTags();
}

// Tags placed so that none covers another (the rule of the Python pictures, detection/visualize.py): the
// best-scored first, each at the first free spot above its box, inside its top edge, below it, inside its
// bottom edge, then further above / below; only a picture too crowded for any free spot stacks a tag above
// its box. Re-run when the threshold shows other boxes and when the picture changes size.
function placeTags() {
  const layer = $("#detect-boxes");
  const W = layer.clientWidth;
  const H = layer.clientHeight;
  if (!W || !H) return;
  const placed = [];
  const free = (x, y, w, h) => placed.every(([a, b, a2, b2]) => x + w <= a || a2 <= x || y + h <= b || b2 <= y);
  const boxes = [...layer.querySelectorAll(".box:not(.hidden)")];
  boxes.sort((a, b) => Number(b.dataset.score) - Number(a.dataset.score));
  for (const box of boxes) {
    const tag = box.querySelector(".tag");
    const w = tag.offsetWidth;
    const h = tag.offsetHeight;
    const x1 = box.offsetLeft;
    const y1 = box.offsetTop;
    const y2 = y1 + box.offsetHeight;
    const x = Math.min(Math.max(x1, 0), Math.max(0, W - w));
    const spots = [y1 - h, y1, y2, y2 - h];
    for (let k = 2; k < 2 + H / Math.max(h, 1); k += 1) spots.push(y1 - k * h, y2 + (k - 1) * h);
    let y = spots.find((c) => c >= 0 && c <= H - h && free(x, c, w, h));
    if (y === undefined) y = Math.min(Math.max(y1 - h, 0), Math.max(0, H - h));
    tag.style.left = `${x - x1 - box.clientLeft}px`;  // relative to the box's padding edge
    tag.style.top = `${y - y1 - box.clientTop}px`;
    placed.push([x, y, x + w, y + h]);
  }
}

async function detect(event) {
  event.preventDefault();
  const msg = $("#detect-msg");
  const file = $("#detect-file").files[0];
  const labels = $("#detect-labels").value.trim();
  if (!file) { setMsg(msg, "请先选择一张图片", true); $("#detect-file").focus(); return; }
  if (!labels) { setMsg(msg, "请输入要找的目标，用 ，或 , 分隔", true); $("#detect-labels").focus(); return; }
  const form = new FormData();
  form.append("image", file, file.name || "image.png");
  form.append("labels", labels);
  form.append("threshold", "0.05");  // everything from 0.05 up; the slider filters here, without a new request
  setMsg(msg, "正在检测…");
  await busy($("#detect-form button[type=submit]"), async () => {
    try {
      const body = await (await api("/api/detect", { method: "POST", body: form })).json();
      state.detections = body.detections;
      state.detectLabels = body.labels;
      state.detectSize = [body.width, body.height];
      state.detectDone = true;
      const img = $("#detect-image");
      img.src = URL.createObjectURL(file);
      $("#detect-stage").hidden = false;
      renderDetections();
      setMsg(msg, `找到 ${body.detections.length} 个候选目标（${body.took_ms.toFixed(0)} 毫秒），拖动阈值滑块筛选`);
    } catch (err) { setMsg(msg, errorText(err), true); }
  });
}

// ------------------------------------------------------------------------------------- classification
async function classify(event) {
  event.preventDefault();
  const msg = $("#classify-msg");
  const file = $("#classify-file").files[0];
  const labels = $("#classify-labels").value.trim();
  if (!file) { setMsg(msg, "请先选择一张图片", true); $("#classify-file").focus(); return; }
  if (!labels) { setMsg(msg, "请输入候选类别，用 ，或 , 分隔", true); $("#classify-labels").focus(); return; }
  const form = new FormData();
  form.append("image", file, file.name || "image.png");
  form.append("labels", labels);
  setMsg(msg, "正在分类…");
  await busy($("#classify-form button[type=submit]"), async () => {
    try {
      const body = await (await api("/api/classify", { method: "POST", body: form })).json();
      const list = $("#classify-results");
      list.replaceChildren();
      for (const r of body.results) {
        const li = document.createElement("li");
        const name = document.createElement("span");
        name.textContent = r.label;
        const track = document.createElement("span");
        track.className = "track";
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = `${(r.prob * 100).toFixed(1)}%`;
        track.append(fill);
        const num = document.createElement("span");
        num.className = "num";
        num.textContent = `${(r.prob * 100).toFixed(1)}%`;
        li.append(name, track, num);
        list.append(li);
      }
      setMsg(msg, `最可能是“${body.results[0].label}”（${body.took_ms.toFixed(0)} 毫秒）`);
    } catch (err) { setMsg(msg, errorText(err), true); }
  });
}

// ----------------------------------------------------------------------------------------- tabs, keys
function selectTab(tab, focus = false) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.replace("tab-", "")}`);
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length], true);
    });
  }
  const start = $(`#tab-${location.hash.slice(1)}`);
  if (start) selectTab(start);
  document.addEventListener("keydown", (e) => {
    const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (e.key === "/" && !typing) {
      e.preventDefault();
      selectTab($("#tab-search"));
      $("#query").focus();
    }
  });
}

function setupFileInput(input, nameEl, onFile) {
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (nameEl) nameEl.textContent = file ? file.name : "未选择图片";
    if (file && onFile) onFile(file);
  });
}

function setupImageSearch() {
  const drop = $("#image-drop");
  setupFileInput($("#image-file"), null, searchImage);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) searchImage(file);
  });
  document.addEventListener("paste", (e) => {
    if ($("#panel-image").hidden) return;
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });
}

// ------------------------------------------------------------------------------------------ startup
function showKeyForm() {
  $("#key-form").hidden = false;
  $("#api-key").focus();
}

async function loadInfo() {
  const status = $("#status");
  try {
    const info = await (await api("/api/info")).json();
    state.info = info;
    const what = info.index.modality === "image" ? "张图片" : "条文本";
    status.textContent = `模型 ${info.model} · 索引 ${info.index.size} ${what}` +
      (info.detector ? ` · 检测器 ${info.detector}` : " · 未加载检测器");
    status.className = "status ok";
    $("#foot-info").textContent = `上传上限 ${(info.limits.max_upload_bytes / 1048576).toFixed(0)} MB，` +
      `每次最多 ${info.limits.max_labels} 个标签`;
    const examples = $("#examples");
    examples.replaceChildren();
    for (const label of info.example_labels) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.textContent = label;
      chip.addEventListener("click", () => { $("#query").value = label; searchText(); });
      examples.append(chip);
    }
    if (info.example_labels.length) {
      if (!$("#detect-labels").value) $("#detect-labels").value = info.example_labels.slice(0, 4).join("，");
      if (!$("#classify-labels").value) $("#classify-labels").value = info.example_labels.slice(0, 4).join("，");
    }
    if (!info.detector) setMsg($("#detect-msg"), "此服务未加载检测器（启动时加 --detector）", true);
  } catch (err) {
    status.textContent = errorText(err);
    status.className = "status bad";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupTabs();
  setupImageSearch();
  $("#search-form").addEventListener("submit", searchText);
  $("#detect-form").addEventListener("submit", detect);
  $("#classify-form").addEventListener("submit", classify);
  $("#threshold").addEventListener("input", applyThreshold);
  $("#detect-image").addEventListener("load", placeTags);
  window.addEventListener("resize", placeTags);
  setupFileInput($("#detect-file"), $("#detect-file-name"));
  setupFileInput($("#classify-file"), $("#classify-file-name"), (file) => {
    const img = $("#classify-preview");
    img.src = URL.createObjectURL(file);
    img.hidden = false;
  });
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    $("#key-form").hidden = true;
    loadInfo();
  });
  loadInfo();
  $("#query").focus();
});
