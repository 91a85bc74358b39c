"""Where the time of `retrieve index` goes on 12-MP JPEGs, stage by stage, beside the forward-only rate.

    python bench/pipeline.py [--count 120] [--threads 2] [--rounds 2] [--dir /tmp/retrieve-12mp]

Makes ``--count`` 12-MP JPEGs (4000x3000, quality 90) by upscaling ../shared/data/caltech101 photos into
``--dir`` (scratch, reused; never committed). Each round runs, interleaved: the forward pass alone on the
pre-decoded arrays (same batch size and fast path), and the real indexing path (indexer.index_paths into a
fresh index) with 1 and with 2 decode threads. The indexing rate is images over the time from the first
image submitted to the last one committed (model loading and the end-of-run finalisation -- head,
calibration, explain reference -- are left out; they do not grow with the collection). Per stage, the
summed wall time of each call, per image, in the thread that made it: read (file bytes), decode (JPEG at
reduced size, Pillow draft = libjpeg-turbo DCT scaling), resize (to the network input, normalised),
forward (ONNX Runtime), commit (SQLite rows + FAISS add). Saves bench/results/pipeline.md.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from types import SimpleNamespace
from pathlib import Path

import _common
import numpy as np
from PIL import Image


def make_12mp(dest: Path, count: int) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob("*.jpg"))
    if len(have) >= count:
        return have[:count]
    root = _common.shared_dataset("caltech101")
    src = sorted(p for c in sorted(root.iterdir()) if c.is_dir() for p in sorted(c.iterdir())[:2])
    random.Random(0).shuffle(src)
    for i, p in enumerate(src[:count]):
        Image.open(p).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(dest / f"{i:04d}.jpg", quality=90)
    return sorted(dest.glob("*.jpg"))[:count]


class Stages:
    """Wraps the pipeline's functions to sum the wall time of each call per stage (thread-safe)."""

    def __init__(self):
        self.t = defaultdict(float)
        self.lock = threading.Lock()
        self.saved = []
        self.active = True  # off during the end-of-run finalisation (explain reference, calibration)

    def wrap(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)
        self.saved.append((owner, name, fn))

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.active:
                    with self.lock:
                        self.t[stage] += time.perf_counter() - t
        setattr(owner, name, timed)

    def pause_during(self, owner, name: str) -> None:
        fn = getattr(owner, name)
        self.saved.append((owner, name, fn))

        def paused(*a, **k):
            self.active = False
            try:
                return fn(*a, **k)
            finally:
                self.active = True
        setattr(owner, name, paused)

    def restore(self) -> None:
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)


class Clock:
    def start(self, total: int) -> None:
        self.t0, self.t1 = time.perf_counter(), None

    def advance(self, n: int) -> None:
        self.t1 = time.perf_counter()


def index_once(files_dir: Path, workers: int, batch: int) -> tuple[float, dict]:
    import indexer.run as run
    from retrieval.models.backbone import Backbone
    from retrieval.models.preprocess import Preprocess

    st = Stages()
    st.wrap(run, "read_image_bytes", "read")
    st.wrap(run, "decode_image", "decode")
    st.wrap(Preprocess, "array", "resize")
    st.wrap(Backbone, "embed_arrays", "forward")
    st.wrap(run, "commit_embedded", "commit")
    st.pause_during(run, "_finalise")
    clock = Clock()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rep = run.index_paths([files_dir], Path(tmp) / "idx", workers=workers, batch_size=batch, progress=clock)
    finally:
        st.restore()
    n = rep.indexed
    stages = {k: 1000 * v / n for k, v in st.t.items()}
    return n / (clock.t1 - clock.t0), stages


