// retrieve serve: the People page. Every name from the server goes in through textContent or an input's value.
"use strict";
const SVG = "http://www.w3.org/2000/svg";

function say(id, text, cls) {
  $(id).textContent = text;
  $(id).className = cls || "muted";
}

function title(p) { return p.name || `Person ${p.id}`; }

function counts(p) {
  return `${p.photos} photo${p.photos === 1 ? "" : "s"} · ${p.faces} face${p.faces === 1 ? "" : "s"}`;
}

async function rename(id, input, statusEl) {
  const name = input.value.trim();
  if (name === (input.dataset.saved || "")) return;
  statusEl.textContent = "saving…";
  statusEl.classList.remove("error");
  try {
    const p = await api(`/api/people/${id}/name`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
    });
    input.value = input.dataset.saved = p.name || "";
    statusEl.textContent = p.name ? "saved" : "name removed";
    return p;
  } catch (e) {
    statusEl.textContent = e.message;
    statusEl.classList.add("error");
  }
}

function nameInput(p, statusEl, after) {
  const input = el("input", "name-input");
  input.type = "text";
  input.maxLength = 200;
  input.placeholder = "unnamed: type a name";
  input.value = input.dataset.saved = p.name || "";
  input.setAttribute("aria-label", `name of person ${p.id}`);
  const save = async () => { const q = await rename(p.id, input, statusEl); if (q && after) after(q); };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); input.blur(); } });
  input.addEventListener("change", save);
  return input;
}

async function all() {
  $("all").hidden = false;
  $("one").hidden = true;
  document.title = "retrieve: people";
  let d;
  try { d = await api("/api/people"); } catch (e) {
    say("status", e.message, e.status === 400 ? "note" : "error");  // one line: why there is nobody (not a faces index, …)
    document.body.dataset.ready = "1";
    return;
  }
  const grid = $("people");
  grid.replaceChildren();
  for (const p of d.people) {
    const c = el("div", "card person");
    c.dataset.id = p.id;
    const a = el("a", "face-link");
    a.href = p.url;
    a.title = `${title(p)}: see their photos`;
    const img = el("img"); img.alt = title(p); img.loading = "lazy";
    if (p.face) img.src = p.face.thumb;
    a.append(img);
    a.addEventListener("click", (e) => { e.preventDefault(); history.pushState(null, "", p.url); route(); });
    const st = el("div", "muted small");
    c.append(a, nameInput(p, st), el("div", "counts", counts(p)), st);
    grid.append(c);
  }
  say("status", (d.people.length ? `${d.people.length} ${d.people.length === 1 ? "person" : "people"}` : "No faces in this index yet") + updated(d.updated));
  document.body.dataset.ready = "1";
}

// what giving the waiting faces a person did, as `retrieve people` says it on stderr
function updated(u) {
  if (!u) return "";
  if (u.locked) return `; ${u.waiting} faces wait for a person, but ${u.locked.charAt(0).toLowerCase()}${u.locked.slice(1)}; the people are shown as they were`;
  return `; people updated: ${u.faces} new faces (${u.kept} kept their person from before a re-index, ${u.joined} joined a known person, ${u.new_people} new people)`;
}

function boxLayer(stack, size, box) {
  const s = document.createElementNS(SVG, "svg");
  s.setAttribute("class", "boxes");
  s.setAttribute("viewBox", `0 0 ${size[1]} ${size[0]}`);
  s.setAttribute("preserveAspectRatio", "none");
  const r = document.createElementNS(SVG, "rect");
  const sw = Math.max(size[0], size[1]) / 150;
  for (const [k, v] of Object.entries({ x: box[0], y: box[1], width: box[2] - box[0], height: box[3] - box[1], fill: "none", stroke: "#00e5ff", "stroke-width": sw })) r.setAttribute(k, v);
  s.append(r);
  stack.append(s);
}

async function one(id) {
  $("all").hidden = true;
  $("one").hidden = false;
  say("one-status", "loading their photos…");
  say("name-status", "");
  let d;
  try { d = await api(`/api/people/${encodeURIComponent(id)}`); } catch (e) {
    say("one-status", e.message, "error");
    document.body.dataset.ready = "1";
    return;
  }
  const p = d.person;
  const show = (q) => { $("who").textContent = title(q); document.title = "retrieve: " + title(q); };
  show(p);
  $("counts").textContent = counts(p);
  if (p.face) { $("rep").src = p.face.thumb; $("rep").alt = `${title(p)}: representative face`; }
  const old = $("name");
  const input = nameInput(p, $("name-status"), show);
  input.id = "name";
  old.replaceWith(input);
  const grid = $("photos");
  grid.replaceChildren();
  for (const f of d.faces) {
    const c = el(f.pair ? "a" : "div", "card photo-card" + (f.representative ? " keeper" : ""));
    if (f.pair) { c.href = f.pair; c.title = `compare this face with ${title(p)}'s representative face\n${f.path}`; } else c.title = f.path;
    const stack = el("div", "stack");
    const img = el("img", "photo"); img.src = f.thumb; img.alt = f.name; img.loading = "lazy";
    stack.append(img);
    if (f.box && f.size) boxLayer(stack, f.size, f.box);
    c.append(stack);
    if (f.representative) c.append(el("div", "badge", "representative face"));
    c.append(el("div", "name", `${f.name} · face ${f.face}`));
    grid.append(c);
  }
  say("one-status", `${d.faces.length} face${d.faces.length === 1 ? "" : "s"}`);
  document.body.dataset.ready = "1";
}

function route() {
  document.body.dataset.ready = "";
  const id = new URLSearchParams(location.search).get("id");
  if (id) one(id); else all();
}

$("all-link").addEventListener("click", (e) => { e.preventDefault(); history.pushState(null, "", "/people"); route(); });
window.addEventListener("popstate", route);
fetch("/api/info").then((r) => r.json()).then((i) => { $("info").textContent = `${i.images} ${i.preset === "faces" ? "faces" : "photos"} · ${i.model} · ${i.index}`; }).catch(() => {});
route();
