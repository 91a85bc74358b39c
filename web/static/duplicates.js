// retrieve serve: the Duplicates page. Every name from the server goes in through textContent (never as HTML).
"use strict";
const LIMIT = 50;
const TIERS = { exact: "exact copies (the same bytes)", near: "near-duplicates (the same photo, edited)", similar: "similar shots" };
const state = { offset: 0, timer: null };

function status(text, cls) {
  $("status").textContent = text;
  $("status").className = cls || "muted";
}

function bytes(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
  if (n >= 1e3) return Math.round(n / 1e3) + " kB";
  return n + " B";
}

function when(m) {
  const d = new Date(m.date * 1000);
  return d.toISOString().slice(0, 16).replace("T", " ") + (m.date_source === "exif" ? " (taken)" : " (file date)");
}

function evidence(m, tier) {
  if (m.keeper) return "suggested keeper";
  if (tier === "exact") return "the same bytes";
  const parts = [];
  if (m.score !== null && m.score !== undefined) parts.push(`score ${m.score.toFixed(4)}`);
  if (m.percentile !== null && m.percentile !== undefined) parts.push(`percentile ${m.percentile.toFixed(2)}`);
  if (m.inliers !== null && m.inliers !== undefined) parts.push(`${m.inliers} inliers`);
  if (m.agreement !== null && m.agreement !== undefined) parts.push(`pixels agree ${m.agreement.toFixed(2)}`);
  return parts.join(" · ");
}

function card(m, tier) {
  const a = el(m.pair ? "a" : "div", "card member" + (m.keeper ? " keeper" : ""));
  if (m.pair) { a.href = m.pair; a.title = "why it matches the keeper\n" + m.path; } else a.title = m.path;
  const img = el("img"); img.src = m.thumb; img.alt = m.name; img.loading = "lazy";
  a.append(img);
  if (m.keeper) a.append(el("div", "badge", "keeper"));
  a.append(el("div", "evidence", evidence(m, tier)));
  a.append(el("div", "muted", `${m.width}×${m.height} · ${bytes(m.size)}`));
  a.append(el("div", "muted", when(m)));
  a.append(el("div", "name", m.name));
  return a;
}

function show(d) {
  const groups = $("groups");
  groups.replaceChildren();
  const s = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const how = `${s(d.pairs_checked, "pair")} checked in ${d.seconds.toFixed(1)} s`;
  $("summary").textContent = d.total_groups
    ? `${s(d.total_groups, "group")} among ${s(d.photos, "photo")} (${how})`
    : `No duplicates among ${s(d.photos, "photo")} (${how}).`;
  for (const g of d.groups) {
    const s = el("section", "group");
    s.dataset.tier = g.tier;
    const h = el("h3", "", `Group ${g.id} · ${TIERS[g.tier] || g.tier} · ${g.members.length} photos`);
    s.append(h);
    const row = el("div", "members");
    for (const m of g.members) row.append(card(m, g.tier));
    s.append(row);
    groups.append(s);
  }
  $("pager").hidden = !d.total_groups || (d.offset === 0 && !d.more);
  $("page").textContent = `groups ${d.offset + 1}–${d.offset + d.groups.length} of ${d.total_groups}`;
  $("prev").disabled = d.offset === 0;
  $("next").disabled = !d.more;
  status("");
  document.body.dataset.ready = "1";
}

async function load() {
  clearTimeout(state.timer);
  document.body.dataset.ready = "";
  const p = new URLSearchParams({ similar: $("similar").checked ? "1" : "0", offset: state.offset, limit: LIMIT });
  history.replaceState(null, "", "/duplicates?" + new URLSearchParams({ similar: p.get("similar"), offset: state.offset }));
  let r, d;
  try {
    r = await fetch("/api/duplicates?" + p);
    try { d = await r.json(); } catch (e) { d = { error: `${r.status} ${r.statusText}` }; }
  } catch (e) { status(e.message, "error"); return; }
  if (r.status === 202) {  // still being found: say how far, ask again
    const of = d.total ? ` (${d.done} of ${d.total} candidate pairs tested, ${d.seconds.toFixed(0)} s)` : "";
    status(d.status === "waiting" ? "waiting for another computation of the groups…" : "finding the groups" + of + "…");
    state.timer = setTimeout(load, 1000);
    return;
  }
  if (!r.ok) {  // one line: why there is nothing to show (a faces index, …)
    $("groups").replaceChildren();
    $("summary").textContent = "";
    $("pager").hidden = true;
    status(d.error || `${r.status} ${r.statusText}`, r.status === 400 ? "note" : "error");
    document.body.dataset.ready = "1";
    return;
  }
  show(d);
}

async function init() {
  const p = new URLSearchParams(location.search);
  $("similar").checked = p.get("similar") === "1";
  state.offset = Number(p.get("offset") || 0);
  $("similar").addEventListener("change", () => { state.offset = 0; status("finding the groups…"); load(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - LIMIT); load(); window.scrollTo(0, 0); });
  $("next").addEventListener("click", () => { state.offset += LIMIT; load(); window.scrollTo(0, 0); });
  fetch("/api/info").then((r) => r.json()).then((i) => { $("info").textContent = `${i.images} photos · ${i.model} · ${i.index}`; }).catch(() => {});
  load();
}
init();
