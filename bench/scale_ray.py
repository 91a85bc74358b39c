"""The Ray engine against the local engine on the same photos, side by side in one run (issue 12, part 4a).

    python bench/scale_ray.py [--count 1000] [--rounds 1] [--batch 32]

Indexes the first COUNT photos of ../shared/data/caltech101 (as they are: JPEGs of about 300×200 px)
into fresh indexes with the local engine (all cores' threads) and with the Ray engine on a local Ray
(1 actor × all cores' threads, then 2 actors × half the threads each), ROUNDS rounds in turn, and
reports images/s (scan to last commit, the embedding phase; and the whole run with finalisation), the
ratio to the local engine, 2 actors against 1, and the largest difference between the Ray and local
embeddings. Ray is started once, before the runs (a running cluster); its start is timed separately.
The machine's cores, threads and load average are in the table: figures from a shared, loaded machine
are noisy, which is why the engines alternate within one run. Saves bench/results/scale-ray.md.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch

from indexer import index_paths
from retrieval.models.loading import load_backbone


class Clock:
    """Progress that records when the embedding phase started and when its last item was committed."""

    def __init__(self):
        self.t0 = self.t1 = self.first = None
        self.n = self.n_first = 0

    def start(self, total: int) -> None:
        self.t0 = self.t1 = time.perf_counter()

    def advance(self, n: int) -> None:
        self.n += n
        self.t1 = time.perf_counter()
        if self.first is None:  # the first commit: what comes after it is the steady state
            self.first, self.n_first = self.t1, self.n

    def steady(self) -> float:
        return (self.n - self.n_first) / max(1e-9, self.t1 - self.first)


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants (a local Ray's raylet, workers and
    actors) while inside: /proc sampled every 0.2 s, so a process that ends loses at most its last 0.2 s.
    On a machine shared with other work, CPU seconds per image are what an engine costs; images/s there
    depend on how much of the contended cores each engine's processes get."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> dict:
        kids: dict[int, list] = {}
        cpu = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(parts[1]), []).append(int(d))
            cpu[int(d)] = (int(parts[11]) + int(parts[12])) / self.tick
        out, stack = {}, [os.getpid()]
        while stack:
            p = stack.pop()
            if p in cpu:
                out[p] = cpu[p]
            stack.extend(kids.get(p, ()))
        return out

    def __enter__(self):
        import threading

        self.first = self._sample()
        self.last = dict(self.first)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.done.wait(0.2):
            self.last.update(self._sample())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.last.update(self._sample())
        self.seconds = sum(v - self.first.get(p, 0.0) for p, v in self.last.items())


def vectors(index_dir: Path) -> dict:
    con = sqlite3.connect(f"file:{index_dir / 'index.db'}?mode=ro", uri=True)
    try:
        return {p: np.frombuffer(v, np.float32) for p, v in con.execute("SELECT path, vector FROM images")}
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--idle", type=float, default=30.0,
                    help="seconds to measure an idle local Ray's own CPU use (its daemons) before the runs")
    args = ap.parse_args()
    data = _common.shared_dataset("caltech101")
    if data is None:
        return
    import ray

    from indexer.ray_engine import _local_cpus

    cores = _local_cpus()
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.count]
    work = Path(tempfile.mkdtemp(prefix="scale-ray-"))
    coll = work / "photos"  # links: one folder to index, the photos read where they are
    coll.mkdir()
    for i, p in enumerate(files):
        (coll / f"{i:05d}{p.suffix.lower()}").symlink_to(p)
    torch.set_num_threads(cores)
    bb = load_backbone("efficientnet_lite0")
    bb.embed_images([_photo(files[0])])  # the fast path built (and cached on disk) before any timing

    t = time.perf_counter()
    path = os.pathsep.join(x for x in (str(_common.ROOT), os.environ.get("PYTHONPATH")) if x)
    ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, object_store_memory=1_000_000_000,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    ray_start = time.perf_counter() - t
    time.sleep(5)  # past its start-up
    with CpuMeter() as idle:
        t = time.perf_counter()
        time.sleep(args.idle)
    idle_rate = idle.seconds / (time.perf_counter() - t)  # CPU s per second of an idle local Ray (and this process)

    configs = [("local", "local engine", None, cores), ("ray1", "Ray, 1 actor", 1, cores),
               ("ray2", "Ray, 2 actors", 2, max(1, cores // 2))]
    results: dict[str, list] = {k: [] for k, *_ in configs}
    ref = None
    diffs = {}
    for r in range(args.rounds):
        for key, label, workers, threads in configs:
            idx = work / f"{key}-{r}"
            clock = Clock()
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            with CpuMeter() as cpu:
                rep = index_paths([coll], idx, backbone=bb, batch_size=args.batch, progress=clock,
                                  engine="local" if key == "local" else "ray", workers=workers,
                                  follow_links=True)
            wall = time.perf_counter() - t
            load1 = os.getloadavg()[0]
            phase = clock.t1 - clock.t0
            results[key].append((rep.indexed / phase, rep.indexed / wall, rep.indexed, rep.skipped, load0, load1,
                                 clock.steady(), clock.first - clock.t0, cpu.seconds / rep.indexed,
                                 (cpu.seconds - (idle_rate * wall if key != "local" else 0.0)) / rep.indexed))
            v = vectors(idx)
            if key == "local":
                ref = ref or v
            else:
                common = ref.keys() & v.keys()
                assert len(common) == len(ref) == len(v), (len(ref), len(v))
                diffs[key] = max(diffs.get(key, 0.0), max(float(np.abs(ref[p] - v[p]).max()) for p in common))
            print(f"round {r + 1} {label}: {rep.indexed} indexed, {rep.skipped} skipped, {rep.indexed / phase:.1f} "
                  f"images/s (embedding phase), {clock.steady():.1f} after the first commit "
                  f"({clock.first - clock.t0:.1f} s to it), {rep.indexed / wall:.1f} images/s (whole run), "
                  f"{1000 * cpu.seconds / rep.indexed:.0f} CPU ms/image, load {load0:.1f}"
                  f"→{load1:.1f}", flush=True)
    ray.shutdown()

    def best(key, i=0):
        return max(x[i] for x in results[key])

    rows = []
    for key, label, workers, threads in configs:
        xs = results[key]
        rows.append([label, "-" if workers is None else workers, threads, xs[0][2], xs[0][3],
                     1000 * min(x[8] for x in xs), min(x[8] for x in xs) / min(x[8] for x in results["local"]),
                     1000 * min(x[9] for x in xs), min(x[9] for x in xs) / min(x[9] for x in results["local"]),
                     min(x[7] for x in xs), best(key, 6), best(key, 6) / best("local", 6), best(key),
                     best(key) / best("local"), best(key, 1), best(key, 1) / best("local", 1),
                     "-" if key == "local" else f"{diffs[key]:.1e}",
                     " / ".join(f"{x[4]:.1f}→{x[5]:.1f}" for x in xs)])
    text = (f"# Ray engine vs local engine, same {len(files)} photos (caltech101, as stored)\n\n"
            f"`python bench/scale_ray.py --count {args.count} --rounds {args.rounds} --batch {args.batch}`: "
            f"{cores} cores (`os.sched_getaffinity`), torch {torch.__version__}, efficientnet_lite0 at "
            f"{bb.preprocess.size} px ({bb.fast_path_name()}), batch {args.batch}. Ray {ray.__version__} started "
            f"locally once before the runs ({ray_start:.1f} s, `num_cpus={cores + 1}`: the actors' CPUs plus one "
            "for the decoding tasks); best of the rounds. s to 1st commit: scan done → first batch committed "
            "(Ray: starting the actors, each loading the backbone, and the first decoding tasks); images/s "
            "(steady): after the first commit, the per-image cost of the engine; (phase): scan done → last "
            "commit, what the engine costs with its start; CPU ms/image: user + system CPU of this process "
            "and all its descendants (Ray's raylet, workers, actors) over the whole run, per image indexed: "
            "the engine's cost independent of how much of a shared machine its processes get; less idle Ray: "
            f"the same less what an idle local Ray's daemons use over the run's wall time ({idle_rate:.3f} "
            f"CPU s/s, measured for {args.idle:g} s before the runs), which grows with the wall time a loaded "
            "machine stretches; (run): the whole `index_paths`, with the head, calibration and reference "
            "refresh that both engines share.\n\n"
            + _common.table(["engine", "actors", "threads/actor", "indexed", "skipped", "CPU ms/image", "× local",
                             "less idle Ray", "× local",
                             "s to 1st commit",
                             "images/s (steady)", "× local", "images/s (phase)", "× local", "images/s (run)", "× local (run)", "max |Δ| vs local",
                             "load avg 1 min (before→after)"], rows)
            + f"\n\n2 actors / 1 actor: **{best('ray2', 6) / best('ray1', 6):.2f}×** steady, "
            f"**{best('ray2') / best('ray1'):.2f}×** with the start. Ray (best config) / local: "
            f"**{max(best('ray1', 6), best('ray2', 6)) / best('local', 6):.2f}×** steady, "
            f"**{max(best('ray1'), best('ray2')) / best('local'):.2f}×** with the start. CPU per image, Ray "
            f"(1 actor / 2 actors) / local: **{min(x[8] for x in results['ray1']) / min(x[8] for x in results['local']):.2f}× / "
            f"{min(x[8] for x in results['ray2']) / min(x[8] for x in results['local']):.2f}×**.\n")
    _common.save("scale-ray", text)


def _photo(p: Path):
    from PIL import Image

    return Image.open(p).convert("RGB")


if __name__ == "__main__":
    main()
