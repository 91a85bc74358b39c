// retrieve serve: what every page's script uses. Loaded first by each page; names from the server go in through
// textContent (never as HTML).
"use strict";
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// GET or POST ``url``; the JSON answer, else an Error with the server's one-line message and the HTTP status.
async function api(url, opts) {
  const r = await fetch(url, opts);
  let d;
  try { d = await r.json(); } catch (e) { d = { error: `${r.status} ${r.statusText}` }; }
  if (!r.ok) { const e = new Error(d.error || `${r.status} ${r.statusText}`); e.status = r.status; throw e; }
  return d;
}
