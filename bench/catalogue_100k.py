"""A large product catalogue, end to end: build it, index it with the instance preset, query it as a user does.

    python bench/catalogue_100k.py [--n 100000] [--threads 2] [--timed 40] [--out bench/.cache/catalogue]

The catalogue: the instance set's 100 clean references (bench/instance_set.py) plus ``--n`` distractor product
images made from real photos under realistic transforms, none of them identical (their SHA-256s are checked):
Caltech-101 photos that the instance set uses neither as an object nor as a background (``instance_set.spare``,
500) and the ORL faces (400), each drawn many times as

- a *product shot*: a crop of the photo (55-100 % of each side), turned up to 8°, its exposure, contrast, white
  balance and saturation changed (one in six shifted in hue: "the same product in another colour"), mirrored one in
  two, on a plain or graded background with a margin of 4-25 %;
- a *lifestyle shot*: the crop pasted at 35-80 % of the frame onto another of these photos, mildly warped;
- a face photo (15 %): the ORL face scaled up 2.5-4×, tinted, on a plain background;

each saved at a long side of 320-640 px (the references are at most 640 px) as a JPEG of quality 70-95. The
instance set's 400 phone photos are the queries; their backgrounds are never a source here, so the only photo that
shares content with a query is its own object's (reference and 3 other phone photos).

Both indexes are built by the CLI as a user builds them (``retrieve index REFS DISTRACTORS --catalogue --preset
instance``, then ``retrieve index PHOTOS``): the 500-image index (``--n 0``: today's figures) and the large one, in
the same run. Measured for each: build wall time, CPU and peak RSS (the indexing process's ``wait4``), disk (the
index's files — rows, vectors, words — and the local-features cache), quality of all 400 phone photos through one
``retrieve search PHOTOS --json`` (R@1: the first result shows the object; photo→catalogue: the first catalogue image
among the results is its reference; mAP@10 over its 4 other images), and the time of one query: ``--timed`` phone
photos each through a fresh ``retrieve search PHOTO --json`` process (start-up included) and through ``retrieve
serve``'s ``POST /api/search`` (the photo as the body, the server warm). Writes bench/results/catalogue-100k.md
(``--name``). The generated images and indexes stay under ``--out`` (bench/.cache, ignored by git): a second run
with the same ``--n`` reuses the images, ``--reuse-index`` the indexes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import multiprocessing
from pathlib import Path

import _common
import cv2
import numpy as np
from PIL import Image

import instance_set

RECIPE = 1  # bump when the distractors' recipe changes (a cached catalogue is made again)
FACES = 0.15  # the share of face photos among the distractors
PER_FOLDER = 1000  # distractors per folder (d000/, d001/, ...)
_SOURCES: list[tuple[str, str]] = []  # (path, "photo" | "face"), set in each worker
_CACHE: dict[str, np.ndarray] = {}


def sources(caltech: Path, faces: Path | None) -> list[tuple[str, str]]:
    """The photos the distractors are made from: Caltech-101 photos the instance set does not use, and ORL faces."""
    out = [(str(p), "photo") for p in instance_set.spare(caltech)]
    if faces is not None:
        out += [(str(p), "face") for p in sorted(faces.glob("s*/*.pgm"))]
    return out


def _photo(path: str) -> np.ndarray:
    img = _CACHE.get(path)
    if img is None:
        img = np.asarray(Image.open(path).convert("RGB"))
        if len(_CACHE) < 1200:
            _CACHE[path] = img
    return img


def _colour(img: np.ndarray, rng: random.Random) -> np.ndarray:
    x = img.astype(np.float32)
    if rng.random() < 1 / 6:  # another colour of the same product: a hue shift
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + rng.randint(20, 160)) % 180
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.6, 1.4)  # saturation
    x = (x - 128) * rng.uniform(0.8, 1.2) + 128  # contrast
    x = x * rng.uniform(0.8, 1.2) * np.float32([rng.uniform(0.9, 1.1) for _ in range(3)])  # exposure, white balance
    return np.clip(x, 0, 255)


def _crop(img: np.ndarray, rng: random.Random, low: float) -> np.ndarray:
    h, w = img.shape[:2]
    cw, ch = max(16, int(w * rng.uniform(low, 1.0))), max(16, int(h * rng.uniform(low, 1.0)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img[y0:y0 + ch, x0:x0 + cw]


def _background(w: int, h: int, rng: random.Random) -> np.ndarray:
    a = np.float32([rng.uniform(200, 255)] * 3) if rng.random() < 0.6 else np.float32(
        [rng.uniform(40, 255) for _ in range(3)])
    b = a * rng.uniform(0.8, 1.0)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).copy()


def _product(obj: np.ndarray, rng: random.Random, long_side: int, scale: float = 1.0) -> np.ndarray:
    """``obj`` (float RGB) turned a little, on a plain or graded background with a margin."""
    oh, ow = obj.shape[:2]
    margin = rng.uniform(0.04, 0.25)
    s = long_side * (1 - 2 * margin) / max(oh, ow) * scale
    pad = 2 * margin * long_side
    w, h = max(32, int(round(ow * s + pad))), max(32, int(round(oh * s + pad)))
    a = rng.uniform(-8, 8)
    m = cv2.getRotationMatrix2D((ow / 2, oh / 2), a, s)
    m[:, 2] += (w / 2 - ow / 2, h / 2 - oh / 2)
    warped = cv2.warpAffine(obj, m, (w, h), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.ones((oh, ow), np.float32), m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    return _background(w, h, rng) * (1 - mask) + warped * mask


def _lifestyle(obj: np.ndarray, bg: np.ndarray, rng: random.Random, long_side: int) -> np.ndarray:
    """``obj`` pasted onto the photo ``bg`` at 35-80 % of its shorter side, mildly warped."""
    bh, bw = bg.shape[:2]
    s0 = long_side / max(bh, bw)
    w, h = max(32, int(bw * s0)), max(32, int(bh * s0))
    canvas = cv2.resize(bg.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA if s0 < 1 else cv2.INTER_CUBIC)
    oh, ow = obj.shape[:2]
    s = rng.uniform(0.35, 0.8) * min(w, h) / max(oh, ow)
    src = np.float32([[0, 0], [ow, 0], [ow, oh], [0, oh]])
    dst = (src - [ow / 2, oh / 2]) * s
    jitter = 0.06 * s * max(oh, ow)
    dst = dst + np.float32([[rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)] for _ in range(4)])
    lo, hi = dst.min(0), dst.max(0)
    dst = dst + [rng.uniform(-lo[0], max(-lo[0], w - hi[0])), rng.uniform(-lo[1], max(-lo[1], h - hi[1]))]
    m = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    warped = cv2.warpPerspective(obj, m, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones((oh, ow), np.float32), m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    return canvas * (1 - mask) + warped * mask


def make(i: int, seed: int = 0) -> np.ndarray:
    """Distractor ``i``: a deterministic function of (i, seed) and the sources."""
    rng = random.Random(seed * 1_000_003 + i)
    kind = "face" if rng.random() < FACES and any(k == "face" for _, k in _SOURCES) else "photo"
    path = rng.choice([p for p, k in _SOURCES if k == kind])
    img = _photo(path)
    long_side = rng.randint(320, 640)
    if kind == "face":
        obj = _colour(np.repeat(_crop(img, rng, 0.8).mean(axis=2, keepdims=True), 3, axis=2)
                      * np.float32([rng.uniform(0.85, 1.15) for _ in range(3)]), rng)
        out = _product(obj, rng, long_side)
    else:
        obj = _colour(_crop(img, rng, 0.55), rng)
        if rng.random() < 0.5:
            obj = obj[:, ::-1]
        if rng.random() < 0.7:
            out = _product(np.ascontiguousarray(obj), rng, long_side)
        else:
            photos = [p for p, k in _SOURCES if k == "photo" and p != path]
            out = _lifestyle(np.ascontiguousarray(obj), _photo(rng.choice(photos)), rng, long_side)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.0))
    return np.clip(out, 0, 255).astype(np.uint8)


def _init(srcs: list[tuple[str, str]]) -> None:
    global _SOURCES
    _SOURCES = srcs
    cv2.setNumThreads(1)


def _write(args: tuple[int, int, str]) -> tuple[int, str]:
    i, seed, out = args
    rng = random.Random(seed * 7_000_003 + i)
    path = Path(out) / f"d{i // PER_FOLDER:03d}" / f"c{i:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make(i, seed)).save(path, quality=rng.randint(70, 95))
    return i, hashlib.sha256(path.read_bytes()).hexdigest()


def build_distractors(srcs: list[tuple[str, str]], out: Path, n: int, threads: int, seed: int = 0) -> float:
    """Write the ``n`` distractors under ``out`` (reused when its recipe says so); their SHA-256s must all differ
    (and differ from every source's). Returns the seconds it took (0: reused)."""
    stamp = out / "recipe.json"  # (beside the images: not a photo, so not indexed)
    recipe = {"recipe": RECIPE, "n": n, "seed": seed, "sources": len(srcs)}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return 0.0
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    shas = {}
    # spawned, not forked: OpenCV's threads (the instance set was drawn in this process) deadlock a forked child
    with multiprocessing.get_context("spawn").Pool(threads, initializer=_init, initargs=(srcs,)) as pool:
        for k, (i, sha) in enumerate(pool.imap_unordered(_write, [(i, seed, str(out)) for i in range(n)],
                                                          chunksize=64)):
            shas[i] = sha
            if sys.stderr.isatty() and k % 1000 == 0:
                print(f"\rdistractors {k}/{n}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    source_shas = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p, _ in srcs}
    dup = len(shas) - len(set(shas.values()))
    if dup or source_shas & set(shas.values()):
        raise SystemExit(f"{out}: {dup} distractors repeat another, or one is a source photo")
    stamp.write_text(json.dumps(recipe))
    return time.perf_counter() - t


# -- the CLI, timed ------------------------------------------------------------------------------------------------
def run(env: dict, *args: str) -> dict:
    """``retrieve ARGS`` in its own process: stdout, wall seconds, CPU seconds, peak RSS (its ``wait4``: the largest
    of it and its children, such as a child that prepares graphs with torch) and ``rss_self``, the process's own peak
    (its VmHWM, read every 0.1 s until it exits)."""
    t = time.perf_counter()
    tree = env.get("PYTHONPATH") or _common.ROOT  # (``python -m cli`` runs the cli of its working directory)
    p = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=tree, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = [], []
    import threading

    th = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    th.start()
    own, done = [0], threading.Event()

    def watch() -> None:  # VmHWM only grows: its last reading before exit is the process's peak
        while not done.wait(0.1):
            own[0] = max(own[0], _hwm(p.pid))

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    out.append(p.stdout.read())
    done.set()
    w.join()  # (before the process is reaped: its pid is never read again once it may be another's)
    own[0] = max(own[0], _hwm(p.pid))  # (its output is closed: it is exiting; a zombie has no VmHWM, read as 0)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    th.join()
    wall = time.perf_counter() - t
    if p.returncode and not (args[0] == "search" and out[0].strip()):
        raise SystemExit(f"retrieve {' '.join(args[:3])}: exit {p.returncode}: {err[0].strip()[-800:]}")
    return {"out": out[0], "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024,
            "rss_self": own[0]}


def _hwm(pid: int) -> int:
    """A live process's peak resident size in bytes (Linux's VmHWM; 0 once it has exited, or elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sizes(index: Path, cache: Path) -> dict[str, int]:
    def du(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    files = {f.name: f.stat().st_size for f in index.iterdir() if f.is_file()}
    return {
        "rows (SQLite)": sum(v for k, v in files.items() if k.endswith((".db", ".sqlite", ".db-wal"))),
        "vectors": sum(v for k, v in files.items() if k.endswith((".faiss", ".index", ".npy"))),
        "words.npz": files.get("words.npz", 0),
        "index, all files": du(index),
        "local features cache": du(cache / "retrieve" / "local"),
    }


def quality(out: str, within: str, catalogue: Path) -> dict[str, float]:
    """R@1, photo→catalogue R@1 (the first catalogue image among the mixed results is the reference), mAP@10 of
    every phone photo from ``retrieve search PHOTOS --json``, and R@1 of ``--within CATALOGUE``'s answers (``out``,
    ``within``; each read by bench/quality.py's ``cli_answers``: a photo once, the query's own row left out)."""
    from quality import cli_answers

    root = str(catalogue.resolve()) + os.sep
    r1, p2c, ap10 = [], [], []
    for a in cli_answers(out).values():
        rel = [Path(h).parent.name == a["label"] for h in a["hits"]]
        r1.append(float(bool(rel[:1] and rel[0])))
        cat = [h for h in a["hits"] if h.startswith(root)]
        p2c.append(float(bool(cat) and Path(cat[0]).parent.name == a["label"]))
        h10 = np.array(rel[:10], bool)
        ap10.append(float((np.cumsum(h10) / np.arange(1, len(h10) + 1) * h10).sum() / 4) if len(h10) else 0.0)
    w1 = [float(bool(a["hits"]) and Path(a["hits"][0]).parent.name == a["label"])
          for a in cli_answers(within).values()]
    return {"queries": len(r1), "R@1": float(np.mean(r1)), "first catalogue": float(np.mean(p2c)),
            "mAP@10": float(np.mean(ap10)), "within": float(np.mean(w1))}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def web_times(index: Path, env: dict, photos: list[Path], log: Path) -> tuple[list[float], float, int]:
    """Seconds of ``POST /api/search`` for each photo (raw body) on a warm ``retrieve serve``; its first request's
    seconds; the server's peak RSS."""
    from serve_load import Client, Server

    server = Server(index, env, log, Path(env.get("PYTHONPATH") or _common.ROOT))
    try:
        client = Client(server, timeout=600)

        def post(p: Path) -> float:
            t = time.perf_counter()
            status, data, _ = client.request("POST", "/api/search?k=10", body=p.read_bytes(),
                                             headers={"Content-Type": "application/octet-stream"})
            if status != 200 or not json.loads(data).get("results"):
                raise SystemExit(f"POST /api/search ({p}): HTTP {status}: {data[:300]!r}")
            return time.perf_counter() - t

        first = post(photos[0])
        times = [post(p) for p in photos]
        return times, first, server.status("VmHWM")
    finally:
        server.stop()


def measure(name: str, catalogue: Path, photos: Path, work: Path, env: dict, timed: list[Path], reuse: bool) -> dict:
    index = work / f"index-{name}"
    cache = work / f"xdg-{name}"
    env = {**env, "XDG_CACHE_HOME": str(cache)}
    graphs = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieve" / "onnx"
    row: dict = {"name": name}
    if not (reuse and index.exists()):
        shutil.rmtree(index, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        if graphs.is_dir():
            shutil.copytree(graphs, cache / "retrieve" / "onnx")
        a = run(env, "index", str(catalogue), "--catalogue", "--preset", "instance", "--index", str(index), "--json")
        b = run(env, "index", str(photos), "--index", str(index), "--json")
        row["build"] = {"wall": a["wall"] + b["wall"], "cpu": a["cpu"] + b["cpu"], "rss": max(a["rss"], b["rss"]),
                        "rss_self": max(a["rss_self"], b["rss_self"]), "catalogue": json.loads(a["out"]), "photos": json.loads(b["out"])}
        (work / f"build-{name}.json").write_text(json.dumps(row["build"]))
    else:
        row["build"] = json.loads((work / f"build-{name}.json").read_text())
    row["disk"] = sizes(index, cache)
    q = run(env, "search", str(photos), "--index", str(index), "--json")
    w = run(env, "search", str(photos), "--index", str(index), "--json", "--within", str(catalogue))
    row["quality"] = quality(q["out"], w["out"], catalogue)
    row["quality"].update(wall=q["wall"], rss=q["rss"], within_wall=w["wall"])
    cli = []
    for p in timed:
        r = run(env, "search", str(p), "--index", str(index), "--json")
        cli.append(r["wall"])
        row.setdefault("cli_rss", 0)
        row["cli_rss"] = max(row["cli_rss"], r["rss"])
    row["cli"] = cli
    row["web"], row["web_first"], row["web_rss"] = web_times(index, env, timed, work / f"serve-{name}.log")
    print(json.dumps({k: v for k, v in row.items() if k not in ("cli", "web")}, default=str), flush=True)
    return row


def formats_section(index: Path, name: str) -> None:
    """words.npz of ``index`` as format 3 (what ``retrieve index`` writes now) and as format 2 (the bags and the
    weighted postings beside each other, as before fb3ede4), written from the same word index: MB, bytes per
    posting, and the seconds a search spends opening each (``WordIndex.load``, median of 3, warm page cache).
    Appended to bench/results/NAME.md."""
    import tempfile

    from retrieval.index.store import IndexStore
    from retrieval.match import words as W

    from retrieval.match.verify import Verifier

    store = IndexStore.open(index)
    sig = W.signature(Verifier.for_index(store.settings))
    store.close()
    wi = W.WordIndex.load(index, sig)
    if wi is None:
        raise SystemExit(f"{index}: no readable words.npz")
    n = len(wi._inverted()[1])
    rows = []
    with tempfile.TemporaryDirectory(dir=index.parent) as tmp:
        for fmt in (2, 3):
            d = Path(tmp) / str(fmt)
            d.mkdir()
            if fmt == 2:
                _common.write_format2(d, wi)
            else:
                wi.save(d)
            size = (d / W.WORDS_NAME).stat().st_size
            opens = []
            for _ in range(3):
                t = time.perf_counter()
                back = W.WordIndex.load(d, sig)
                opens.append(time.perf_counter() - t)
                assert back is not None and back.format == fmt
                del back
            rows.append([fmt, f"{len(wi.shas):,}", f"{n:,}", f"{size / 1e6:,.0f}", f"{size / n:.1f}",
                         f"{statistics.median(opens):.2f}"])
    text = (f"\n## words.npz: format 3 against format 2, the same words (`python bench/catalogue_100k.py --formats "
            f"{index}`)\n\nThe large index's word index written both ways; bytes/posting include the vocabulary "
            "and the per-row arrays; open s: `WordIndex.load` (what a search pays before its first lookup), median "
            "of 3 with the file in the page cache.\n\n")
    text += _common.table(["format", "images", "postings", "MB", "bytes/posting", "open s"], rows) + "\n"
    path = _common.RESULTS / f"{name}.md"
    with open(path, "a") as f:
        f.write(text)
    print(text)


def _rev(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def timing_section(out: Path, indexes: list[str], timed_n: int, rounds: int, threads: int, name: str,
                   against: Path | None = None) -> None:
    """One query's seconds on indexes already built under ``out`` (their names, e.g. 500 100500), by this tree and
    (``against``) by another checkout: a fresh ``retrieve search PHOTO --json`` process per photo, the indexes and
    the trees alternating photo by photo, ``rounds`` times; then each through ``retrieve serve``. Appended to
    bench/results/NAME.md."""
    photos = out / "photos"
    timed = [sorted((photos / d).glob("view1.jpg"))[0] for d in sorted(os.listdir(photos))][:timed_n]
    trees = [_common.ROOT] + ([against.resolve()] if against else [])
    env = {**os.environ, "RETRIEVE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    runs = [(k, t) for k in indexes for t in trees]
    envs = {(k, t): {**env, "PYTHONPATH": str(t), "XDG_CACHE_HOME": str(out / f"xdg-{k}")} for k, t in runs}
    for k in indexes:  # the first open of an index written by an older version rewrites its words (not timed)
        run(envs[k, trees[0]], "search", str(timed[0]), "--index", str(out / f"index-{k}"), "--json")
    cli = {r: [] for r in runs}
    rss = {r: 0 for r in runs}
    load0 = os.getloadavg()
    for _ in range(rounds):
        for p in timed:
            for r in runs:
                got = run(envs[r], "search", str(p), "--index", str(out / f"index-{r[0]}"), "--json")
                cli[r].append(got["wall"])
                rss[r] = max(rss[r], got["rss"])
    rows = []
    for k, t in runs:
        web, first, web_rss = web_times(out / f"index-{k}", envs[k, t], timed, out / f"serve-{k}.log")
        rows.append([f"{int(k):,}", _rev(t), len(cli[k, t]), f"{pct(cli[k, t], 50):.2f}", f"{pct(cli[k, t], 99):.2f}",
                     f"{rss[k, t] / 1e6:,.0f}", f"{pct(web, 50):.2f}", f"{pct(web, 99):.2f}", f"{first:.1f}",
                     f"{web_rss / 1e6:,.0f}"])
    text = (f"\n## One query, {' against '.join(_rev(t) for t in trees)}, alternating (`python bench/catalogue_100k.py "
            f"--timing {' '.join(indexes)} --out DIR --timed {timed_n} --rounds {rounds}"
            f"{' --against CHECKOUT' if against else ''}`)\n\n{threads} threads, load average "
            f"{load0[0]:.1f} → {os.getloadavg()[0]:.1f}. CLI: a fresh `retrieve search PHOTO --index I --json` process "
            "per query (start-up, opening the index and its words included), the indexes and revisions one after the "
            "other for each photo; web: `POST /api/search?k=10` to a warm `retrieve serve` (first: its first "
            "request), each revision's server in turn.\n\n")
    text += _common.table(["images", "revision", "CLI queries", "CLI p50 s", "CLI p99 s", "CLI RSS MB", "web p50 s",
                           "web p99 s", "web first s", "serve RSS MB"], rows) + "\n"
    with open(_common.RESULTS / f"{name}.md", "a") as f:
        f.write(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timing", nargs="+", metavar="N", help="only time one query on the indexes index-N under --out "
                    "(appended to --name)")
    ap.add_argument("--rounds", type=int, default=1, help="--timing: the photos this many times")
    ap.add_argument("--against", type=Path, metavar="CHECKOUT",
                    help="--timing: also time another checkout of retrieve (a git worktree), alternating")
    ap.add_argument("--formats", type=Path, metavar="INDEX",
                    help="only compare INDEX's words.npz written as format 3 and as format 2 (appended to --name)")
    ap.add_argument("--n", type=int, default=100_000, help="distractor catalogue images (default 100000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timed", type=int, default=20, help="phone photos timed one by one (CLI and web)")
    ap.add_argument("--out", type=Path, default=_common.ROOT / "bench" / ".cache" / "catalogue")
    ap.add_argument("--reuse-index", action="store_true", help="keep indexes already built under --out")
    ap.add_argument("--skip-small", action="store_true", help="measure the large index only")
    ap.add_argument("--name", default="catalogue-100k")
    args = ap.parse_args()
    if args.formats:
        return formats_section(args.formats, args.name)
    if args.timing:
        return timing_section(args.out, args.timing, args.timed, args.rounds, args.threads, args.name, args.against)
    caltech = _common.shared_dataset("caltech101")
    faces = _common.shared_dataset("att_faces")
    if caltech is None:
        raise SystemExit(1)
    t0, load0 = time.perf_counter(), os.getloadavg()
    inst = instance_set.build(caltech, args.out / "instance")
    # a catalogue folder per size: the references (object/ref.jpg) and the distractors (dNNN/cNNNNNN.jpg)
    small, large, photos = args.out / "catalogue-0", args.out / f"catalogue-{args.n}", args.out / "photos"
    srcs = sources(caltech, faces)
    gen_s = build_distractors(srcs, large, args.n, args.threads)
    for d in sorted(p for p in inst.iterdir() if p.is_dir()):
        for root in (small, large):
            (root / d.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(d / "ref.jpg", root / d.name / "ref.jpg")
        (photos / d.name).mkdir(parents=True, exist_ok=True)
        for v in sorted(d.glob("view*.jpg")):
            shutil.copy2(v, photos / d.name / v.name)
    print(f"{args.n} distractors from {len(srcs)} sources ({gen_s:.0f} s)", flush=True)
    timed = [sorted((photos / d).glob("view1.jpg"))[0] for d in sorted(os.listdir(photos))][:args.timed]
    env = {**os.environ, "RETRIEVE_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(_common.ROOT)}
    rows = []
    if not args.skip_small:
        rows.append(measure("500", small, photos, args.out, env, timed, args.reuse_index))
    rows.append(measure(str(args.n + 500), large, photos, args.out, env, timed, args.reuse_index))
    report(args, rows, len(srcs), gen_s, time.perf_counter() - t0, load0)


def report(args, rows: list[dict], n_sources: int, gen_s: float, secs: float, load0) -> None:
    mb = lambda b: f"{b / 1e6:,.0f}"  # noqa: E731
    table = []
    for r in rows:
        n = int(r["name"])
        b, d, q = r["build"], r["disk"], r["quality"]
        table.append([
            f"{n:,}", f"{b['wall']:,.0f}", f"{n / b['wall']:.1f}", f"{b['cpu'] / n * 1e3:.0f}", mb(b["rss"]),
            mb(b["rss_self"]) if b.get("rss_self") else "–",
            mb(d["rows (SQLite)"]), mb(d["vectors"]), mb(d["words.npz"]), mb(d["index, all files"]),
            mb(d["local features cache"]),
            f"{pct(r['cli'], 50):.2f} / {pct(r['cli'], 99):.2f}", mb(r["cli_rss"]),
            f"{pct(r['web'], 50):.2f} / {pct(r['web'], 99):.2f} ({r['web_first']:.1f})", mb(r["web_rss"]),
            f"{q['R@1']:.3f}", f"{q['mAP@10']:.3f}", f"{q['first catalogue']:.3f}", f"{q['within']:.3f}",
            f"{q['wall'] / q['queries']:.2f}",
        ])
    text = (f"# The instance preset on a {args.n + 500:,}-image catalogue, end to end\n\n"
            f"`python bench/catalogue_100k.py --n {args.n} --threads {args.threads} --timed {args.timed}` · "
            f"{os.cpu_count()} cores, RETRIEVE_THREADS={args.threads} · load average {load0[0]:.1f} → "
            f"{os.getloadavg()[0]:.1f} · {secs / 60:.0f} min in all (the distractors made in {gen_s:.0f} s from "
            f"{n_sources} source photos; 0: reused).\n\n"
            "Each row is an index built by the CLI (`retrieve index REFS [DISTRACTORS] --catalogue --preset instance`, "
            "then `retrieve index PHOTOS`): the instance set's 100 references and 400 phone photos, plus the "
            "distractor catalogue images. *build*: both commands' wall time, images/s over all images, CPU ms "
            "per image (user + system of the indexing processes), their peak RSS (`wait4`: with their children's, such as "
            "a child that prepares graphs with torch) and the indexing processes' own (VmHWM). *disk*: the index's SQLite rows, "
            "FAISS vectors, words.npz, all its files, and the local-features cache (XDG cache). *query p50 / p99*: "
            f"{args.timed} phone photos (view1 of the first {args.timed} objects), each a fresh `retrieve search "
            "PHOTO --index I --json` process (start-up included), and each a `POST /api/search?k=10` to a running "
            "`retrieve serve` (in brackets its first request, which opens the index); RSS: the processes' peak. "
            "*quality*: all 400 phone photos through one `retrieve search PHOTOS --json` (the preset's default "
            "search): R@1, mAP@10 over the object's 4 other images, whether the first catalogue image among the 10 "
            "results is the object's reference; photo→catalogue: R@1 of the same search with `--within CATALOGUE` "
            "(answers from the catalogue only, the product's photo → catalogue mode); s/query: the first "
            "process's wall time per query.\n\n")
    text += _common.table(["images", "build s", "img/s", "CPU ms/img", "build RSS MB", "index process RSS MB", "rows MB", "vectors MB",
                           "words.npz MB", "index MB", "features cache MB", "CLI query s p50 / p99",
                           "CLI RSS MB", "web query s p50 / p99 (first)", "serve RSS MB", "R@1", "mAP@10",
                           "first catalogue image right", "photo→catalogue (--within)", "s/query (one process)"],
                          table)
    if len(rows) == 2:
        a, b = rows[0]["quality"], rows[1]["quality"]
        text += ("\n\nQuality, large − 500: " + ", ".join(f"{k} {b[k] - a[k]:+.3f}" for k in
                                                            ("R@1", "mAP@10", "first catalogue", "within")) + ".\n")
    _common.save(args.name, text)
    (_common.RESULTS / "raw").mkdir(exist_ok=True)
    (_common.RESULTS / "raw" / f"{args.name}.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
