"""Peak memory of `retrieve index` (1k vs 10k images, a folder holding one 100 MP photo) and of explaining it.

    python bench/memory.py [--sizes 1000 10000] [--no-100mp]
    python bench/memory.py --sizes          # only the 100 MP rows; the collection table is kept from the last run

The photos are small distinct crops of scikit-image's photos (decoding is not what is measured).
Peak RSS comes from the child's rusage. What must not grow with the collection is the working set of
the pipeline (decode queue, batches); the FAISS index itself (5 KiB per vector for `flat`) and the
per-file metadata held for the incremental comparison (~0.3 KiB per file) do. The 100 MP rows show what
one very large photo costs on top of a small folder: a JPEG is decoded at reduced scale (DCT scaling), a
PNG is decoded whole (300 MB of RGB) — both below the default limits (RETRIEVE_MAX_MEGAPIXELS 150,
RETRIEVE_MAX_FILE_MB 200). The 100 MP photos are made in a temporary folder, never saved. Saves
bench/results/memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


def _peak_run(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(peak RSS MiB of that one child process, seconds, its stdout) — os.wait4 gives the child's own rusage."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, env=env, cwd=_common.ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)  # not p.wait(): wait4 returns this child's own rusage
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed: {err.read().strip()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t, out


def big_photo_rows(tmp: Path, env: dict) -> list[list]:
    import skimage.data

    w, h = 11_547, 8_660  # 100.0 MP, 4:3
    base = tmp / "small"
    make_photos(base, 8)
    _peak_run([sys.executable, "-m", "cli", "index", str(base), "--index", str(tmp / "warm-up"), "--json"], env)
    rows = []  # measured after a warm-up run, which exports the ONNX graph (cached) at its own cost
    cases = [("8 small photos (baseline)", None), ("+ one 100 MP JPEG (11547x8660)", "JPEG"),
             ("+ one 100 MP PNG (11547x8660)", "PNG")]
    for label, fmt in cases:
        folder = tmp / f"big-{fmt or 'none'}"
        shutil.copytree(base, folder)
        if fmt:
            img = Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC)
            f = folder / ("big.jpg" if fmt == "JPEG" else "big.png")
            img.save(f, quality=90) if fmt == "JPEG" else img.save(f, compress_level=1)
            del img
            size_mb = f.stat().st_size / 1e6
        peak, secs, out = _peak_run([sys.executable, "-m", "cli", "index", str(folder), "--index",
                                     str(tmp / f"i-{fmt}"), "--json"], env)
        rep = json.loads(out.strip().splitlines()[-1])
        row = [label, f"{size_mb:.0f}" if fmt else "-", round(peak, 1), round(secs, 1), rep["indexed"], rep["skipped"]]
        # explaining it: `retrieve explain small big` and `retrieve search small --explain` (every result)
        small, second = sorted(base.rglob("*.jpg"))[:2]
        other = f if fmt else second
        ex_peak, _, _ = _peak_run([sys.executable, "-m", "cli", "explain", str(small), str(other), "--out",
                                   str(tmp / f"e-{fmt}"), "--json"], env)
        se_peak, _, _ = _peak_run([sys.executable, "-m", "cli", "search", str(small), "--index", str(tmp / f"i-{fmt}"),
                                   "-k", "9", "--explain", "--out", str(tmp / f"s-{fmt}"), "--json"], env)
        rows.append(row + [round(ex_peak, 1), round(se_peak, 1)])
        print(rows[-1], flush=True)
    return rows


def _previous_collection_table() -> str:
    old = (_common.RESULTS / "memory.md")
    if not old.exists():
        return ""
    lines = old.read_text().splitlines()
    stamp = lines[0].strip("<!-> ").split(" · ")[0] if lines and lines[0].startswith("<!--") else "an earlier run"
    body = "\n".join(lines[1:]).split("\n## ")[0].strip()
    if body.startswith("## "):
        body = body.split("\n", 1)[1].strip()
    while body.startswith("(measured "):  # the table was carried over before: keep its own (oldest) date only
        stamp, body = body[len("(measured "):].split(",", 1)[0], body.split("\n", 1)[1].strip()
    return f"(measured {stamp}, not re-run this time)\n\n{body}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--no-100mp", action="store_true", help="skip the rows with one 100 MP photo")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    rows, big = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            photos = Path(tmp) / f"p{n}"
            make_photos(photos, n)
            peak, secs, _ = _peak_run([sys.executable, "-m", "cli", "index", str(photos), "--index",
                                       str(Path(tmp) / f"i{n}"), "--json"], env)
            rows.append([n, round(peak, 1), round(n * 1280 * 4 / 2**20, 1), round(secs, 1)])
            print(rows[-1], flush=True)
        if not args.no_100mp:
            big = big_photo_rows(Path(tmp), env)
    text = "## Collections\n\n"
    if rows:
        text += "Peak RSS of `retrieve index` (a fresh process each, its own rusage).\n\n"
        text += _common.table(["images", "peak RSS MiB", "of which FAISS flat vectors MiB", "seconds"], rows)
    else:
        text += _previous_collection_table()
    if big:
        text += ("\n\n## One 100 MP photo\n\nPeak RSS of `retrieve index` on a folder of 8 small photos, alone and "
                 "with one 100 MP photo (a fresh process and a new index each).\n\n")
        text += ("Beside it, the peak RSS of explaining that photo: `retrieve explain` of a small photo and the big one "
                 "(the small one itself in the baseline row), and `retrieve search SMALL --index … -k 9 --explain` "
                 "(maps and report for every result, the big photo among them).\n\n")
        text += _common.table(["folder", "file MB", "index: peak RSS MiB", "seconds", "indexed", "skipped",
                               "explain A B: peak MiB", "search --explain: peak MiB"], big)
    _common.save("memory", text)


if __name__ == "__main__":
    main()
