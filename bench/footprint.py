"""Memory of the ONNX Runtime path: whole batches vs slices of ORT_RUN_PIXELS, peak RSS and speed side by side.

    python bench/footprint.py [--threads 2] [--rounds 5] [--index-count 300]

ONNX Runtime's CPU memory arena keeps the largest activations it has seen. Each configuration runs in a
fresh process (peak RSS = VmHWM): import, load efficientnet_lite0, embed 4 batches of 32 photos at 224 px
through Backbone.embed_arrays; and `indexer.index_paths` on ``--index-count`` Caltech-101 photos. "whole
batch" sets retrieval.backbone.ORT_RUN_PIXELS to a batch of 32 (what the code did before), "slices" keeps
the default (4 images at 224 px). Speed: both settings interleaved in one process (A B A B ..., median).
Saves bench/results/footprint.md.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--index-count", type=int, default=300)
    args = ap.parse_args()
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
