"""Vectors at scale: where raw vectors live, and a sharded IVF-PQ index searched memory-mapped.

    python bench/scale_vectors.py storage [--n 50000]             # SQLite blobs vs shard files
    python bench/scale_vectors.py run --n 1000000 --dim 1280      # one collection size (JSON under bench/.cache)
    python bench/scale_vectors.py run --n 10000000 --dim 128
    python bench/scale_vectors.py report                          # bench/results/scale-vectors.md

``storage`` writes, streams and randomly gathers the same 1280-d vectors as SQLite blobs (the
product's table layout and pragmas) and as float32 / float16 shard files with CRC-32 checksums
(retrieval/index/sharded.py), side by side in one run.

``run`` generates realistic synthetic vectors the way bench/search.py does (sampled around real
Lite0 embeddings with noise along their top 64 principal directions, clipped at 0 like ReLU6); at
128-d they are the instance preset's space: a PCA-whitening head fitted on the 1280-d vectors
(``pca-whiten:128``) applied to the real embeddings and to the noise directions (the ReLU clip is
skipped there: it would cost a 1280-d pass per vector). Cosine (inner product of L2-normalised
vectors). Vectors are generated in chunks straight into float16 shard files, never all in RAM. The
build (train on a sample, add the shards in parallel worker processes, merge the inverted lists on
disk) and the searches (single queries on the memory-mapped merged index, candidates re-scored
exactly from the shard files) are timed; recall@10 is against exact brute force over the shard
files (read in chunks) for ``--queries`` held-out queries. Peak RSS: this process and, separately,
the largest worker. Scratch data lives under bench/.cache/scale-vectors/ (git-ignored) and is
deleted afterwards unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a loaded machine: OpenMP threads must not spin

import _common
import numpy as np

from retrieval.index import sharded
from retrieval.index.sharded import ShardedVectors, sharded_factory

CACHE = _common.ROOT / "bench" / ".cache" / "scale-vectors"


def rss_mb() -> dict:
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg} (load {os.getloadavg()[0]:.1f}, peak RSS {rss_mb()['self']:.0f} MB)",
          flush=True)


def real_embeddings() -> np.ndarray:
    path = CACHE / "real.npy"
    if not path.exists():
        import search  # bench/search.py

        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, search.real_embeddings())
    return np.load(path)


class Generator:
    """Chunks of synthetic vectors around real embeddings (bench/search.py's subspace noise)."""

    def __init__(self, real: np.ndarray, dim: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.real = real.astype(np.float32)
        centred = real - real.mean(0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        self.basis = (vt[:64] * (sv[:64, None] / np.sqrt(len(real)))).astype(np.float32)
        self.dim = dim
        if dim != real.shape[1]:  # the instance preset's head, fitted on 100 k generated 1280-d vectors
            from retrieval.index.head import fit_head

            fit = np.random.default_rng(12345)
            head = fit_head((self._raw(20_000, fit) for _ in range(5)), {"type": "pca-whiten", "dim": dim})
            self.real_h = head.apply(self.real)
            self.basis_h = (self.basis.astype(np.float64) @ head.proj.T).astype(np.float32)

    def _raw(self, m: int, rng) -> np.ndarray:
        base = self.real[rng.integers(0, len(self.real), m)]
        return np.clip(base + 0.5 * rng.standard_normal((m, 64), dtype=np.float32) @ self.basis, 0, None)

    def chunk(self, m: int) -> np.ndarray:
        if self.dim == self.real.shape[1]:
            x = self._raw(m, self.rng)
        else:
            x = self.real_h[self.rng.integers(0, len(self.real), m)]
            x += 0.5 * self.rng.standard_normal((m, 64), dtype=np.float32) @ self.basis_h
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


# -- storage: SQLite blobs vs shard files -------------------------------------------------------------------
def storage(args) -> None:
    real = real_embeddings()
    gen = Generator(real, real.shape[1], 0)
    n, d = args.n, real.shape[1]
    x = np.concatenate([gen.chunk(min(10_000, n - s)) for s in range(0, n, 10_000)])
    ids = np.arange(1, n + 1, dtype=np.int64)
    rng = np.random.default_rng(1)
    picks = [np.sort(rng.choice(ids, 100, replace=False)) for _ in range(50)]
    work = CACHE / "storage"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def sqlite_round(r: int):
        # the product's layout (one float32 blob per row), WAL, synchronous=NORMAL, 1000 rows per commit
        db = work / f"index-{r}.db"
        con = sqlite3.connect(db)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("CREATE TABLE images (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT UNIQUE, vector BLOB)")
        t = time.perf_counter()
        for s in range(0, n, 1000):
            con.executemany("INSERT INTO images (id, path, vector) VALUES (?, ?, ?)",
                            [(int(i), f"/photos/{i}.jpg", x[i - 1].tobytes()) for i in ids[s:s + 1000]])
            con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        write = time.perf_counter() - t
        t = time.perf_counter()
        cur = con.execute("SELECT id, vector FROM images ORDER BY id")
        while True:  # as store.iter_vectors: 2048 rows per array
            rows = cur.fetchmany(2048)
            if not rows:
                break
            np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), d)
        read = time.perf_counter() - t
        lat = []
        for p in picks:
            t = time.perf_counter()
            q = ",".join(map(str, p.tolist()))
            v = np.frombuffer(b"".join(r[0] for r in con.execute(
                f"SELECT vector FROM images WHERE id IN ({q}) ORDER BY id")), np.float32).reshape(-1, d)
            lat.append(time.perf_counter() - t)
        assert np.array_equal(v, x[p - 1])
        con.close()
        size = db.stat().st_size
        db.unlink()
        return write, read, float(np.median(lat)), size, None

    def shard_round(r: int, dtype: str):
        sdir = work / f"{dtype}-{r}"
        t = time.perf_counter()
        sv = ShardedVectors.new(sdir, d, "ip", dtype)
        for s in range(0, n, 10_000):  # 10 k-vector shards: the same unit of work as 10 SQLite commits
            sv.append(ids[s:s + 10_000], x[s:s + 10_000])
            sv.commit()
        write = time.perf_counter() - t
        t = time.perf_counter()
        sum(len(v) for _, v in sv.iter_chunks())
        read = time.perf_counter() - t
        lat = []
        for p in picks:
            t = time.perf_counter()
            v = sv.vectors_of(p)
            lat.append(time.perf_counter() - t)
        assert np.abs(v - x[p - 1]).max() < (1e-3 if dtype == "float16" else 1e-9)
        t = time.perf_counter()
        assert not sv.check(full=True)
        crc = time.perf_counter() - t
        size = sv.disk_bytes()["vectors"]
        sv.close()
        shutil.rmtree(sdir)
        return write, read, float(np.median(lat)), size, crc

    kinds = {"SQLite blob (float32)": sqlite_round, "shard file (float32) + CRC-32": lambda r: shard_round(r, "float32"),
             "shard file (float16) + CRC-32": lambda r: shard_round(r, "float16")}
    best: dict[str, list] = {}
    for r in range(args.rounds):  # interleaved rounds, best of each: the machine's load changes meanwhile
        for name, fn in kinds.items():
            got = fn(r)
            old = best.get(name)
            best[name] = list(got) if old is None else [min(a, b) if a is not None else None for a, b in zip(old, got)]
            log(f"round {r}: {name} {got}")
    q = x[picks[0][:20]]
    s32 = q @ x.T
    s16 = q @ x.astype(np.float16).astype(np.float32).T
    top32, top16 = np.argsort(-s32, 1)[:, :10], np.argsort(-s16, 1)[:, :10]
    agree = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top32, top16)]))
    rows = []
    base = best["SQLite blob (float32)"]
    for name, (write, read, lat, size, crc) in best.items():
        rows.append([name, round(n / write), f"{base[0] / write:.2f}", round(n / read), f"{base[1] / read:.2f}",
                     round(1000 * lat, 2), round(size / n), f"{size / crc / 1e9:.2f}" if crc else "—",
                     f"max |Δscore| {np.abs(s32 - s16).max():.1e}, top-10 {agree:.3f}" if "float16" in name else "exact"])
    shutil.rmtree(work, ignore_errors=True)
    res = {"n": n, "dim": d, "rounds": args.rounds, "rows": rows, "load": os.getloadavg()}
    (CACHE / "storage.json").write_text(json.dumps(res))


