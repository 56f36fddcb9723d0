// The cliplens page: search the catalog by text or photo, browse similar photos, play a
// video found from its moment, classify a dropped photo. Plain JavaScript, no external
// files: it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("cliplens-token") || "";

function headers() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      detail = body.detail || detail;
    } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return response.json();
}

function status(text) {
  $("status").textContent = text;
}

// Thumbnails: plain URLs, or fetched with the token when the server needs one.
async function setImage(img, url) {
  if (!token) {
    img.src = url;
    return;
  }
  const response = await fetch(url, { headers: headers() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

// Results come a page at a time (?n= sets its size, 40 by default); "More", or scrolling
// to it, loads the next page. The cut-off (min score) applies to every page.
const PAGE = Math.min(200, Math.max(1, parseInt(new URLSearchParams(location.search).get("n"), 10) || 40));
let current = null; // { title, fetchPage(offset), next, loading }

function cutoff() {
  return $("min-score").value.trim();
}

function paging(offset) {
  const min = cutoff();
  return `n=${PAGE}&offset=${offset}${min === "" ? "" : `&min_score=${encodeURIComponent(min)}`}`;
}

// A moment as the page shows it: mm:ss, or h:mm:ss past an hour (01:23, 1:02:03).
function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const two = (n) => String(n).padStart(2, "0");
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}:${two(m)}:${two(s % 60)}` : `${two(m)}:${two(s % 60)}`;
}

// A result's thumbnail at the page's size. A video's thumb_url carries its moment
// (?t=...), so the size is set among the URL's parameters, not appended.
function thumbnail(hit) {
  const url = new URL(hit.thumb_url, location.href);
  url.searchParams.set("size", "360");
  const img = document.createElement("img");
  img.alt = hit.name;
  img.loading = "lazy";
  img.width = 180;
  img.height = 180;
  setImage(img, url.pathname + url.search);
  return img;
}

function label(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

// A photo: one button, which shows similar photos.
function photoCard(hit) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "hit";
  button.dataset.id = hit.id;
  button.title = `${hit.path}\nShow similar photos`;
  button.append(thumbnail(hit), label("name", hit.name), label("score", hit.score.toFixed(3)));
  button.addEventListener("click", () => similar(hit));
  return button;
}

// A video: its frame at the moment found, with that moment's badge; clicking plays it
// from there, in the card. Its other moments found play from theirs; "Similar" shows
// what looks like it.
function videoCard(hit) {
  const card = document.createElement("div");
  card.className = "hit video";
  card.dataset.id = hit.id;
  const play = document.createElement("button");
  play.type = "button";
  play.className = "play";
  play.title = `${hit.path}\nPlay from ${clock(hit.time)}`;
  play.append(thumbnail(hit), label("badge", `▶ ${clock(hit.time)}`));
  play.addEventListener("click", () => playVideo(card, hit, hit.time));
  const moments = label("moments", "");
  const others = hit.moments.filter((m) => m.time !== hit.time).sort((a, b) => a.time - b.time);
  for (const moment of others) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "moment";
    chip.textContent = `▶ ${clock(moment.time)}`;
    chip.title = `Play from ${clock(moment.time)} (score ${moment.score.toFixed(3)})`;
    chip.addEventListener("click", () => playVideo(card, hit, moment.time));
    moments.append(chip);
  }
  const more = document.createElement("button");
  more.type = "button";
  more.className = "similar";
  more.textContent = "Similar";
  more.title = `Show photos and videos like ${hit.name}`;
  more.addEventListener("click", () => similar(hit));
  card.append(play, label("name", hit.name), label("score", hit.score.toFixed(3)), moments, more);
  return card;
}

// The card's player, made on the first play in place of the thumbnail. The moment is set
// once the video's length is known (loadedmetadata), or at once when it already is.
async function playVideo(card, hit, time) {
  let video = card.querySelector("video");
  if (video && video.readyState >= HTMLMediaElement.HAVE_METADATA) {
    video.currentTime = time;
    video.play().catch(() => {});
    return;
  }
  if (video) {
    video.dataset.start = String(time);
    return;
  }
  video = document.createElement("video");
  video.controls = true;
  video.playsInline = true;
  video.preload = "metadata";
  video.dataset.start = String(time);
  video.addEventListener("loadedmetadata", () => {
    video.currentTime = Number(video.dataset.start);
    video.play().catch(() => {});
  });
  video.addEventListener("error", () => status(`${hit.name} cannot be played in this browser.`));
  card.querySelector(".play").replaceWith(video);
  try {
    video.src = await videoSource(hit);
  } catch (error) {
    status(`Error: ${error.message}`);
  }
}

// Where the player reads the video. Without a token, its URL: the browser fetches the
// byte ranges it needs and seeks by them. A <video> cannot send the Authorization header,
// so with a token the video is fetched here, whole, as a blob: a large video then
// downloads entirely (and sits in memory) before it starts playing.
async function videoSource(hit) {
  if (!token) return hit.image_url;
  const response = await fetch(hit.image_url, { headers: headers() });
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  return URL.createObjectURL(await response.blob());
}

function showResults(data, title, append) {
  $("results-title").textContent = title;
  const list = $("results");
  if (!append) list.replaceChildren();
  for (const hit of data.results) {
    const item = document.createElement("li");
    item.append(hit.kind === "video" ? videoCard(hit) : photoCard(hit));
    list.append(item);
  }
  const count = list.children.length;
  const more = data.next_offset !== null && data.next_offset !== undefined;
  $("more").hidden = !more;
  status(count ? `${count} results${more ? ", more below" : ""}` : "No photos or videos found.");
}

async function run(title, fetchPage) {
  current = { title, fetchPage, next: null, loading: false };
  const mine = current;
  status("Searching…");
  $("more").hidden = true;
  try {
    const data = await fetchPage(0);
    if (current !== mine) return; // a newer search started meanwhile
    mine.next = data.next_offset;
    showResults(data, title, false);
  } catch (error) {
    status(`Error: ${error.message}`);
  }
}

async function loadMore() {
  const mine = current;
  if (!mine || mine.loading || mine.next === null || mine.next === undefined) return;
  mine.loading = true;
  try {
    const data = await mine.fetchPage(mine.next);
    if (current !== mine) return;
    mine.next = data.next_offset;
    showResults(data, mine.title, true);
  } catch (error) {
    status(`Error: ${error.message}`);
  } finally {
    mine.loading = false;
  }
}

function searchText(q) {
  history.replaceState(null, "", `?q=${encodeURIComponent(q)}${PAGE === 40 ? "" : `&n=${PAGE}`}`);
  return run(`Results for “${q}”`,
             (offset) => api(`/v1/search?q=${encodeURIComponent(q)}&${paging(offset)}`));
}

function searchImage(file) {
  const q = $("q").value.trim();
  return run(`Photos like ${file.name}${q ? ` + “${q}”` : ""}`, (offset) => {
    const form = new FormData();
    form.append("image", file);
    if (q) form.append("q", q);
    form.append("n", String(PAGE));
    form.append("offset", String(offset));
    if (cutoff() !== "") form.append("min_score", cutoff());
    return api("/v1/search/image", { method: "POST", body: form });
  });
}

function similar(hit) {
  return run(`Similar to ${hit.name}`, (offset) => api(`/v1/similar/${hit.id}?${paging(offset)}`));
}

async function classify(file) {
  const preview = $("classify-preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name;
  preview.hidden = false;
  const out = $("classify-results");
  out.replaceChildren();
  const form = new FormData();
  form.append("images", file);
  form.append("labels", $("labels").value);
  form.append("top_k", "5");
  try {
    const data = await api("/v1/classify", { method: "POST", body: form });
    for (const { label, score } of data.predictions[0].labels) {
      const item = document.createElement("li");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(score * 100)}%`;
      const text = document.createElement("span");
      text.textContent = `${label} ${(score * 100).toFixed(1)}%`;
      item.append(bar, text);
      out.append(item);
    }
  } catch (error) {
    const item = document.createElement("li");
    item.textContent = `Error: ${error.message}`;
    out.append(item);
  }
}

function dropZone(zone, input, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) onFile(file);
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { if (input.files[0]) onFile(input.files[0]); });
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) searchText(q);
});
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("cliplens-token", token);
  $("token-form").hidden = true;
  const q = $("q").value.trim();
  if (q) searchText(q);
});
$("classify-form").addEventListener("submit", (e) => e.preventDefault());
$("more").addEventListener("click", loadMore);
new IntersectionObserver((seen) => { if (seen.some((e) => e.isIntersecting)) loadMore(); })
  .observe($("more"));
$("min-score").addEventListener("change", () => { if (current) run(current.title, current.fetchPage); });
dropZone($("drop"), $("search-file"), searchImage);
dropZone($("classify-drop"), $("classify-file"), classify);
document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (e.key === "/" && !typing) { e.preventDefault(); $("q").focus(); }
});

(async () => {
  try {
    const health = await (await fetch("/v1/health")).json();
    if (health.auth && !token) $("token-form").hidden = false;
    if (!health.searchable) status("No catalog yet: run 'cliplens index FOLDER', then search.");
  } catch (_) {
    status("The server does not answer.");
  }
  const q = new URLSearchParams(location.search).get("q");
  if (q) {
    $("q").value = q;
    searchText(q);
  }
})();