def twelve_mp(args) -> None:
    import torch

    from retrieval.images import load_image
    from retrieval.models.loading import load_backbone

    if _common.shared_dataset("caltech101") is None:
        return
    torch.set_num_threads(args.threads)
    args.dir = args.dir / f"n{args.count}"  # exactly --count photos in the indexed folder
    files = make_12mp(args.dir, args.count)
    bb = load_backbone()
    arrays = [bb.preprocess.array(load_image(p, min_side=bb.preprocess.size)) for p in files]
    bb.embed_arrays(arrays[: args.batch], batch_size=args.batch)  # warm
    runs = {"forward only": [], "index, 1 decode thread": [], "index, 2 decode threads": []}
    stages = {k: [] for k in runs}
    loads = []
    for _ in range(args.rounds):
        for name in runs:
            if name == "forward only":
                t = time.perf_counter()
                bb.embed_arrays(arrays, batch_size=args.batch)
                runs[name].append(len(arrays) / (time.perf_counter() - t))
            else:
                rate, st = index_once(args.dir, 1 if "1 decode" in name else 2, args.batch)
                runs[name].append(rate)
                stages[name].append(st)
            loads.append(os.getloadavg()[0])
            print(name, round(runs[name][-1], 1), "img/s", stages[name][-1] if stages[name] else "", flush=True)
    fwd = float(np.median(runs["forward only"]))
    names = ["read", "decode", "resize", "forward", "commit"]
    rows = []
    for name, rates in runs.items():
        r = float(np.median(rates))
        st = {k: float(np.median([s[k] for s in stages[name]])) for k in names} if stages[name] else {}
        rows.append([name, round(r, 1), f"{r / fwd:.2f}"] + [round(st[k], 2) if st else "-" for k in names])
    size = np.mean([p.stat().st_size for p in files]) / 1e6
    text = (f"`retrieve index` on {len(files)} 12-MP JPEGs (4000x3000, {size:.2f} MB each, upscaled Caltech-101 "
            f"photos), efficientnet_lite0 fp32 via ONNX Runtime, 224 px, batch {args.batch}, {args.threads} "
            f"inference threads, {os.cpu_count()} cores; median of {args.rounds} interleaved rounds; 1-min load "
            f"average during the runs {min(loads):.1f}-{max(loads):.1f} (a shared machine: judge by the ratios).\n\n")
    text += _common.table(["run", "img/s", "vs forward only", "read ms/img", "decode ms/img", "resize ms/img",
                           "forward ms/img", "commit ms/img"], rows)
    text += ("\n\nStage times are the summed wall time of each call, per image, in the thread that made it "
             "(decode threads overlap the forward pass, so they do not add up to the run's time). The rate "
             "counts from the first image submitted to the last committed.")
    _common.save("pipeline", text)


# -- the instance preset (issue #31) -------------------------------------------------------------------------------
#: (module, owner attribute path, function, stage): what an instance run's stages are, timed where they are defined.
#: A function a tree lacks is left out (another revision's run has the stages it has).
INSTANCE_STAGES = [
    ("indexer.run", None, "read_image_bytes", "read"),
    ("indexer.run", None, "decode_image", "decode"),
    ("retrieval.models.preprocess", "Preprocess", "array", "resize"),
    ("retrieval.models.backbone", "Backbone", "embed_arrays", "forward"),
    ("retrieval.match.verify", "Verifier", "extract", "local features"),
    ("retrieval.match.verify", "Verifier", "save", "features cache write"),
    ("indexer.run", None, "commit_embedded", "commit"),
    ("retrieval.match.words", None, "update_index", "words"),
    ("indexer.run", None, "refresh_calibration", "calibration"),
    ("indexer.run", None, "refresh_reference", "explain reference"),
]
INSTANCE_COLUMNS = ["read", "decode", "resize", "forward", "local features", "features cache write", "commit",
                    "words", "calibration", "explain reference", "finalise, other"]


