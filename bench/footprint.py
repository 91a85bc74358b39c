"""Memory of the ONNX Runtime path: whole batches vs slices of ORT_RUN_PIXELS, peak RSS and speed side by side.

    python bench/footprint.py [--threads 2] [--rounds 5] [--index-count 300]

ONNX Runtime's CPU memory arena keeps the largest activations it has seen. Each configuration runs in a
fresh process (peak RSS = VmHWM): import, load efficientnet_lite0, embed 4 batches of 32 photos at 224 px
through Backbone.embed_arrays; and `indexer.index_paths` on ``--index-count`` Caltech-101 photos. "whole
batch" sets retrieval.backbone.ORT_RUN_PIXELS to a batch of 32 (what the code did before), "slices" keeps
the default (4 images at 224 px). Speed: both settings interleaved in one process (A B A B ..., median).
Saves bench/results/footprint.md.

    python bench/footprint.py --collection 1000 10000 [--tree before=/work/main] [--keep /tmp/photos]

Peak RSS of `retrieve index` over a whole collection (bench/collection_rss.py: VmRSS sampled from outside
with the phase it is in, VmHWM at exit), for this tree and each ``--tree NAME=PATH`` (another checkout, e.g.
the code before a change), runs interleaved per size, a warm ONNX cache shared by all; img/s of the run and
of its embedding phase. The new table goes on top of bench/results/footprint.md, the earlier ones stay below.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import _common
import numpy as np

WHOLE = 32 * 224 * 224

CHILD = r'''
import json, sys, time, tempfile, numpy as np
sys.path.insert(0, {root!r})
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) // 1024
import torch; torch.set_num_threads({threads})
import retrieval.backbone as B
if {whole}: B.ORT_RUN_PIXELS = {WHOLE}
out = {{}}
if {count}:
    from pathlib import Path
    from indexer import index_paths
    src = Path({src!r})
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter(); rep = index_paths([src], Path(tmp) / "idx"); out["secs"] = time.perf_counter() - t
        out["indexed"] = rep.indexed
else:
    from retrieval.models import load_backbone
    bb = load_backbone()
    out["after load"] = hwm()
    x = [np.random.RandomState(i).rand(3, 224, 224).astype(np.float32) for i in range(32)]
    for _ in range(4):
        bb.embed_arrays(x, batch_size=32)
out["peak"] = hwm()
print(json.dumps(out))
'''


def child(whole: bool, threads: int, count: int = 0, src: str = "") -> dict:
    code = CHILD.format(root=str(_common.ROOT), threads=threads, whole=whole, WHOLE=WHOLE, count=count, src=src)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def subset(n: int) -> str:
    import tempfile
    from pathlib import Path

    root = _common.shared_dataset("caltech101")
    dest = Path(tempfile.mkdtemp(prefix="footprint-"))
    files = sorted(p for c in sorted(root.iterdir()) if c.is_dir() for p in sorted(c.iterdir()))[:n]
    for i, p in enumerate(files):
        shutil.copyfile(p, dest / f"{i:05d}{p.suffix}")
    return str(dest)


def collection(args) -> None:
    import tempfile
    from pathlib import Path

    import collection_rss as C

    trees = [("this tree", _common.ROOT)] + [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree]
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="footprint-photos-"))
    cache = keep / "cache"
    env = {"XDG_CACHE_HOME": str(cache), **({"RETRIEVE_FAST_INDEX": "0"} if args.no_fast else {})}
    warm = C.make_collection(keep / "p16", 16, _common.SHARED_DATA)
    for name, tree in trees:  # exports and checks the graphs once (the cache is shared), at nobody's cost
        C.index_run(tree, warm, keep / "idx-warm", args.threads, env)
    rows = []
    for n in args.collection:
        photos = C.make_collection(keep / f"p{n}", n, _common.SHARED_DATA)
        for name, tree in trees:
            load = os.getloadavg()[0]
            r = C.index_run(tree, photos, keep / "idx", args.threads, env)
            rep = json.loads(r["stdout"].strip().splitlines()[-1])
            emb = [t for t, _, ph in r["samples"] if ph == "embedding"]
            fin = [t for t, _, ph in r["samples"] if ph == "finalise"]
            emb_s = (fin[0] if fin else r["seconds"]) - (emb[0] if emb else 0)
            rows.append([name, n, r["max"], r["peak"]["start-up"], r["peak"]["embedding"], r["peak"]["finalise"],
                         "yes" if r["torch"] else "no", round(r["seconds"], 1), round(rep["indexed"] / r["seconds"], 1),
                         round(rep["indexed"] / max(emb_s, 1e-9), 1), round(n * 1280 * 4 / 2**20, 1), f"{load:.2f}"])
            print(rows[-1], flush=True)
    text = (f"## `retrieve index`: peak RSS over a collection\n\nJPEGs re-encoded from Caltech-101 and AT&T faces with "
            f"small variations (bench/collection_rss.py), a new index each, efficientnet_lite0 at 224 px, "
            f"{args.threads} threads (RETRIEVE_THREADS), warm ONNX cache, runs interleaved per size. Peak = the child's "
            "VmHWM; per phase from VmRSS sampled every 50 ms (start-up: until ONNX Runtime is loaded; embedding: until "
            "the vector file is written; finalise: calibration and the 448-px explain reference). img/s: of the whole "
            "run, and of its embedding phase. `python bench/footprint.py --collection "
            f"{' '.join(map(str, args.collection))}" + "".join(f" --tree {t}" for t in args.tree) + "`.\n\n")
    text += _common.table(["code", "images", "peak RSS MiB", "start-up MiB", "embedding MiB", "finalise MiB",
                           "torch imported", "seconds", "img/s run", "img/s embedding", "FAISS flat MiB",
                           "load avg"], rows)
    old = _common.RESULTS / "footprint.md"
    earlier = old.read_text() if old.exists() else ""
    _common.save("footprint", text + ("\n\n## Earlier measurements\n\n" + earlier if earlier else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--index-count", type=int, default=300)
    ap.add_argument("--collection", type=int, nargs="*", help="collection sizes: the peak RSS of `retrieve index`")
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH: another checkout measured beside this one")
    ap.add_argument("--keep", help="folder for the photos, indexes and ONNX cache (reused when it has them)")
    ap.add_argument("--no-fast", action="store_true", help="RETRIEVE_FAST_INDEX=0 for every run")
    args = ap.parse_args()
    if args.collection:
        return collection(args)
    import torch

    torch.set_num_threads(args.threads)
    import retrieval.backbone as B
    from retrieval.models import load_backbone

    default = B.ORT_RUN_PIXELS
    bb = load_backbone()
    x = [np.random.RandomState(i).rand(3, 224, 224).astype(np.float32) for i in range(32)]
    bb.embed_arrays(x)
    times = {"whole batch": [], "slices": []}
    for _ in range(args.rounds):
        for name in times:
            B.ORT_RUN_PIXELS = WHOLE if name == "whole batch" else default
            t = time.perf_counter()
            bb.embed_arrays(x, batch_size=32)
            times[name].append(time.perf_counter() - t)
    B.ORT_RUN_PIXELS = default
    load = os.getloadavg()[0]
    src = subset(args.index_count) if args.index_count else ""
    rows = []
    for name in times:
        whole = name == "whole batch"
        m = child(whole, args.threads)
        ix = child(whole, args.threads, args.index_count, src) if src else {}
        med = float(np.median(times[name]))
        rows.append([name, "32" if whole else str(max(1, default // (224 * 224))), m["after load"], m["peak"],
                     ix.get("peak", "-"), round(32 / med, 1), f"{float(np.median(times['whole batch'])) / med:.2f}x"])
        print(rows[-1], flush=True)
    text = (f"ONNX Runtime memory, efficientnet_lite0 fp32 at 224 px, {args.threads} threads, fresh process per "
            f"configuration; speed interleaved in one process, median of {args.rounds}; load average {load:.1f} "
            "(shared machine: judge by the ratios).\n\n")
    text += _common.table(["run", "images per ORT run", "RSS after load MiB", "peak RSS, 4 batches of 32 MiB",
                           f"peak RSS, index {args.index_count} photos MiB", "img/s", "speed vs whole"], rows)
    _common.save("footprint", text)


if __name__ == "__main__":
    main()
