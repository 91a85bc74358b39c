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
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import _common
import numpy as np
import torch
from PIL import Image

import indexer.run as run
from retrieval.models.backbone import Backbone
from retrieval.models.preprocess import Preprocess
from retrieval.images import load_image
from retrieval.models.loading import load_backbone


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
    st = Stages()
    st.wrap(run, "read_image_bytes", "read")
    st.wrap(run, "decode_image", "decode")
    st.wrap(Preprocess, "array", "resize")
    st.wrap(Backbone, "embed_arrays", "forward")
    st.wrap(run, "_embed_and_commit", "forward+commit")
    st.pause_during(run, "_finalise")
    clock = Clock()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rep = run.index_paths([files_dir], Path(tmp) / "idx", workers=workers, batch_size=batch, progress=clock)
    finally:
        st.restore()
    n = rep.indexed
    stages = {k: 1000 * v / n for k, v in st.t.items()}
    stages["commit"] = stages.pop("forward+commit") - stages["forward"]
    return n / (clock.t1 - clock.t0), stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "retrieve-12mp")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