def instance_child(tree: str, photos: str, out: str) -> None:
    """One `retrieve index --preset instance` run of ``photos`` into a fresh index, in this process (a child:
    RETRIEVE_THREADS and the cache folder set by the parent; torch never imported here, as in the CLI's run),
    with ``tree``'s code: the stage times, the rate and the peak RSS written to ``out`` as JSON."""
    import importlib
    import json
    import resource

    sys.path.insert(0, tree)
    t_start = time.perf_counter()
    import indexer.run as run

    st = Stages()
    for module, owner, fn, stage in INSTANCE_STAGES:
        m = importlib.import_module(module)
        o = getattr(m, owner) if owner else m
        if hasattr(o, fn):
            st.wrap(o, fn, stage)
    final = {"s": 0.0}
    fin = run._finalise
    rss = {"phase": "start-up", "start-up": 0.0, "photos": 0.0, "finalise": 0.0}
    page = os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def sample() -> None:  # the resident set every 20 ms, its peak per phase
        while rss["phase"] != "done":
            with open("/proc/self/statm") as f:
                mb = int(f.read().split()[1]) * page
            rss[rss["phase"]] = max(rss.get(rss["phase"], 0.0), mb)
            time.sleep(0.02)

    def finalise(*a, **k):
        t = time.perf_counter()
        rss["phase"] = "finalise"
        try:
            return fin(*a, **k)
        finally:
            final["s"] += time.perf_counter() - t
    run._finalise = finalise
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for module, fn in (("indexer.run", "refresh_calibration"), ("indexer.run", "refresh_reference"),
                       ("retrieval.match.words", "update_index")):  # the finalisation's parts: their own RSS peaks
        m = importlib.import_module(module)
        if hasattr(m, fn):
            def phased(*a, _fn=getattr(m, fn), _name=fn, **k):
                rss["phase"] = f"finalise: {_name}"
                try:
                    return _fn(*a, **k)
                finally:
                    rss["phase"] = "finalise"
            setattr(m, fn, phased)
    clock = Clock()
    started = clock.start
    clock.start = lambda total: (rss.update(phase="photos"), started(total))
    with tempfile.TemporaryDirectory() as tmp:
        rep = run.index_paths([photos], Path(tmp) / "idx", preset="instance", progress=clock)
        rss["phase"] = "done"
        from retrieval.index.store import IndexStore

        with IndexStore.open(Path(tmp) / "idx") as store:
            st_ = store.settings
            settings = {"precision": st_.precision, "local": getattr(st_, "local", None) or "640/2000 (default)"}
    n = rep.indexed
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stages = {k: 1000 * v / n for k, v in st.t.items()}
    inside = sum(stages.get(k, 0.0) for k in ("words", "calibration", "explain reference"))
    stages["finalise, other"] = 1000 * final["s"] / n - inside
    with open(out, "w") as f:
        json.dump({"n": n, "run_s": rep.seconds, "photos_s": clock.t1 - clock.t0, "finalise_s": final["s"],
                   "process_s": time.perf_counter() - t_start, "cpu_s": ru.ru_utime + ru.ru_stime,
                   "peak_rss_mb": ru.ru_maxrss / 1024, "stages": stages,
                   "rss_mb": {k: v for k, v in rss.items() if k != "phase"},
                   "precision": settings["precision"], "local": str(settings["local"])}, f)


