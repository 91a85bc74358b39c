"""retrieve serve under load: 16 concurrent clients over the loopback mixing uploads, searches and explanations
for 60 s, every answer checked; p50/p99 per request type, throughput, errors and the server's peak RSS; then a
probe that a search is answered while an explanation's report is being drawn.

    python bench/serve_load.py [--photos 300] [--clients 16] [--seconds 60] [--threads 1]

The collection: ``--photos`` photos of ../shared/data/caltech101 (the first of each category in turn), else the
photos of data/samples and scikit-image (the table says which), indexed by ``retrieve index`` (default preset).
The server: ``retrieve serve`` as a user runs it, its own process, ``RETRIEVE_THREADS=--threads``; the token in
the URL it prints, when there is one, is sent with every request (``Authorization: token …``).

The truth, made before the load by the CLI: ``retrieve search Q… --json -k 10`` for the query photos (a search by
an indexed photo's id leaves the photo out, as the CLI does) and with ``--include-self`` (an uploaded photo is not
a row: the photo itself comes first). Under load, each client repeatedly picks one of:

- search by id: ``GET /api/search?q=<id>&k=10`` -- the CLI's ids in order and scores (to 1e-4);
- search by upload: ``POST /api/search?k=10`` with the photo (multipart or raw body) -- the CLI's --include-self
  answer;
- upload: ``POST /api/upload`` -- its token is the photo's SHA-256 and its thumbnail is served;
- explanation: ``GET /api/explain?q=<id>&r=<a hit>`` -- its score is the score the search gave that pair; every
  other one also downloads its report (which waits for the background drawing);
- thumbnail: ``GET /thumb/<id>`` -- a JPEG.

A wrong answer, an HTTP error or a request without an answer (a timeout, a dropped connection) is counted as an
error of its type. Bounded in time (``--seconds``, each request at most ``--timeout``) and in count
(``--max-requests``). ``--before REV``: the same load, first, on the server of revision REV (its own worktree; the
same index and truth). Writes bench/results/serve-load.md (``--name``); exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import _common

ROOT = _common.ROOT
SAMPLES = ROOT / "data" / "samples"
TYPES = ("search by id", "search by upload", "upload", "explanation", "report download", "thumbnail")
MIX = (("search by id", 40), ("search by upload", 20), ("upload", 10), ("explanation", 20), ("thumbnail", 10))
TARGETS = {"p99 search": 1.0, "peak RSS": 2e9, "probe": 0.5}


# -- the collection and the truth ----------------------------------------------------------------------------------
def collect_photos(dest: Path, n: int) -> str:
    """``n`` photos copied into ``dest``; returns where they came from."""
    dest.mkdir(parents=True)
    cal = _common.shared_dataset("caltech101")
    if cal is not None:
        cats = sorted(d for d in cal.iterdir() if d.is_dir())
        files = [sorted(d.glob("*.jpg")) for d in cats]
        picked = []
        for i in range(max(len(f) for f in files)):
            picked += [f[i] for f in files if i < len(f)]
        for p in picked[:n]:
            shutil.copy(p, dest / f"{p.parent.name}_{p.name}")
        return f"caltech101 ({min(n, len(picked))} photos, {len(cats)} categories)"
    import numpy as np
    import skimage.data
    from PIL import Image

    count = 0
    for p in sorted(SAMPLES.glob("*")):
        if p.suffix.lower() in (".png", ".jpg"):
            shutil.copy(p, dest / p.name)
            count += 1
    for name in ("astronaut", "brick", "cat", "chelsea", "coffee", "colorwheel", "grass", "gravel", "hubble_deep_field",
                 "immunohistochemistry", "logo", "motorcycle_left", "page", "retina", "rocket", "text"):
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:
            continue
        Image.fromarray(arr).convert("RGB").save(dest / f"sk_{name}.jpg", quality=90)
        count += 1
    return f"data/samples and scikit-image's photos ({count} photos; ../shared/data/caltech101 absent)"


def cli(*args, env: dict, timeout: float = 3600) -> str:
    r = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"retrieve {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def truth_of(queries: list[Path], index: Path, env: dict, include_self: bool) -> dict[str, list[tuple[int, float]]]:
    """{query path: [(id, score)] of its top 10} as `retrieve search --json` answers."""
    out = cli("search", *queries, "--index", index, "-k", "10", "--json", *(["--include-self"] if include_self else []),
              env=env)
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {a["query"]: [(h["id"], h["score"]) for h in a["results"]] for a in answers}


# -- the server ---------------------------------------------------------------------------------------------------
class Server:
    """``retrieve serve`` in its own process; its URL (and token) from what it prints."""

    def __init__(self, index: Path, env: dict, log: Path, tree: Path = ROOT):
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--index", str(index), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=tree, env=env)
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"at (http://\S+)", line)
            url = m.group(1) if m else None
        if url is None:
            self.proc.kill()
            raise SystemExit(f"retrieve serve printed no URL (see {log})")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its pipe drained
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        token = urllib.parse.parse_qs(parts.query).get("token", [None])[0]
        self.headers = {"Authorization": f"token {token}"} if token else {}
        self.token = token

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` field in bytes (VmRSS, VmHWM: the peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Client:
    """One keep-alive connection; a request that fails without an answer reconnects."""

    def __init__(self, server: Server, timeout: float):
        self.server, self.timeout = server, timeout
        self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
                ) -> tuple[int, bytes, dict]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers={**self.server.headers, **(headers or {})})
            r = self.conn.getresponse()
            data = r.read()
            if r.getheader("connection", "").lower() == "close":
                self.close()
            return r.status, data, dict(r.getheaders())
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    head = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


# -- the load -----------------------------------------------------------------------------------------------------
class Load:
    def __init__(self, server: Server, queries: list[dict], ids: list[int], args):
        self.server, self.queries, self.ids, self.args = server, queries, ids, args
        self.lock = threading.Lock()
        self.records: list[tuple[str, float, str | None, float | None]] = []  # (type, s, error, server's s)
        self.count = 0

    def take(self) -> bool:
        with self.lock:
            self.count += 1
            return self.count <= self.args.max_requests

    def record(self, kind: str, seconds: float, error: str | None, inside: float | None = None) -> None:
        with self.lock:
            self.records.append((kind, seconds, error, inside))

    def timed(self, kind: str, fn) -> object:
        t = time.perf_counter()
        try:
            out, error = fn(), None
        except Wrong as e:
            out, error = None, f"wrong: {e}"
        except Exception as e:  # no answer: a timeout, a dropped connection
            out, error = None, f"lost: {type(e).__name__}: {e}"
        inside = out.get("seconds") if isinstance(out, dict) else None  # the server's own time for the work
        self.record(kind, time.perf_counter() - t, error, inside)
        return out

    def client(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        c = Client(self.server, self.args.timeout)
        kinds, weights = zip(*MIX)
        n = 0
        while time.monotonic() < deadline and self.take():
            kind = rng.choices(kinds, weights)[0]
            q = rng.choice(self.queries)
            n += 1
            if kind == "search by id":
                self.timed(kind, lambda: check_search(c.request("GET", f"/api/search?q={q['id']}&k=10"), q["truth"]))
            elif kind == "search by upload":
                if n % 2:
                    body, ctype = multipart(q["name"], q["bytes"])
                else:
                    body, ctype = q["bytes"], "application/octet-stream"
                self.timed(kind, lambda: check_search(c.request("POST", "/api/search?k=10", body,
                                                                {"Content-Type": ctype}), q["truth_self"]))
            elif kind == "upload":
                body, ctype = multipart(q["name"], q["bytes"])
                self.timed(kind, lambda: check_upload(c, c.request("POST", "/api/upload", body,
                                                                   {"Content-Type": ctype}), q["bytes"]))
            elif kind == "explanation":
                r, score = rng.choice(q["truth"])
                doc = self.timed(kind, lambda: check_explain(c.request(
                    "GET", f"/api/explain?q={q['id']}&r={r}"), score))
                if doc is not None and n % 2:
                    self.timed("report download", lambda: check_file(c.request("GET", doc["downloads"]["report"]),
                                                                     b"<html", "report"))
            else:
                i = rng.choice(self.ids)
                self.timed(kind, lambda: check_file(c.request("GET", f"/thumb/{i}"), b"\xff\xd8", "thumbnail"))
        c.close()


class Wrong(Exception):
    """An answer that is not the right one."""


def _ok_json(answer) -> dict:
    status, body, _ = answer
    if status != 200:
        raise Wrong(f"HTTP {status}: {body[:120]!r}")
    return json.loads(body)


def check_search(answer, truth: list[tuple[int, float]]) -> dict:
    d = _ok_json(answer)
    got = [(h["id"], h["score"]) for h in d["results"]]
    if [i for i, _ in got] != [i for i, _ in truth]:
        raise Wrong(f"ids {[i for i, _ in got][:5]}… are not the CLI's {[i for i, _ in truth][:5]}…")
    worst = max((abs(a - b) for (_, a), (_, b) in zip(got, truth)), default=0.0)
    if worst > 1e-4:
        raise Wrong(f"a score differs from the CLI's by {worst:.2e}")
    if any("verdict" not in h for h in d["results"]):
        raise Wrong("a result has no verdict")
    return d


def check_upload(c: Client, answer, data: bytes) -> dict:
    d = _ok_json(answer)
    if d["token"] != hashlib.sha256(data).hexdigest():
        raise Wrong("the token is not the photo's SHA-256")
    check_file(c.request("GET", d["thumb"]), b"\xff\xd8", "the upload's thumbnail")
    return d


def check_explain(answer, score: float) -> dict:
    d = _ok_json(answer)
    if abs(d["score"] - score) > 1e-4:
        raise Wrong(f"explained score {d['score']:.6f} is not the search's {score:.6f}")
    return d


def check_file(answer, magic: bytes, what: str) -> bytes:
    status, body, _ = answer
    if status != 200 or magic not in body[:200]:
        raise Wrong(f"{what}: HTTP {status}, {body[:60]!r}")
    return body


# -- the probe: a search while a report is drawn -------------------------------------------------------------------
def probe(server: Server, queries: list[dict], rounds: int, timeout: float) -> list[dict]:
    """Each round: a new pair explained (Grad-CAM: the load explains with SFAM); its report's download (which waits
    for the drawing) started; 50 ms later a search by id, timed; whether the report was still being drawn when the
    search was answered."""
    out = []
    pairs = [(q, q["truth"][0][0]) for q in queries]
    for q, r in pairs[:rounds]:
        c1, c2 = Client(server, timeout), Client(server, timeout)
        doc = json.loads(c1.request("GET", f"/api/explain?q={q['id']}&r={r}&method=gradcam")[1])
        done = {}

        def download():
            t = time.perf_counter()
            done["status"] = c1.request("GET", doc["downloads"]["report"])[0]
            done["at"], done["seconds"] = time.perf_counter(), time.perf_counter() - t

        th = threading.Thread(target=download)
        th.start()
        time.sleep(0.05)
        t = time.perf_counter()
        status, body, _ = c2.request("GET", f"/api/search?q={q['id']}&k=10")
        answered = time.perf_counter()
        th.join(timeout)
        check_search((status, body, {}), q["truth"])
        out.append({"search_s": answered - t, "report_s": done.get("seconds"),
                    "while_drawing": answered < done.get("at", 0), "report_status": done.get("status")})
        c1.close()
        c2.close()
    return out


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        return m.group(1).strip() if m else "?"
    except OSError:
        return "?"


def run_load(tree: Path, label: str, index: Path, qpaths: list[Path], truth: dict, truth_self: dict, env: dict,
             base: Path, args) -> tuple[str, list[list]]:
    """The load and the probe against ``retrieve serve`` of the checkout ``tree``: (its section, its targets)."""
    env = {**env, "PYTHONPATH": str(tree)}
    server = Server(index, env, base / f"serve-{label}.log", tree)
    try:
        c = Client(server, args.timeout)
        images, offset = [], 0
        while True:
            page = _ok_json(c.request("GET", f"/api/images?offset={offset}&limit=500"))
            images += page["images"]
            offset += len(page["images"])
            if offset >= page["total"] or not page["images"]:
                break
        id_of = {i["path"]: i["id"] for i in images}
        queries = [{"id": id_of[os.path.realpath(p)], "name": p.name, "bytes": p.read_bytes(),
                    "truth": truth[os.path.realpath(p)], "truth_self": truth_self[os.path.realpath(p)]}
                   for p in qpaths]
        # warm: the first search and explanation load what they need
        check_search(c.request("GET", f"/api/search?q={queries[0]['id']}&k=10"), queries[0]["truth"])
        check_explain(c.request("GET", f"/api/explain?q={queries[0]['id']}&r={queries[0]['truth'][0][0]}"),
                      queries[0]["truth"][0][1])
        c.close()
        rss_before = server.status("VmRSS")

        load = Load(server, queries, list(id_of.values()), args)
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=load.client, args=(args.seed * 1000 + i, deadline), daemon=True)
                   for i in range(args.clients)]
        t0 = time.perf_counter()
        loads = [os.getloadavg()[0]]
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(1.0, deadline + 2 * args.timeout + 30 - time.monotonic()))
        wall = time.perf_counter() - t0
        loads.append(os.getloadavg()[0])
        hung = sum(th.is_alive() for th in threads)
        probes = probe(server, queries[::-1], args.probes, args.timeout) if not hung else []
        peak = server.status("VmHWM")
    finally:
        server.stop()
    log_errors = sum(1 for line in (base / f"serve-{label}.log").read_text().splitlines() if "Traceback" in line)

    rows = []
    errors_all = []
    records = list(load.records)
    for kind in TYPES:
        recs = [r for r in records if r[0] == kind]
        if not recs:
            continue
        ms = [r[1] * 1000 for r in recs]
        errs = [r[2] for r in recs if r[2]]
        inside = [r[3] * 1000 for r in recs if r[3] is not None]
        errors_all += errs
        rows.append([kind, len(recs), len(errs), round(statistics.median(ms), 1), round(pct(ms, 99), 1),
                     round(max(ms), 1), round(statistics.median(inside), 1) if inside else "—",
                     round(pct(inside, 99), 1) if inside else "—"])
    total = len(records)
    p99_search = pct([r[1] for r in records if r[0].startswith("search")], 99)
    wrong = sum(e.startswith("wrong") for e in errors_all)
    lost = sum(e.startswith("lost") for e in errors_all) + hung
    probe_worst = max((p["search_s"] for p in probes), default=float("nan"))
    probe_ms = ", ".join(f"{p['search_s'] * 1000:.0f}" for p in probes)
    report_ms = ", ".join(f"{(p['report_s'] or 0) * 1000:.0f}" for p in probes)
    verdicts = [
        ["p99 of searches (by id and by upload) under the load", f"{p99_search:.3f} s", "< 1 s",
         "met" if p99_search < TARGETS["p99 search"] else "NOT met"],
        ["the server's peak RSS", f"{peak / 1e6:.0f} MB", "< 2 GB", "met" if peak < TARGETS["peak RSS"] else "NOT met"],
        ["wrong answers / lost answers", f"{wrong} / {lost}", "0 / 0", "met" if not wrong and not lost else "NOT met"],
        ["a search while a report is drawn (worst of the probes)", f"{probe_worst:.3f} s", "< 0.5 s",
         "met" if probe_worst < TARGETS["probe"] else "NOT met"],
    ]
    text = "\n".join([
        f"## {label}",
        "",
        f"{total} requests in {wall:.1f} s ({total / wall:.1f} requests/s) from {args.clients} clients; token "
        f"{'sent' if server.token else 'none'}; the server's RSS after warming {rss_before / 1e6:.0f} MB, its peak "
        f"{peak / 1e6:.0f} MB; tracebacks in its log: {log_errors}; clients still waiting at the end: {hung}. The "
        f"machine's 1-minute load average before and after the load: {loads[0]:.1f}, {loads[1]:.1f}.",
        "",
        _common.table(["request", "count", "errors", "p50 ms", "p99 ms", "max ms", "work p50 ms", "work p99 ms"],
                      rows),
        "",
        f"Probe (after the load): search {probe_ms} ms; the report still being drawn when the search was answered "
        f"in {sum(p['while_drawing'] for p in probes)} of {len(probes)} (report downloads {report_ms} ms).",
        "",
        _common.table(["target", "measured", "limit", ""], verdicts),
    ])
    if errors_all:
        text += "\n\nFirst errors:\n" + "\n".join(f"- {e[:200]}" for e in errors_all[:10])
    print(text)
    return text, verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=300, help="photos of caltech101 indexed")
    ap.add_argument("--queries", type=int, default=40, help="query photos (each with its CLI truth)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--threads", type=int, default=1, help="RETRIEVE_THREADS of the server (and the CLI runs)")
    ap.add_argument("--timeout", type=float, default=60, help="the longest one request may take")
    ap.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests in all")
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--before", metavar="REV", help="also load the server of revision REV (its own worktree), first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serve-load")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (index, server logs)")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="retrieve-bench-serve-load-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RETRIEVE_THREADS": str(args.threads),
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")}
    sections, verdicts = [], []
    try:
        source = collect_photos(base / "photos", args.photos)
        index = base / "index"
        t = time.perf_counter()
        cli("index", base / "photos", "--index", index, env=env)
        print(f"indexed {source} in {time.perf_counter() - t:.0f} s")
        photos = sorted((base / "photos").iterdir())
        rng = random.Random(args.seed)
        qpaths = sorted(rng.sample(photos, min(args.queries, len(photos))))
        truth = truth_of(qpaths, index, env, include_self=False)
        truth_self = truth_of(qpaths, index, env, include_self=True)
        common = (index, qpaths, truth, truth_self, env, base, args)
        if args.before:
            with _common.worktree(args.before, base / "before") as tree:
                sections.append(run_load(tree, f"before ({args.before})", *common)[0])
        text, verdicts = run_load(ROOT, "now" if args.before else "this tree", *common)
        sections.insert(0, text)
    finally:
        if not args.keep:
            from web.service import default_cache_dir

            old = os.environ.get("XDG_CACHE_HOME")
            os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
            shutil.rmtree(default_cache_dir(base / "index"), ignore_errors=True)  # the server's thumbnails, explanations
            os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.__setitem__("XDG_CACHE_HOME", old)
            shutil.rmtree(base, ignore_errors=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = (f"python bench/serve_load.py --photos {args.photos} --clients {args.clients} --seconds "
               f"{args.seconds:g} --threads {args.threads}" + (f" --before {args.before}" if args.before else ""))
    text = "\n".join([
        f"# retrieve serve under load ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{command}` · machine: {cpu_model()}, {cores} cores · server `RETRIEVE_THREADS={args.threads}` · "
        f"collection: {source} · {len(qpaths)} query photos, each answer checked against `retrieve search --json` "
        "(and `--include-self` for uploads)",
        "",
        "Mix per client: search by id 40 %, search by upload 20 % (half multipart, half raw body), upload 10 %, "
        "explanation 20 % (SFAM; every other one also downloads its report), thumbnail 10 %. work: the server's "
        "own time for the search or the explanation (its answer's `seconds`), without the wait for its turn, the "
        "upload or the HTTP. Probe: a new pair explained (Grad-CAM), its report's download started, a search by id "
        "50 ms later, timed." + (" (The revision before: its `seconds` include the wait for its one model lock.)"
                                 if args.before else "") +
        " Each client waits for an answer before its next request, so the clients gather in the slowest queue (the "
        "explanations, one at a time): compare explanations by their count in the same time, not by their wait.",
        "",
        *[sec + "\n" for sec in sections],
    ])
    path = _common.RESULTS / f"{args.name}.md"
    path.write_text(text.rstrip() + "\n")
    print(f"\nsaved {path.relative_to(ROOT)}")
    if any(v[3] != "met" for v in verdicts):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
