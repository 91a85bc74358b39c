// retrieve serve: the pair page. Names go in through textContent; layers are SVG built with the DOM.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#00e5ff", "#76ff03", "#ffea00", "#ff4081", "#ffffff", "#ff9100", "#d500f9", "#1de9b6"];
const P = new URLSearchParams(location.search);

function svgLayer(stack, cls, size) {
  const old = stack.querySelector("svg." + cls);
  if (old) old.remove();
  const s = document.createElementNS(SVG, "svg");
  s.setAttribute("class", cls);
  s.setAttribute("viewBox", `0 0 ${size[1]} ${size[0]}`);
  s.setAttribute("preserveAspectRatio", "none");
  stack.append(s);
  return s;
}

function node(parent, tag, attrs, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  parent.append(n);
  return n;
}

function boxText(b) { return `x ${b[0]}–${b[2]}, y ${b[1]}–${b[3]}`; }

function draw(d) {
  const sizes = d.sizes;
  const sides = [["q", "query", sizes.query], ["r", "result", sizes.result]];
  for (const [s, name, size] of sides) {
    const stack = $("stack-" + s);
    const long = Math.max(size[0], size[1]);
    const regions = svgLayer(stack, "regions", size);
    const sw = long / 250, fs = long / 18;
    for (const c of d.correspondences) {
      const b = c[name + "_box"], col = COLOURS[(c.rank - 1) % COLOURS.length];
      node(regions, "rect", { x: b[0], y: b[1], width: b[2] - b[0], height: b[3] - b[1], fill: "none", stroke: col, "stroke-width": sw });
      node(regions, "text", { x: b[0] + 2 * sw, y: b[1] + fs, fill: col, "font-size": fs, "font-weight": "bold", stroke: "#000", "stroke-width": fs / 14, "paint-order": "stroke" }, String(c.rank));
    }
    const fb = d[name === "query" ? "box_a" : "box_b"];  // a faces index: the face compared, boxed
    if (fb) node(svgLayer(stack, "faces", size), "rect", { x: fb[0], y: fb[1], width: fb[2] - fb[0], height: fb[3] - fb[1], fill: "none", stroke: "#ffffff", "stroke-width": sw, "stroke-dasharray": `${4 * sw} ${2 * sw}` });
    const inl = svgLayer(stack, "inliers", size);
    const pts = (d.inlier_points || {})[name] || [];
    pts.forEach((p, i) => node(inl, "circle", { cx: p[0], cy: p[1], r: long / 120, fill: "none", stroke: COLOURS[i % COLOURS.length], "stroke-width": sw }));
  }
  apply();
}

function apply() {
  const op = $("opacity").value / 100, on = $("show-heat").checked;
  document.querySelectorAll(".heat").forEach((h) => { h.style.opacity = op; h.style.display = on ? "" : "none"; });
  document.querySelectorAll("svg.regions").forEach((s) => { s.style.display = $("show-regions").checked ? "" : "none"; });
  document.querySelectorAll("svg.inliers").forEach((s) => { s.style.display = $("show-inliers").checked ? "" : "none"; });
}

function row(table, cells) {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
  table.append(tr);
}

async function load() {
  const q = P.get("q"), r = P.get("r");
  $("method").value = P.get("method") || "sfam";
  $("verify").checked = P.get("verify") === "1";
  // back to the page the pair was opened from: the search (by default), the duplicates or a person's photos
  const from = P.get("from") || "";
  $("back").href = /^(duplicates|people(\?id=\d+)?)$/.test(from) ? "/" + from : "/?" + new URLSearchParams({ q: q || "" });
  $("status").textContent = "computing the heat maps…";
  $("status").className = "muted";
  let d;
  try {
    const res = await fetch("/api/explain?" + new URLSearchParams({ q, r, method: $("method").value, verify: $("verify").checked ? "1" : "0" }));
    d = await res.json();
    if (!res.ok) throw new Error(d.error || res.statusText);
  } catch (e) {
    $("status").textContent = e.message;
    $("status").className = "error";
    return;
  }
  const qn = d.shown.query.name, rn = d.shown.result.name;
  const title = d.verdict.match ? `Why ${rn} matches ${qn}` : `${qn} and ${rn}: ${d.verdict.headline}`;
  $("title").textContent = title;
  document.title = "retrieve: " + title;
  $("story").hidden = false;
  $("score").textContent = d.score_text;
  $("verdict").textContent = d.verdict.text;
  $("explained").textContent = d.explained.text + ` (method: ${d.method}; ${d.seconds.toFixed(2)} s)`;
  $("map-words").textContent = d.explained.map;  // what the maps are, from the server (explain/methods.py describe_map)
  $("photo-q").src = d.shown.query.view;
  $("photo-r").src = d.shown.result.view;
  $("heat-q").src = d.layers.query_heat;
  $("heat-r").src = d.layers.result_heat;
  const face = (n) => (n === undefined ? "" : ` · face ${n}`);  // a faces index compares one face of each
  $("cap-q").textContent = `query: ${d.shown.query.path || qn} (${d.sizes.query[1]}×${d.sizes.query[0]})${face(d.face_a)}`;
  $("cap-r").textContent = `result: ${d.shown.result.path} (${d.sizes.result[1]}×${d.sizes.result[0]})${face(d.face_b)}`;
  const rt = $("regions");
  rt.querySelectorAll("tr:not(:first-child)").forEach((t) => t.remove());
  for (const c of d.correspondences) row(rt, [c.rank, (100 * c.share).toFixed(1) + " %", boxText(c.query_box), boxText(c.result_box)]);
  $("regions-section").hidden = !d.correspondences.length;
  const has = d.inliers !== undefined;
  $("show-inliers").disabled = !has;
  $("inliers-note").textContent = has ? `Geometric verification: ${d.inliers} inliers (same object ${d.confirmed ? "confirmed" : "not confirmed"}; 10 needed).` : "Tick “verify geometry” to match SIFT points under one homography.";
  const ct = $("channels");
  ct.querySelectorAll("tr:not(:first-child)").forEach((t) => t.remove());
  for (const c of d.top_channels || []) row(ct, [c.channel, c.cis.toFixed(5), (100 * c.share).toFixed(1) + " %"]);
  $("channels").title = d.channels_share_of ? "share: " + d.channels_share_of : "";
  $("channels-summary").textContent = `Channels behind the explained similarity (${d.channels_note || "none for this method"})`;
  $("dl-json").href = d.downloads.json;
  $("dl-report").href = d.downloads.report;
  $("dl-png").href = d.downloads.png;
  $("status").textContent = "";
  draw(d);
  document.body.dataset.ready = "1";
}

for (const id of ["opacity", "show-heat", "show-regions", "show-inliers"]) {
  $(id).addEventListener("input", apply);
  $(id).addEventListener("change", apply);
}
for (const id of ["method", "verify"]) {
  $(id).addEventListener("change", () => {
    P.set("method", $("method").value);
    P.set("verify", $("verify").checked ? "1" : "0");
    history.replaceState(null, "", "/pair?" + P);
    document.body.dataset.ready = "";
    load();
  });
}
load();