def serial_child(tree: str, photos: str, out: str) -> None:
    """The per-photo stages of an instance index run one after another in one thread (OpenCV and ONNX Runtime on one
    thread too), with ``tree``'s code and the choices its instance preset makes for a new index (side, budget,
    precision): the process CPU ms per photo of each stage, which load on a shared machine inflates far less than
    wall time. The first 40 photos of ``photos``."""
    import hashlib
    import json
    import resource

    sys.path.insert(0, tree)
    import cv2

    cv2.setNumThreads(1)
    import indexer.run as run
    from retrieval.images import decode_image, read_image_bytes
    from retrieval.match.verify import Verifier, decode_side
    from retrieval.presets import INSTANCE

    files = sorted(Path(photos).rglob("*.jpg"))[:40]
    a = run._asked("instance")
    a.precision = "int8" if getattr(INSTANCE, "precision", None) == "auto" and __import__(
        "retrieval.models.precision", fromlist=["auto_precision"]).auto_precision() == "int8" else "fp32"
    bb = run._new_index_backbone(a)
    bb.precision = a.precision
    local = getattr(INSTANCE, "local", None) or {}
    v = Verifier(max_side=local.get("side", 640), n_features=local.get("budget", 2000), cache=False)
    side = decode_side(SimpleNamespace(preprocess={"size": 448}, search=INSTANCE.search, local=local))
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731
    t: dict = {}
    arrays = []
    for f in files:
        c = cpu(); data = read_image_bytes(f); hashlib.sha256(data).hexdigest(); t["read + hash"] = t.get("read + hash", 0) + cpu() - c  # noqa: E702,E501
        c = cpu(); img = decode_image(data, f, min_side=side); t["decode"] = t.get("decode", 0) + cpu() - c
        c = cpu(); v.extract(img); t["local features"] = t.get("local features", 0) + cpu() - c
        c = cpu(); arrays.append(bb.preprocess.array(img)); t["resize"] = t.get("resize", 0) + cpu() - c
    bb.embed_arrays(arrays[:2], batch_size=2)  # warm
    c = cpu(); bb.embed_arrays(arrays, batch_size=32); t["forward"] = cpu() - c
    with open(out, "w") as fo:
        json.dump({"n": len(files), "ms": {k: 1000 * x / len(files) for k, x in t.items()}, "precision": a.precision,
                   "local": f"{v.max_side}/{v.n_features}", "decoded": list(img.size)}, fo)


def make_phone1280(instance: Path, dest: Path) -> Path:
    """1280-px copies (bicubic, JPEG quality 90) of the instance set's phone photos (``view*.jpg``, 640 px), the
    objects in sorted order split in two: ``tune/`` (the first half) and ``held/`` (the second); made once."""
    if (dest / "held").is_dir():
        return dest
    objects = sorted(p for p in instance.iterdir() if p.is_dir())
    for i, d in enumerate(objects):
        out = dest / ("tune" if i < len(objects) // 2 else "held") / d.name
        out.mkdir(parents=True, exist_ok=True)
        for v in sorted(d.glob("view*.jpg")):
            im = Image.open(v).convert("RGB")
            s = 1280 / max(im.size)
            im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC).save(out / v.name, quality=90)
    return dest


def serial(args) -> None:
    """``--serial``: :func:`serial_child` for each tree, interleaved over ``--rounds``; the median CPU ms per stage."""
    import json
    import subprocess

    trees = {"this tree": str(_common.ROOT), **dict(t.split("=", 1) for t in args.tree)}
    got: dict = {}
    loads = []
    for _ in range(args.rounds):
        for name, tree in trees.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.json"
                subprocess.run([sys.executable, __file__, "--serial-child", tree, str(args.photos), str(out)],
                               env=dict(os.environ, RETRIEVE_THREADS="1"), check=True)
                got.setdefault(name, []).append(json.loads(out.read_text()))
            loads.append(os.getloadavg()[0])
            print(name, got[name][-1], flush=True)
    stages = ["read + hash", "decode", "local features", "resize", "forward"]
    rows = []
    first = None
    for name, rs in got.items():
        ms = {k: float(np.median([r["ms"][k] for r in rs])) for k in stages}
        total = sum(ms.values())
        first = first or total
        rows.append([name, rs[0]["precision"], rs[0]["local"], "x".join(map(str, rs[0]["decoded"]))]
                    + [round(ms[k], 1) for k in stages] + [round(total, 1), f"{first / total:.2f}"])
    text = (f"\n\n## Per photo, one stage after another (`--serial`)\n\nThe first {rs[0]['n']} photos of {args.photos}, "
            f"each stage in one thread (OpenCV and ONNX Runtime too), process CPU ms per photo, median of "
            f"{args.rounds} interleaved rounds, 1-min load average {min(loads):.1f}-{max(loads):.1f}; each tree with "
            "the choices its instance preset makes for a new index on this CPU. The sum is the CPU a photo costs "
            "whatever the threading: on 2 cores the photos' part cannot run faster than 2 / sum.\n\n")
    text += _common.table(["tree", "precision", "local side/budget", "decoded at"] + [f"{k} CPU ms" for k in stages]
                          + ["sum CPU ms", "speed vs first row"], rows)
    path = _common.RESULTS / f"{args.name}.md"
    old = path.read_text() if path.exists() else ""
    marker = "\n\n## Per photo, one stage after another"
    path.write_text((old[:old.index(marker)] if marker in old else old.rstrip("\n")) + text + "\n")
    print(text)


