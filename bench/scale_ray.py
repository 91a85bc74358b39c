"""The Ray engine against the local engine on the same photos, side by side in one run (issue 12, part 4a);
with ``--commits``, the Ray driver's commit rate before and after a change (issue 31).

    python bench/scale_ray.py [--count 1000] [--rounds 1] [--batch 32]
    python bench/scale_ray.py --commits [--rows 40000] [--photos 400] [--before REV] [--rounds 2]

Indexes the first COUNT photos of ../shared/data/caltech101 (as they are: JPEGs of about 300×200 px)
into fresh indexes with the local engine (all cores' threads) and with the Ray engine on a local Ray
(1 actor × all cores' threads, then 2 actors × half the threads each), ROUNDS rounds in turn, and
reports images/s (scan to last commit, the embedding phase; and the whole run with finalisation), the
ratio to the local engine, 2 actors against 1, and the largest difference between the Ray and local
embeddings. Ray is started once, before the runs (a running cluster); its start is timed separately.
The machine's cores, threads and load average are in the table: figures from a shared, loaded machine
are noisy, which is why the engines alternate within one run. Saves bench/results/scale-ray.md.

``--commits`` (:func:`commits`): rows/s that ``retrieve index --engine ray`` commits, into SQLite and into
PostgreSQL (a throw-away cluster with the server's default durability, fsync on), from this tree and from
``--before REV`` (a git worktree), interleaved in ``--rounds`` rounds, each run a child process with its own local
Ray (3 logical CPUs). Two workloads: the driver's own ceiling, ``--rows`` synthetic files through the Ray path with
reading, decoding and embedding stubbed out in the workers (a 1280-d vector per row, made in the actor), so the
driver's loop, its commits and the FAISS mirror are all that is measured; and end to end, ``--photos`` Caltech-101
photos read, decoded and embedded (efficientnet_lite0) by the workers. Replaces the "Commits" section of
bench/results/scale-ray.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch


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
    ap.add_argument("--commits", action="store_true", help="the Ray driver's commit rate, before and after")
    ap.add_argument("--rows", type=int, default=40_000, help="--commits: synthetic rows, embedding stubbed out")
    ap.add_argument("--photos", type=int, default=400, help="--commits: real photos end to end (0: none)")
    ap.add_argument("--before", metavar="REV", default=None, help="--commits: a git revision to measure beside this")
    ap.add_argument("--stub-batch", type=int, default=256, help="--commits: the stubbed runs also at this batch size")
    ap.add_argument("--from-log", default=None, help="--commits: table the rounds a run printed (saved output) again")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return commit_child(json.loads(args.child))
    if args.commits:
        return commits(args)
    data = _common.shared_dataset("caltech101")
    if data is None:
        return
    import ray

    from indexer import index_paths
    from retrieval.models.loading import load_backbone

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


# -- the Ray driver's commits (--commits) ----------------------------------------------------------------
DIM = 1280


def stub_decode(batch: dict, known, preprocess, min_side: int, verify: bool) -> dict:
    """The workers' read-hash-decode stage (indexer.ray_engine.decode_batch) stubbed: every file is new content to
    embed, its hash made from its path; nothing is read."""
    n = len(batch["path"])
    res = {k: batch[k] for k in ("path", "size", "mtime_ns")}
    res["status"] = np.array(["embed"] * n, dtype=object)
    res["reason"] = np.array([""] * n, dtype=object)
    res["sha256"] = np.array([hashlib.sha256(str(p).encode()).hexdigest() for p in batch["path"]], dtype=object)
    res["width"], res["height"] = np.full(n, 640, np.int64), np.full(n, 480, np.int64)
    res["feats"] = np.array([b""] * n, dtype=object)
    return res


class StubEmbedder:
    """The embedding actor (indexer.ray_engine.Embedder) stubbed: a 1280-d float32 vector per row, from a pool made
    once per actor."""

    def __init__(self, backbone, threads: int):
        self.pool = np.random.default_rng(os.getpid()).standard_normal((4096, DIM)).astype(np.float32)
        self.at = 0

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        take = np.arange(self.at, self.at + n) % len(self.pool)
        self.at += n
        return {**batch, "vector": self.pool[take]}


class _StubBackbone:
    preprocess = None
    feature_dim = DIM


def commit_child(spec: dict) -> None:
    """One measured run, in its own process, importing retrieve from ``spec["tree"]``; prints its figures as JSON."""
    import threading

    sys.path.insert(0, spec["tree"])  # ahead of _common's ROOT: this tree's or the --before worktree's modules
    import ray

    import indexer.ray_engine as engine
    import indexer.rows as rows
    from retrieval.index import database

    assert Path(engine.__file__).is_relative_to(spec["tree"]), engine.__file__
    committed = {"s": 0.0, "n": 0}
    commit = rows.commit_embedded

    def timed(store, batch, *a, **kw):  # the driver's time in its commits (rows, then the FAISS mirror)
        t = time.perf_counter()
        commit(store, batch, *a, **kw)
        committed["s"] += time.perf_counter() - t
        committed["n"] += 1

    rows.commit_embedded = timed
    if spec["db"]:
        database.use(spec["db"])
    torch.set_num_threads(1)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=500_000_000,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([spec["tree"], os.environ.get("PYTHONPATH", "")])}})
    clock = Clock()
    idx = Path(spec["index"])
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    if spec["photos"]:
        from indexer import index_paths
        from retrieval.models.loading import load_backbone

        bb = load_backbone("efficientnet_lite0")
        rep = index_paths([spec["photos"]], idx, backbone=bb, batch_size=spec["batch"], progress=clock,
                          engine="ray", follow_links=True)
    else:
        from indexer.common import IndexReport
        from retrieval.index.settings import IndexSettings
        from retrieval.index.store import IndexStore
        from retrieval.scan import FileEntry

        engine.decode_batch, engine.Embedder, engine.portable = stub_decode, StubEmbedder, lambda bb: bb
        st = IndexSettings(model="stub", weights_id="stub", weights_source="", preprocess={"size": 224},
                           metric="cosine", dim=DIM, index_type="flat", faiss_factory="")
        files = [FileEntry(f"/photos/{i // 1000:04d}/{i:08d}.jpg", 200_000 + i, 1_700_000_000_000_000_000 + i)
                 for i in range(spec["rows"])]
        rep = IndexReport()
        with IndexStore.create(idx, st) as store:
            engine.ray_runner(None)(store, _StubBackbone(), files, ["/photos"], rep, spec["batch"], None, clock,
                                    lambda p, r: None, threading.Event())
            store.save_faiss()
            assert store.count() == spec["rows"]
    wall = time.perf_counter() - t
    ray.shutdown()
    print(json.dumps({"indexed": rep.indexed, "phase": rep.indexed / (clock.t1 - clock.t0), "steady": clock.steady(),
                      "wall": wall, "commits": committed["n"], "commit_s": committed["s"],
                      "rows_per_commit_s": rep.indexed / max(committed["s"], 1e-9), "load": [load0, os.getloadavg()[0]]}))


def commits(args) -> None:
    """Before and after, SQLite and PostgreSQL, stubbed and end to end, interleaved; saves the section."""
    from contextlib import ExitStack

    sys.path.insert(0, str(_common.ROOT / "tests"))
    from pgserver import Cluster, new_database

    workloads = [("stub", args.rows, None, b) for b in sorted({args.batch, args.stub_batch})]
    if args.photos:
        data = _common.shared_dataset("caltech101")
        if data is not None:
            workloads.append(("photos", args.photos, data, args.batch))
    out: dict = {}
    labels = ["now"] if not args.before else [f"before ({args.before})", "now"]
    if args.from_log:  # the figures a run printed, tabled again (no runs)
        import ast
        import re

        for line in Path(args.from_log).read_text().splitlines():
            m = re.match(r"round \d+ (\w+) batch (\d+) (.+) (sqlite|postgresql): (\{.*\})$", line)
            if m:
                out.setdefault((m[1], int(m[2]), m[3], m[4]), []).append(ast.literal_eval(m[5]))
        return _commits_section(args, [w for w in workloads if any(k[:2] == (w[0], w[3]) for k in out)], labels, out)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-commits-")))
        trees = [("now", str(_common.ROOT))]
        if args.before:
            trees.insert(0, (f"before ({args.before})", str(stack.enter_context(
                _common.worktree(args.before, tmp / "before")).resolve())))
        cluster = Cluster(durable=True)
        stack.callback(cluster.stop)
        pg = cluster.start()
        photos = None
        for name, n, data, _ in workloads:
            if data is not None:
                photos = tmp / "photos"
                photos.mkdir()
                files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
                for i, p in enumerate(files):
                    (photos / f"{i:05d}{p.suffix.lower()}").symlink_to(p)
        k = 0
        for r in range(args.rounds):
            for name, n, data, batch in workloads:
                for label, tree in trees:
                    for db in ("sqlite", "postgresql"):
                        k += 1
                        url = new_database(pg, f"commits{k}") if db == "postgresql" else None
                        spec = {"tree": tree, "db": url, "index": str(tmp / f"idx{k}"), "batch": batch,
                                "rows": n if data is None else 0, "photos": str(photos) if data is not None else None}
                        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                           text=True, env={**os.environ, "RETRIEVE_THREADS": "1"})
                        if p.returncode:
                            raise SystemExit(f"{name} {label} {db}: child failed\n{p.stderr[-3000:]}")
                        got = json.loads(p.stdout.strip().splitlines()[-1])
                        print(f"round {r + 1} {name} batch {batch} {label} {db}: {got}", flush=True)
                        out.setdefault((name, batch, label, db), []).append(got)
    _commits_section(args, workloads, labels, out)


def _commits_section(args, workloads, labels, out) -> None:
    """The "Commits" section of scale-ray.md from the runs' figures. End to end, the rate is the phase's (scan
    done → last commit): with the embedding the limit, the few commits come in bursts and a rate between them
    means nothing."""
    import statistics

    table = []
    for (name, batch, label, db), xs in out.items():
        med = {key: statistics.median(x[key] for x in xs) for key in ("phase", "steady", "commits", "commit_s",
                                                                        "rows_per_commit_s")}
        loads = [v for x in xs for v in x["load"]]
        table.append([{"stub": "stubbed embedding", "photos": "end to end"}[name], xs[0]["indexed"], batch, label, db,
                      f"{med['steady']:,.0f}" if name == "stub" else "-", f"{med['phase']:,.0f}", f"{med['commits']:.0f}",
                      f"{med['rows_per_commit_s']:,.0f}", f"{1000 * med['commit_s'] / xs[0]['indexed']:.3f}",
                      f"{min(loads):.1f}-{max(loads):.1f}"])
    ratios = []
    for name, _, _, batch in workloads:
        for db in ("sqlite", "postgresql"):
            now = out.get((name, batch, "now", db))
            old = out.get((name, batch, labels[0], db)) if args.before else None
            if now and old:
                f = lambda xs, key: statistics.median(x[key] for x in xs)  # noqa: E731
                rate = "steady" if name == "stub" else "phase"
                ratios.append(f"{name} (batch {batch}) {db}: {f(now, rate) / f(old, rate):.1f}× rows/s ({rate}), "
                              f"{f(now, 'rows_per_commit_s') / f(old, 'rows_per_commit_s'):.1f}× rows per commit-second")
    section = (f"## Commits of the Ray engine's driver\n\nRows/s committed by `retrieve index --engine ray`, each run a "
               f"child process with its own local Ray (3 logical CPUs: 2 embedding actors and the decoding tasks), "
               f"RETRIEVE_THREADS=1, {os.cpu_count()} cores shared with everything else on the machine, median of "
               f"{args.rounds} interleaved round(s). *Stubbed embedding*: {args.rows:,} synthetic files through the Ray path with "
               f"the workers' reading, decoding and embedding stubbed (a {DIM}-d float32 vector made in the actor), "
               f"flat index: the driver's own ceiling. *End to end*: Caltech-101 photos read, decoded and embedded "
               f"(efficientnet_lite0, 224 px) by the workers. PostgreSQL 15: a throw-away cluster with the server's "
               f"default durability (fsync on), a fresh database per run; SQLite: WAL, synchronous=NORMAL. "
               f"rows/s (steady): first commit → last; (phase): scan done → last commit, with the actors' start; "
               f"rows per commit-second: rows over the driver's seconds inside its commits (rows, then the FAISS "
               f"mirror), the rate the commits alone would allow. --batch-size also sets the pipeline's blocks (rows "
               f"per decoding task and per actor call).\n\n"
               + _common.table(["workload", "rows", "--batch-size", "tree", "database", "rows/s (steady)", "rows/s (phase)",
                                "commits", "rows per commit-second", "commit ms/row", "load avg 1 min"], table)
               + ("\n\n" + "; ".join(ratios) + "." if ratios else "")
               + f"\n\nReproduce: `RETRIEVE_THREADS=1 python bench/scale_ray.py --commits --rows {args.rows} --photos "
               f"{args.photos} --rounds {args.rounds} --batch {args.batch} --stub-batch {args.stub_batch}"
               f"{' --before ' + args.before if args.before else ''}`\n")
    path = _common.RESULTS / "scale-ray.md"
    text = path.read_text() if path.exists() else ""
    head = text.split("## Commits of the Ray engine's driver")[0].rstrip()
    path.write_text((head + "\n\n" if head else "") + section)
    print(section)


def _photo(p: Path):
    from PIL import Image

    return Image.open(p).convert("RGB")


if __name__ == "__main__":
    main()
