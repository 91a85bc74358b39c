// retrieve serve: the search page. Every name from the server goes in through textContent (never as HTML).
"use strict";
const state = { q: null, offset: 0, coffset: 0, climit: 24 };

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function params() {
  const p = new URLSearchParams({ q: state.q, k: $("k").value, qe: $("qe").value, offset: state.offset });
  if ($("verify").checked) p.set("verify", "60"); else p.set("verify", "0");
  return p;
}

async function search() {
  if (!state.q) return;
  status("searching…");
  $("again").disabled = false;
  try {
    const d = await api("/api/search?" + params());
    history.replaceState(null, "", "/?" + params());
    showQuery(d.shown);
    showResults(d);
    status(`${d.results.length} results in ${(d.seconds * 1000).toFixed(0)} ms`);
  } catch (e) { status(e.message, true); }
}

function showQuery(shown) {
  $("query").hidden = false;
  $("query-img").src = shown.thumb;
  $("query-name").textContent = shown.name;
}

function showResults(d) {
  $("results-section").hidden = false;
  const grid = $("results");
  grid.replaceChildren();
  const verified = d.results.some((h) => h.inliers !== undefined);
  $("results-note").textContent = `(${d.metric}${d.qe ? ", QE " + d.qe : ""}${verified ? ", verified" : ""})`;
  for (const h of d.results) {
    const a = el("a", "card");
    a.href = "/pair?" + new URLSearchParams({ q: state.q, r: h.id, verify: $("verify").checked ? "1" : "0" });
    const img = el("img"); img.src = h.thumb; img.alt = h.name; img.loading = "lazy";
    a.append(img, el("div", "score", `#${h.rank} · score ${h.score.toFixed(4)}`));
    const v = h.verdict || {};
    a.append(el("div", "verdict" + (v.match ? " match" : ""), v.headline || ""));
    if (h.inliers !== undefined) a.append(el("div", "inliers muted", `${h.inliers} inliers`));
    a.append(el("div", "name", h.name));
    a.title = (v.text || "") + "\n" + h.path;
    grid.append(a);
  }
  if (!d.results.length) grid.append(el("p", "muted", "No results on this page."));
  $("page").textContent = `results ${d.offset + 1}–${d.offset + d.results.length}`;
  $("prev").disabled = d.offset === 0;
  $("next").disabled = !d.more;
}

async function upload(file) {
  if (!file) return;
  status(`uploading ${file.name}…`);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const d = await api("/api/upload", { method: "POST", body: form });
    state.q = "upload:" + d.token;
    state.offset = 0;
    await search();
  } catch (e) { status(e.message, true); }
}

async function collection() {
  try {
    const d = await api(`/api/images?offset=${state.coffset}&limit=${state.climit}`);
    const grid = $("collection");
    grid.replaceChildren();
    for (const im of d.images) {
      const a = el("a", "card");
      a.href = "#";
      a.dataset.id = im.id;
      const img = el("img"); img.src = im.thumb; img.alt = im.name; img.loading = "lazy";
      a.append(img, el("div", "name", im.name));
      a.title = im.path;
      a.addEventListener("click", (ev) => { ev.preventDefault(); state.q = String(im.id); state.offset = 0; search(); window.scrollTo(0, 0); });
      grid.append(a);
    }
    $("cpage").textContent = d.total ? `${d.offset + 1}–${d.offset + d.images.length} of ${d.total}` : "empty";
    $("cprev").disabled = d.offset === 0;
    $("cnext").disabled = d.offset + d.images.length >= d.total;
  } catch (e) { status(e.message, true); }
}

async function init() {
  // A photo chosen or dropped before /api/info has answered is not lost: its listeners come first.
  const drop = $("drop");
  $("file").addEventListener("change", (e) => upload(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
  try {
    const i = await api("/api/info");
    $("info").textContent = `${i.images} photos · ${i.model} · ${i.index}`;
    if (i.search_defaults && Number(i.search_defaults.verify) > 0) $("verify").checked = true;
  } catch (e) { status(e.message, true); }
  $("again").addEventListener("click", () => { state.offset = 0; search(); });
  for (const id of ["k", "qe", "verify"]) $(id).addEventListener("change", () => { state.offset = 0; search(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - Number($("k").value)); search(); });
  $("next").addEventListener("click", () => { state.offset += Number($("k").value); search(); });
  $("cprev").addEventListener("click", () => { state.coffset = Math.max(0, state.coffset - state.climit); collection(); });
  $("cnext").addEventListener("click", () => { state.coffset += state.climit; collection(); });
  const p = new URLSearchParams(location.search);
  if (p.get("k")) $("k").value = p.get("k");
  if (p.get("qe")) $("qe").value = p.get("qe");
  if (p.get("verify")) $("verify").checked = p.get("verify") !== "0";
  if (p.get("q")) { state.q = p.get("q"); state.offset = Number(p.get("offset") || 0); search(); }
  collection();
}
init();