def rss_text(runs: list[dict]) -> str:
    """The peak resident set of each phase over ``runs`` (MB): start-up / photos / the finalisation (its largest part)."""
    peak: dict = {}
    for x in runs:
        for k, v in x["rss_mb"].items():
            peak[k] = max(peak.get(k, 0.0), v)
    fin = {k: v for k, v in peak.items() if k.startswith("finalise")}
    top = max(fin, key=fin.get) if fin else None
    return (f"{peak.get('start-up', 0):.0f} / {peak.get('photos', 0):.0f} / "
            + (f"{fin[top]:.0f} ({top.split(': ')[-1] if ': ' in top else 'other'})" if top else "-"))


def instance(args) -> None:
    """Runs the children (each tree × each thread count, interleaved round by round) and saves the table."""
    import json
    import shutil
    import subprocess

    photos = args.photos
    if photos is None:
        inst = _common.ROOT / "bench" / ".cache" / "instance"
        if not inst.is_dir():
            print(f"skip: {inst} not found (python bench/instance_set.py makes it)")
            return
        photos = make_phone1280(inst, _common.ROOT / "bench" / ".cache" / "phone1280") / "held"
    files = sorted(p for p in Path(photos).rglob("*.jpg"))
    sizes = {Image.open(p).size for p in files[:20]}
    trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {}
    trees = {"this tree": str(_common.ROOT), **trees}
    results: dict = {}
    loads = []
    for r in range(args.rounds):
        for threads in args.threads:
            for name, tree in trees.items():
                with tempfile.TemporaryDirectory() as cache:
                    (Path(cache) / "retrieve").mkdir()
                    # the ONNX graphs are shared (made once); the local-features cache starts empty, as for new photos
                    os.symlink(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieve" / "onnx",
                               Path(cache) / "retrieve" / "onnx")
                    env = dict(os.environ, RETRIEVE_THREADS=str(threads), XDG_CACHE_HOME=cache,
                               **dict(e.split("=", 1) for e in args.env))
                    out = Path(cache) / "out.json"
                    t = time.perf_counter()
                    subprocess.run([sys.executable, __file__, "--child", tree, str(photos), str(out)], env=env,
                                   check=True)
                    wall = time.perf_counter() - t
                    res = json.loads(out.read_text())
                    shutil.rmtree(Path(cache) / "retrieve" / "local", ignore_errors=True)
                res["command_s"] = wall
                results.setdefault((name, threads), []).append(res)
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1} {name} threads {threads}: {res['n'] / res['run_s']:.1f} img/s (run), "
                      f"{res['n'] / wall:.1f} img/s (command), {res['cpu_s'] / res['n'] * 1000:.0f} CPU ms/img, "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB, load {loads[-1]:.1f}", flush=True)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    rows, base = [], {}
    for (name, threads), rs in results.items():
        rate = med([x["n"] / x["run_s"] for x in rs])
        base.setdefault(threads, rate)
        st = {k: med([x["stages"].get(k, 0.0) for x in rs]) for k in INSTANCE_COLUMNS}
        photos_rate = med([x["n"] / x["photos_s"] for x in rs])
        base.setdefault((threads, "photos"), photos_rate)
        rows.append([name, threads, round(rate, 1), f"{rate / base[threads]:.2f}", round(photos_rate, 1),
                     f"{photos_rate / base[(threads, 'photos')]:.2f}",
                     round(med([x["n"] / x["command_s"] for x in rs]), 1),
                     round(med([x["cpu_s"] / x["n"] * 1000 for x in rs])), round(max(x["peak_rss_mb"] for x in rs)),
                     rss_text(rs),
                     rs[0].get("precision") or "-", rs[0].get("local") or "-"]
                    + [round(st[k], 1) for k in INSTANCE_COLUMNS])
    text = (f"`retrieve index --preset instance` of {len(files)} phone photos ({photos}; sizes "
            f"{', '.join(f'{w}x{h}' for w, h in sorted(sizes))}) into a fresh index, each run a fresh process "
            f"(RETRIEVE_THREADS as given, the local-features cache empty, the ONNX graphs made before), "
            f"{os.cpu_count()} cores; median of {args.rounds} rounds, the rows interleaved in each; 1-min load "
            f"average {min(loads):.1f}-{max(loads):.1f}.\n\n")
    text += _common.table(["tree", "threads", "img/s (run)", "vs first row", "img/s (photos)", "vs first row",
                           "img/s (command)", "CPU ms/img",
                           "peak RSS MB", "RSS MB start-up / photos / finalise", "precision", "local features"]
                          + [f"{k} ms/img" for k in INSTANCE_COLUMNS], rows)
    text += ("\n\n\"img/s (run)\": images over the run's seconds as `retrieve index` reports them (from the scan to the "
             "end of the finalisation); \"(photos)\": over the photos' part alone (the first photo submitted to the "
             "last one committed: the rate a large collection sees, the finalisation's fixed costs left out); "
             "\"(command)\": over the whole process, start-up included. Stage times: the "
             "summed wall time of each call per image, in the thread that made it (decoding and local features run "
             "in threads beside the forward pass, so they do not add up to the run's time); words, calibration, "
             "explain reference and the rest of the finalisation run once at the end, divided by the images.")
    for k, v in sorted(trees.items()):
        text += f"\n\n{k}: {v}" if k != "this tree" else ""
    raw = _common.RESULTS / "raw" / f"{args.name}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps([{"tree": k[0], "threads": k[1], "runs": v} for k, v in results.items()], indent=1))
    _common.save(args.name, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=120)
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="12 MP: one value (default 2); "
                    "--instance: the RETRIEVE_THREADS of each run (default 1 2)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "retrieve-12mp")
    ap.add_argument("--instance", action="store_true", help="the instance preset's stages on phone photos "
                    "(bench/results/pipeline-instance.md)")
    ap.add_argument("--photos", type=Path, default=None, help="--instance: the photos (default: 1280-px copies of "
                    "the instance set's held-out half of phone photos, made into bench/.cache/phone1280)")
    ap.add_argument("--tree", nargs="*", default=[], help="--instance: NAME=DIR, other checkouts run alike")
    ap.add_argument("--env", nargs="*", default=[], help="--instance: VAR=VALUE set in every run")
    ap.add_argument("--name", default=None)
    ap.add_argument("--serial", action="store_true", help="--instance: the per-photo stages one after another "
                    "(CPU ms per stage), added to the file as a section of its own")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--serial-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return instance_child(*args.child)
    if args.serial_child:
        return serial_child(*args.serial_child)
    if args.instance:
        args.threads = args.threads or [1, 2]
        args.name = args.name or "pipeline-instance"
        if args.serial:
            args.photos = args.photos or make_phone1280(_common.ROOT / "bench" / ".cache" / "instance",
                                                        _common.ROOT / "bench" / ".cache" / "phone1280") / "held"
            return serial(args)
        return instance(args)
    args.threads = (args.threads or [2])[0]
    twelve_mp(args)


if __name__ == "__main__":
    main()
