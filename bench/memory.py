"""Peak memory of `retrieve index` for 1k vs 10k images (fresh processes, one run each).

    python bench/memory.py [--sizes 1000 10000]

The photos are small distinct crops of scikit-image's photos (decoding is not what is measured).
Peak RSS comes from the child's rusage. What must not grow with the collection is the working set of
the pipeline (decode queue, batches); the FAISS index itself (5 KiB per vector for `flat`) and the
per-file metadata held for the incremental comparison (~0.3 KiB per file) do. Saves
bench/results/memory.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
from PIL import Image


def make_photos(folder: Path, n: int) -> None:
    import skimage.data

    sources = [Image.fromarray(getattr(skimage.data, s)()).convert("RGB")
               for s in ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field")]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        src.crop((x0, y0, x0 + w // 2, y0 + h // 2)).resize((96, 72)).save(sub / f"{i:06d}.jpg", quality=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            photos = Path(tmp) / f"p{n}"
            make_photos(photos, n)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cli", "index", str(photos), "--index", str(Path(tmp) / f"i{n}"),
                            "--json"], check=True, env=env, capture_output=True, cwd=_common.ROOT)
            secs = time.perf_counter() - t
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
            rows.append([n, round(peak / 1024, 1), round(n * 1280 * 4 / 2**20, 1), round(secs, 1),
                         "" if peak > before else "(not above the previous run's peak)"])
            print(rows[-1], flush=True)
    text = ("Peak RSS of `retrieve index` (fresh process each; RUSAGE_CHILDREN keeps the maximum over all runs "
            "so far, so sizes run in increasing order).\n\n")
    text += _common.table(["images", "peak RSS MiB", "of which FAISS flat vectors MiB", "seconds", "note"], rows)
    _common.save("memory", text)


if __name__ == "__main__":
    main()
