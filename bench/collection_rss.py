"""Peak RSS over time of `retrieve index` on a 1 k / 10 k collection, sampled from outside (bench/footprint.py).

tracemalloc does not see torch's or ONNX Runtime's allocations, so the child's VmRSS is read from
/proc/PID/status every ``INTERVAL`` s while it runs, and the phase it is in is told from the outside:

- ``start-up``: before ONNX Runtime's library is mapped (imports, opening the index, scanning),
- ``embedding``: from then until the vector file appears in the index folder,
- ``finalise``: after (calibration and the explain reference at 448 px), until the process exits.

Whether torch was ever loaded is read from /proc/PID/maps (libtorch_cpu mapped).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

INTERVAL = 0.05


def make_collection(dest: Path, n: int, data: Path) -> Path:
    """``n`` distinct JPEGs from Caltech-101 and AT&T faces: each source re-encoded with a small variation
    (a crop of 0-8 % per side, a quality of 80-92, mirrored or not), 1000 files per subfolder."""
    from PIL import Image, ImageOps

    files = sorted(p for c in sorted((data / "caltech101").iterdir()) if c.is_dir() for p in sorted(c.iterdir())
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files += sorted(p for c in sorted((data / "att_faces").iterdir()) if c.is_dir() for p in sorted(c.glob("*.pgm")))
    if dest.is_dir() and sum(1 for _ in dest.rglob("*.jpg")) == n:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    rnd = random.Random(0)
    cache: dict = {}
    for i in range(n):
        src = files[i % len(files)]
        img = cache.get(src)
        if img is None:
            img = cache[src] = Image.open(src).convert("RGB")
        w, h = img.size
        dx, dy = int(w * rnd.uniform(0, 0.08)), int(h * rnd.uniform(0, 0.08))
        out = img.crop((dx, dy, w - int(w * rnd.uniform(0, 0.08)), h - int(h * rnd.uniform(0, 0.08))))
        if rnd.random() < 0.5:
            out = ImageOps.mirror(out)
        sub = dest / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        out.save(sub / f"{i:06d}.jpg", quality=rnd.randint(80, 92))
    return dest


def _mapped(pid: int, names: tuple[str, ...]) -> set[str]:
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {n for n in names if n in text}


def run_sampled(argv: list[str], env: dict, index_dir: Path, cwd: Path | None = None) -> dict:
    """Run ``argv``; return peak RSS (MiB) overall and per phase, seconds, whether torch was loaded."""
    from retrieval.index.vectors import FAISS_NAME

    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    streams: dict = {}
    readers = [threading.Thread(target=lambda k, f: streams.__setitem__(k, f.read()), args=(k, f), daemon=True)
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    out: dict = {"peak": {"start-up": 0, "embedding": 0, "finalise": 0}, "torch": False, "ort": False}
    samples: list[tuple[float, int, str]] = []
    phase = "start-up"
    faiss = index_dir / FAISS_NAME
    existed = faiss.exists()
    tick = 0
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # the child's own rusage (its VmHWM) once it exits
        if pid:
            break
        try:
            rss = next(int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS"))
        except (OSError, StopIteration):
            rss = 0
        if tick % 5 == 0 and not (out["torch"] and out["ort"]):
            found = _mapped(p.pid, ("libtorch_cpu", "onnxruntime_pybind"))
            out["torch"] = out["torch"] or "libtorch_cpu" in found
            out["ort"] = out["ort"] or "onnxruntime_pybind" in found
        if phase == "start-up" and out["ort"]:
            phase = "embedding"
        if phase == "embedding" and not existed and faiss.exists():
            phase = "finalise"
        samples.append((time.perf_counter() - t0, rss, phase))
        out["peak"][phase] = max(out["peak"][phase], rss // 1024)
        tick += 1
        time.sleep(INTERVAL)
    out["seconds"] = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {streams.get('err', '').strip()[-2000:]}")
    out["max"] = usage.ru_maxrss // 1024  # VmHWM: nothing between two samples is missed
    out["stdout"] = streams.get("out", "")
    out["samples"] = samples
    return out


def index_run(tree: Path, photos: Path, index_dir: Path, threads: int, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "RETRIEVE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           **(extra_env or {})}
    shutil.rmtree(index_dir, ignore_errors=True)
    return run_sampled([sys.executable, "-m", "cli", "index", str(photos), "--index", str(index_dir), "--json"],
                       env, index_dir, cwd=tree)  # `-m cli` imports from the working directory first
