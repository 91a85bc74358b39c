"""Memory of the ONNX Runtime path: whole batches vs slices of ORT_RUN_PIXELS, peak RSS and speed side by side.

    python bench/footprint.py [--threads 2] [--rounds 5] [--index-count 300]

ONNX Runtime's CPU memory arena keeps the largest activations it has seen. Each configuration runs in a
fresh process (peak RSS = VmHWM): import, load efficientnet_lite0, embed 4 batches of 32 photos at 224 px
through Backbone.embed_arrays; and `indexer.index_paths` on ``--index-count`` Caltech-101 photos. "whole
batch" sets retrieval.models.graphs.ORT_RUN_PIXELS to a batch of 32 (what the code did before), "slices" keeps
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
import retrieval.models.graphs as B
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
    from retrieval.models.registry import load_backbone
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

    trees = [("this tree", _common.ROOT, {})]
    trees += [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve(), {}) for t in args.tree]
    for v in args.variant:  # NAME:KEY=VALUE[,KEY=VALUE]: this tree with that environment
        name, _, kvs = v.partition(":")
        trees.append((name, _common.ROOT, dict(kv.split("=", 1) for kv in kvs.split(",") if kv)))
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="footprint-photos-"))
    cache = keep / "cache"
    env = {"XDG_CACHE_HOME": str(cache), **({"RETRIEVE_FAST_INDEX": "0"} if args.no_fast else {})}
    warm = C.make_collection(keep / "p16", 16, _common.SHARED_DATA)
    for name, tree, extra in trees:  # exports and checks the graphs once (the cache is shared), at nobody's cost
        C.index_run(tree, warm, keep / "idx-warm", args.threads, {**env, **extra})
    rows = []
    for n in args.collection:
        photos = C.make_collection(keep / f"p{n}", n, _common.SHARED_DATA)
        for name, tree, extra in [t for _ in range(args.cli_rounds) for t in trees]:  # interleaved rounds
            load = os.getloadavg()[0]
            r = C.index_run(tree, photos, keep / "idx", args.threads, {**env, **extra})
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
            f"{' '.join(map(str, args.collection))}" + "".join(f" --tree {t}" for t in args.tree)
             + "".join(f" --variant {v}" for v in args.variant)
             + (f" --cli-rounds {args.cli_rounds}" if args.cli_rounds > 1 else "") + "`.\n\n")
    text += _common.table(["code", "images", "peak RSS MiB", "start-up MiB", "embedding MiB", "finalise MiB",
                           "torch imported", "seconds", "img/s run", "img/s embedding", "FAISS flat MiB",
                           "load avg"], rows)
    ratios = []
    for n in args.collection:  # median whole-run seconds of each other code over this tree's: its speed ratio
        secs = {name: float(np.median([r[7] for r in rows if r[0] == name and r[1] == n])) for name, _, _ in trees}
        ratios += [f"{n} images: this tree runs at {secs[name] / secs['this tree']:.3f}x the speed of {name} "
                   f"(median of {args.cli_rounds} run{'s' if args.cli_rounds > 1 else ''} each)"
                   for name, _, _ in trees[1:]]
    if ratios:
        text += "\n\n" + "; ".join(ratios) + "."
    old = _common.RESULTS / "footprint.md"
    earlier = old.read_text() if old.exists() else ""
    _common.save("footprint", text + ("\n\n## Earlier measurements\n\n" + earlier if earlier else ""))


def pipeline_ab(args) -> str:
    """The indexing pipeline alone (scan, decode, embed, commit; no finalisation) with the torch-free backbone and
    with the full one, interleaved in one process: their speed ratio, free of the start-up either one costs."""
    import tempfile
    from pathlib import Path

    import torch

    import collection_rss as C
    import indexer.run as R
    from indexer import index_paths
    from retrieval.models.loader import backbone_for_settings
    from retrieval.index.store import IndexStore

    os.environ["RETRIEVE_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="footprint-photos-"))
    photos = C.make_collection(keep / f"p{args.pipeline_ab}", args.pipeline_ab, _common.SHARED_DATA)
    warm = keep / "idx-pipeline-warm"
    shutil.rmtree(warm, ignore_errors=True)
    index_paths([C.make_collection(keep / "p16", 16, _common.SHARED_DATA)], warm)  # graphs cached (child)
    with IndexStore.open(warm) as st:
        settings = st.settings
    fast = backbone_for_settings(settings, purpose="index")
    full = fast.replace(manifest=None)  # the network's own path (torch built here, the same graphs)
    full.net
    assert fast.ready(fast.preprocess.input_shape), "the cached graphs do not serve"
    real = R._finalise
    R._finalise = lambda store, report, refit, bb=None: None  # the pipeline only
    times: dict = {"torch-free (cached graphs)": [], "full (network built, ONNX Runtime)": []}
    loads = []
    try:
        for _ in range(args.rounds):
            for name, bb in zip(times, (fast, full)):
                d = keep / "idx-pipeline"
                shutil.rmtree(d, ignore_errors=True)
                loads.append(os.getloadavg()[0])
                t = time.perf_counter()
                rep = index_paths([photos], d, backbone=bb)
                times[name].append(time.perf_counter() - t)
                print(name, rep.indexed, round(rep.indexed / times[name][-1], 1), flush=True)
    finally:
        R._finalise = real
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = [[k, round(args.pipeline_ab / med[k], 1), f"{med['full (Backbone, ONNX Runtime)'] / med[k]:.3f}x"]
            for k in times]
    return (f"## The pipeline alone, side by side\n\n`index_paths` on {args.pipeline_ab} photos without the "
            f"finalisation, the backbone given (so neither pays start-up), {args.threads} threads, interleaved in one "
            f"process, median of {args.rounds}; load average {min(loads):.1f}-{max(loads):.1f}. "
            f"`python bench/footprint.py --pipeline-ab {args.pipeline_ab} --rounds {args.rounds}`.\n\n"
            + _common.table(["backbone", "img/s", "speed vs full"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--index-count", type=int, default=300)
    ap.add_argument("--collection", type=int, nargs="*", help="collection sizes: the peak RSS of `retrieve index`")
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH: another checkout measured beside this one")
    ap.add_argument("--cli-rounds", type=int, default=1, help="runs of each code per size, interleaved")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:KEY=VALUE[,KEY=VALUE]: this tree again with that environment (RETRIEVE_ORT_ARENA=0)")
    ap.add_argument("--keep", help="folder for the photos, indexes and ONNX cache (reused when it has them)")
    ap.add_argument("--no-fast", action="store_true", help="RETRIEVE_FAST_INDEX=0 for every run")
    ap.add_argument("--pipeline-ab", type=int, default=0, help="N photos: the pipeline alone, torch-free vs full")
    args = ap.parse_args()
    needs = (("caltech101", "att_faces") if args.collection or args.pipeline_ab
             else ("caltech101",) * bool(args.index_count))
    if any(_common.shared_dataset(n) is None for n in needs):
        return
    if args.pipeline_ab:
        text = pipeline_ab(args)
        print(text)
        return
    if args.collection:
        return collection(args)
    import torch

    torch.set_num_threads(args.threads)
    import retrieval.models.graphs as B
    from retrieval.models.loading import load_backbone

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