# -- one collection size ------------------------------------------------------------------------------------------
def run(args) -> None:
    real = real_embeddings()
    n, d = args.n, args.dim
    name = f"{n}-{d}" + (f"-{args.tag}" if args.tag else "")
    work = CACHE / f"run-{name}"
    if not args.search_only:
        shutil.rmtree(work, ignore_errors=True)
    gen = Generator(real, d, 0)
    queries = Generator(real, d, 99).chunk(args.queries) if d == real.shape[1] else None
    if queries is None:
        qgen = Generator.__new__(Generator)
        qgen.__dict__.update(gen.__dict__)
        qgen.rng = np.random.default_rng(99)
        queries = qgen.chunk(args.queries)
    if args.search_only:  # the build's figures from the run that kept the collection
        res = json.loads((CACHE / f"{name}.json").read_text())
    else:
        shard = args.shard or max(50_000, (n + 7) // 8)
        res = {"n": n, "dim": d, "shard": shard, "workers": args.workers, "queries": args.queries,
               "dtype": "float16", "load_start": os.getloadavg()}
        log(f"{name}: generating {n} vectors into float16 shards of {shard}")
        sv = ShardedVectors.new(work, d, "ip", "float16")
        gen_s, t0 = 0.0, time.perf_counter()
        for s in range(0, n, shard):
            m = min(shard, n - s)

            def chunks(s=s, m=m):
                nonlocal gen_s
                for a in range(0, m, 50_000):
                    t = time.perf_counter()
                    c = gen.chunk(min(50_000, m - a))
                    gen_s += time.perf_counter() - t
                    yield np.arange(s + a, s + a + len(c), dtype=np.int64), c

            sv.append(None, chunks())
            log(f"{name}: wrote {s + m}/{n}")
        res["write_s"] = time.perf_counter() - t0 - gen_s
        res["generate_s"] = gen_s
        factory = args.factory or sharded_factory(d, n)
        log(f"{name}: training {factory}")
        res["factory"] = factory
        res["ivf_niter"] = sharded.IVF_NITER
        res["train_s"] = sv.train(factory, threads=args.threads)
        log(f"{name}: trained in {res['train_s']:.0f} s; adding {len(sv.shards)} shards with {args.workers} workers")
        times = sv.build(workers=args.workers, progress=lambda m: log(f"{name}: {m}"))
        sv.commit()
        res.update(add_s=times["add"], merge_s=times["merge"])
        res["build_s"] = res["train_s"] + res["add_s"] + res["merge_s"]
        res["disk"] = sv.disk_bytes()
        res["rss_build"] = rss_mb()
        log(f"{name}: built in {res['build_s']:.0f} s; exact ground truth for {args.queries} queries")
        sv.close()

    sv = ShardedVectors.open(work)
    t = time.perf_counter()
    _, gt = sv.exact_search(queries, 10, chunk=65_536)
    res["exact_ms_per_query"] = 1000 * (time.perf_counter() - t) / len(queries)
    res["mmapped"] = sv.is_mmapped()
    import faiss

    faiss.omp_set_num_threads(1)
    rows = []
    for nprobe, rerank in [(p, r) for r in args.rerank for p in args.nprobe] + [(args.nprobe[-1], 1)]:
        for q in queries[:20]:  # warm the page cache for these lists
            sv.search(q, 10, nprobe=nprobe, rerank=rerank)
        lat, rec = [], []
        for q, g in zip(queries, gt):
            t = time.perf_counter()
            _, ids = sv.search(q, 10, nprobe=nprobe, rerank=rerank)
            lat.append(time.perf_counter() - t)
            rec.append(len(set(ids[0].tolist()) & set(g.tolist())) / 10)
        rows.append({"nprobe": nprobe, "rerank": rerank, "p50_ms": 1000 * float(np.percentile(lat, 50)),
                     "p99_ms": 1000 * float(np.percentile(lat, 99)), "recall": float(np.mean(rec))})
        log(f"{name}: {rows[-1]}")
    res["search"] = rows
    res["rss_search"] = rss_mb()
    res["load_end"] = os.getloadavg()
    sv.close()
    (CACHE / f"{name}.json").write_text(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: saved {CACHE / (name + '.json')}")


# -- factories side by side ---------------------------------------------------------------------------------------
def _linked_copy(src: Path, dst: Path) -> ShardedVectors:
    """A second collection over the same vector shard files (hard links), untrained: another factory's index."""
    shutil.rmtree(dst, ignore_errors=True)
    base = ShardedVectors.open(src)
    sv = ShardedVectors.new(dst, base.dim, base.doc["metric"], base.dtype)
    for s in base.shards:
        for k in ("vectors", "ids"):
            os.link(base.directory / s[k]["file"], sv.directory / s[k]["file"])
        sv.shards.append({**s, "index": None})
    sv.commit()
    return sv


def compare(args) -> None:
    """Several factories over the same vectors in one run: build each, then search them query by query in turn
    (the order alternating), so that load and page cache treat them alike; recall against the same truth."""
    real = real_embeddings()
    n, d = args.n, args.dim
    name = f"compare-{n}-{d}" + (f"-{args.tag}" if args.tag else "")
    work = CACHE / name
    shutil.rmtree(work, ignore_errors=True)
    gen = Generator(real, d, 0)
    queries = Generator(real, d, 99).chunk(args.queries)
    shard = args.shard or max(50_000, (n + 7) // 8)
    res = {"n": n, "dim": d, "shard": shard, "workers": args.workers, "queries": args.queries,
           "load_start": os.getloadavg(), "factories": [], "tag": args.tag}
    log(f"{name}: generating {n} vectors into float16 shards of {shard}")
    base = ShardedVectors.new(work / "f0", d, "ip", "float16")
    for s in range(0, n, shard):
        m = min(shard, n - s)
        base.append(None, ((np.arange(s + a, s + a + min(50_000, m - a), dtype=np.int64), gen.chunk(min(50_000, m - a)))
                           for a in range(0, m, 50_000)))
    base.commit()
    base.close()
    cols = []
    for i, factory in enumerate(args.factories):
        sv = ShardedVectors.open(work / "f0", writable=True) if i == 0 else _linked_copy(work / "f0", work / f"f{i}")
        t = time.perf_counter()
        train_s = sv.train(factory, threads=args.threads)
        times = sv.build(workers=args.workers)
        sv.commit()
        build_s = time.perf_counter() - t
        disk = sv.disk_bytes()
        sv.close()
        res["factories"].append({"factory": factory, "train_s": train_s, "add_s": times["add"],
                                 "merge_s": times["merge"], "build_s": build_s, "disk": disk,
                                 "load": os.getloadavg()[0]})
        log(f"{name}: {factory} built in {build_s:.0f} s (train {train_s:.0f}, add {times['add']:.0f})")
        cols.append(ShardedVectors.open(work / "f0" if i == 0 else work / f"f{i}"))
    _, gt = cols[0].exact_search(queries, 10, chunk=65_536)
    import faiss

    faiss.omp_set_num_threads(1)
    rows = []
    for rerank in args.rerank:
        for nprobe in args.nprobe:
            lat = [[] for _ in cols]
            rec = [[] for _ in cols]
            for j, (q, g) in enumerate(zip(queries, gt)):
                order = range(len(cols)) if j % 2 == 0 else reversed(range(len(cols)))
                for c in order:
                    if j < 20:  # warm the lists these queries visit, not timed
                        cols[c].search(q, 10, nprobe=nprobe, rerank=rerank)
                    t = time.perf_counter()
                    _, ids = cols[c].search(q, 10, nprobe=nprobe, rerank=rerank)
                    lat[c].append(time.perf_counter() - t)
                    rec[c].append(len(set(ids[0].tolist()) & set(g.tolist())) / 10)
            for c, f in enumerate(args.factories):
                rows.append({"factory": f, "nprobe": nprobe, "rerank": rerank,
                             "p50_ms": 1000 * float(np.percentile(lat[c], 50)),
                             "p99_ms": 1000 * float(np.percentile(lat[c], 99)), "recall": float(np.mean(rec[c]))})
                log(f"{name}: {rows[-1]}")
    res["search"] = rows
    res["load_end"] = os.getloadavg()
    res["threads"] = {"train": args.threads, "add_workers": args.workers, "search": 1}
    for c in cols:
        c.close()
    (CACHE / f"{name}.json").write_text(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    _compare_section(res)


def _compare_section(res: dict) -> None:
    """Put the comparison into bench/results/scale-vectors.md between markers, the rest of it kept as it is."""
    n, d = res["n"], res["dim"]
    tag = f" {res['tag']}" if res.get("tag") else ""
    first = res["factories"][0]
    rows = []
    for sr in res["search"]:
        b = next(f for f in res["factories"] if f["factory"] == sr["factory"])
        ref = next(x for x in res["search"] if x["factory"] == first["factory"] and x["nprobe"] == sr["nprobe"]
                   and x["rerank"] == sr["rerank"])
        rows.append([sr["factory"], sr["nprobe"], f"exact, {10 * sr['rerank']}",
                     f"{b['build_s']:.0f}", f"{b['build_s'] / first['build_s']:.2f}",
                     f"{b['train_s']:.0f} / {b['add_s']:.0f} / {b['merge_s']:.0f}",
                     f"{b['disk']['merged'] / n:.1f}", round(sr["p50_ms"], 2), f"{sr['p50_ms'] / ref['p50_ms']:.2f}",
                     round(sr["p99_ms"], 2), round(sr["recall"], 3)])
    cmd = " ".join(["--factories", *(f["factory"] for f in res["factories"])] + (["--tag", res["tag"]] if tag else []))
    text = (f"## Factories side by side: {n:,} × {d}{tag}\n\n`python bench/scale_vectors.py compare --n {n} --dim {d} {cmd}` "
            f"(same float16 shard files for every factory, hard-linked; built one after the other; then each query "
            f"searched on every factory in turn, the order alternating; recall@10 against one exact ground truth; "
            f"{res['queries']} queries; training {res['threads']['train']} FAISS thread, {res['workers']} add "
            f"workers × 1 thread, searches 1 thread; load average {res['load_start'][0]:.1f} → "
            f"{res['load_end'][0]:.1f} on 2 cores shared with other jobs). × first: against the first factory.\n\n")
    text += _common.table(["factory", "nprobe", "re-score", "build s", "× first", "train/add/merge s",
                           "merged B/vector", "p50 ms", "× first", "p99 ms", "recall@10"], rows) + "\n"
    path = _common.ROOT / "bench" / "results" / "scale-vectors.md"
    old = path.read_text() if path.exists() else ""
    start, end = f"<!-- compare {n}x{d}{tag} -->", f"<!-- /compare {n}x{d}{tag} -->"
    if start in old and end in old:
        old = old[:old.index(start)] + old[old.index(end) + len(end):].lstrip("\n")
    path.write_text(old.rstrip("\n") + f"\n\n{start}\n{text}{end}\n")
    print(text)


# -- the report -------------------------------------------------------------------------------------------------
def report(_args) -> None:
    text = ""
    st = CACHE / "storage.json"
    if st.exists():
        s = json.loads(st.read_text())
        text += (f"## Where raw vectors live\n\n{s['n']:,} vectors of {s['dim']}-d, side by side in one run, "
                 f"{s['rounds']} interleaved rounds, best of each (load average {s['load'][0]:.1f} on 2 cores). "
                 "Write includes the commits / fsync and the checksum; stream = every vector read back in order "
                 "(a rebuild); gather = the 100 random candidates one query re-scores (median of 50); CRC-32 "
                 "check = verifying every shard file; scores = float16's error on cosine scores against float32 "
                 "and the top-10 overlap of exact search over 20 queries.\n\n")
        text += _common.table(["storage", "write vectors/s", "× SQLite", "stream vectors/s", "× SQLite",
                               "gather 100 ms", "bytes/vector", "CRC-32 check GB/s", "scores"], s["rows"]) + "\n\n"
    rows, notes = [], []
    runs = [p for p in CACHE.glob("*-*.json") if not p.stem.startswith("compare-")]  # compare writes its own section
    for f in sorted(runs, key=lambda p: (int(p.stem.split("-")[1]), int(p.stem.split("-")[0]), p.stem)):
        r = json.loads(f.read_text())
        n = r["n"]
        for sr in r["search"]:
            rows.append([f"{n:,}", r["dim"], r["factory"], sr["nprobe"],
                         f"exact, {10 * sr['rerank']}" if sr["rerank"] > 1 else "none (PQ only)",
                         round(r["build_s"]), f"{r['train_s']:.0f} / {r['add_s']:.0f} / {r['merge_s']:.0f}",
                         f"{max(r['rss_build']['self'], r['rss_search']['self']) / 1024:.2f}",
                         f"{r['rss_build']['workers'] / 1024:.2f}",
                         f"{r['disk']['vectors'] / n:.0f} + {r['disk']['merged'] / n:.1f}",
                         round(sr["p50_ms"], 2), round(sr["p99_ms"], 2), round(sr["recall"], 3)])
        notes.append(f"- {n:,} × {r['dim']}: {len(range(0, n, r['shard']))} shards of {r['shard']:,}, {r['workers']} worker "
                     f"processes × 1 thread; writing the float16 shards {r['write_s']:.0f} s (+ {r['generate_s']:.0f} s "
                     f"generating); exact brute force {r['exact_ms_per_query']:.0f} ms/query (batched, the ground truth); "
                     f"coarse k-means {r.get('ivf_niter', 25)} iterations; "
                     f"per-shard indexes {r['disk']['shard_indexes'] / n:.1f} B/vector more (kept for incremental "
                     f"merges); inverted lists memory-mapped: {r['mmapped']}; load average {r['load_start'][0]:.1f} → "
                     f"{r['load_end'][0]:.1f} on 2 cores shared with other jobs.")
    if rows:
        text += ("## Sharded IVF-PQ, searched memory-mapped\n\nSingle queries, k=10, 1 search thread, cosine; "
                 "re-score: how many IVF-PQ candidates are re-scored exactly from their float16 vectors, read "
                 "from the memory-mapped shard files. "
                 "Build = train + add (parallel) + merge on disk. Peak RSS: the benchmark process (vectors are "
                 "generated in 50 k chunks, never all in RAM) and the largest add worker (getrusage of the "
                 "children: it counts the parent's image copied at fork, so it is an upper bound). Disk: raw float16 vectors "
                 "(+ 8-byte ids) + merged index, bytes per vector.\n\n")
        text += _common.table(["N", "dim", "factory", "nprobe", "re-score", "build s", "train/add/merge s",
                               "peak RSS GB", "worker RSS GB", "disk B/vector", "p50 ms", "p99 ms", "recall@10"], rows)
        text += "\n\n" + "\n".join(notes) + "\n"
    import re

    old = _common.RESULTS / "scale-vectors.md"  # compare's sections (written by that command) are kept
    kept = re.findall(r"<!-- compare .*? -->.*?<!-- /compare .*? -->", old.read_text(), re.S) if old.exists() else []
    _common.save("scale-vectors", text + "".join(f"\n{k}\n" for k in kept))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("storage")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("run")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--dim", type=int, required=True, choices=[128, 1280])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--shard", type=int, default=0, help="vectors per shard (default: n/8, at least 50 k)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads for training")
    p.add_argument("--factory", default=None)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--rerank", type=int, nargs="+", default=[10, 50],
                   help="candidates re-scored exactly, as a multiple of k")
    p.add_argument("--tag", default="", help="a suffix for the results' name (several factories at one size)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--search-only", action="store_true", help="search a collection kept by --keep again")
    p = sub.add_parser("compare", help="several factories over the same vectors, side by side in one run")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--dim", type=int, required=True, choices=[128, 1280])
    p.add_argument("--factories", nargs="+", default=["IVF1024,PQ64", "PCAR256,IVF1024,PQ64"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16])
    p.add_argument("--rerank", type=int, nargs="+", default=[10, 50])
    p.add_argument("--tag", default="", help="a suffix for the results' name (another order, another run)")
    p.add_argument("--keep", action="store_true")
    sub.add_parser("report")
    args = ap.parse_args()
    {"storage": storage, "run": run, "compare": compare, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
