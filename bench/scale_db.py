"""Index metadata at scale: PostgreSQL (``--db``) vs SQLite, side by side in one run.

    python bench/scale_db.py [--rows 1000000] [--insert-rows 20000] [--dim 1280] [--db URL] [--json]

For each database, on synthetic rows shaped like the indexer's (path, size, mtime_ns, sha256, width,
height, a raw float32 embedding of ``--dim`` values):

1. **insert rows/s** the way ``retrieve index`` commits (indexer/run.py: ORM rows, one transaction per batch
   of 32, each deleting the path's skipped record) on ``--insert-rows`` rows with full-size embeddings, and
   in bulk (SQLAlchemy insertmanyvalues, 10 000 rows per transaction) while filling ``--rows`` rows;
2. **the unchanged-file re-scan** of ``--rows`` rows: what an incremental run does before any file is read —
   the indexer's query of every row's (id, path, size, mtime_ns, sha256) and of the skipped files, then
   ``indexer.plan.plan_changes`` against ``--rows`` scanned entries that all match (target: ≤ 60 s at 1 M).
   The file-system walk itself (``os.scandir``/``stat`` of 1 M files) is not part of it.

The ``--rows`` table is filled with small embeddings (``--fill-dim``, 8 values) to keep a 1 M-row run's disk
and time in bounds: the re-scan reads only the metadata columns (PostgreSQL keeps embeddings over 2 KB
out of line, in TOAST; SQLite's rows are read for their leading columns). ``--fill-dim 1280`` measures the
full size. PostgreSQL: ``--db URL`` (an empty database), else a throw-away cluster started from Debian's
binaries with the server's default durability (fsync on); SQLite: the file an index uses, WAL,
synchronous=NORMAL, as retrieve opens it. Saves bench/results/scale-db.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
from sqlalchemy import create_engine, delete, event, func, insert, select

sys.path.insert(0, str(_common.ROOT / "tests"))

from indexer.plan import plan_changes  # noqa: E402
from retrieval.index.schema import Base, ImageRow, SkippedRow  # noqa: E402
from retrieval.scan import FileEntry  # noqa: E402
from retrieval.index.store import _sqlite_pragmas  # noqa: E402


def _say(msg: str) -> None:
    if sys.stderr.isatty():
        print(msg, file=sys.stderr, flush=True)


def _row(i: int, vec: bytes) -> dict:
    return {"path": f"/photos/{i // 1000:04d}/{i:08d}.jpg", "size": 200_000 + i % 9973,
            "mtime_ns": 1_700_000_000_000_000_000 + i * 1_000_003, "sha256": f"{i:064x}", "width": 640,
            "height": 480, "vector": vec, "indexed_at": 1.7e9}


def _engine(url: str):
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn))
    return engine


def insert_like_indexer(engine, n: int, dim: int, start: int) -> float:
    """Rows/s committing as indexer/run.py's _commit_embedded did before it went bulk: batches of 32, an ORM row
    and a DELETE of the path's skipped record per image, one transaction per batch."""
    from sqlalchemy.orm import Session

    vec = np.random.default_rng(0).standard_normal(dim).astype(np.float32).tobytes()
    t = time.perf_counter()
    for b in range(start, start + n, 32):
        with Session(engine) as s, s.begin():
            rows = []
            for i in range(b, min(b + 32, start + n)):
                r = _row(i, vec)
                s.execute(delete(SkippedRow).where(SkippedRow.path == r["path"]))
                row = ImageRow(**r)
                s.add(row)
                rows.append(row)
            s.flush()
            [r.id for r in rows]
    return n / (time.perf_counter() - t)


class _Store:
    """What the indexer's commit_embedded asks of an IndexStore, over a bare engine: IndexStore's own insert_rows
    (the code measured), and apply (the vector file: a no-op here)."""

    writable = True

    def __init__(self, engine):
        self.engine = engine
        self.server = engine.dialect.name != "sqlite"

    def _begin(self):
        return self.engine.begin()

    def insert_rows(self, values, replace=()):
        from retrieval.index.store import IndexStore

        return IndexStore.insert_rows(self, values, replace)

    def _new_ids(self, c, n):
        from retrieval.index.store import IndexStore

        return IndexStore._new_ids(self, c, n)

    def apply(self, *_):
        pass


def insert_through_indexer(engine, n: int, dim: int, start: int, per_commit: int = 32) -> float:
    """Rows/s committing through the indexer's own commit_embedded (indexer/rows.py), ``per_commit`` rows a
    transaction (32: a batch; 4096: the largest group the Ray driver commits, indexer/rows.py Commits)."""
    from indexer.common import IndexReport
    from indexer.rows import Decoded as _Decoded
    from indexer.rows import commit_embedded as _commit_embedded

    store = _Store(engine)
    vec = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    report = IndexReport()
    t = time.perf_counter()
    for b in range(start, start + n, per_commit):
        batch = []
        for i in range(b, min(b + per_commit, start + n)):
            r = _row(i, b"")
            batch.append(_Decoded(FileEntry(r["path"], r["size"], r["mtime_ns"]), r["sha256"], r["width"], r["height"]))
        _commit_embedded(store, batch, np.broadcast_to(vec, (len(batch), dim)), {}, report)
    assert report.indexed == n
    return n / (time.perf_counter() - t)


def fill_bulk(engine, n: int, dim: int, start: int) -> float:
    """Rows/s inserting in bulk (10 000 rows per transaction, insertmanyvalues); the embedding is random, as the
    others' (zeros would compress to nothing in PostgreSQL's TOAST and flatter it)."""
    vec = np.random.default_rng(1).standard_normal(dim).astype(np.float32).tobytes()
    t = time.perf_counter()
    done = 0
    for b in range(start, start + n, 10_000):
        with engine.begin() as c:
            c.execute(insert(ImageRow), [_row(i, vec) for i in range(b, min(b + 10_000, start + n))])
        done = min(b + 10_000, start + n) - start
        _say(f"  filled {done:,}/{n:,}")
    return n / (time.perf_counter() - t)


def rescan(engine, n_total: int) -> dict:
    """What an incremental run does for unchanged files before reading any: the query, then the plan."""
    from sqlalchemy.orm import Session

    files = [FileEntry(r["path"], r["size"], r["mtime_ns"]) for r in (_row(i, b"") for i in range(n_total))]
    c0, t0 = time.process_time(), time.perf_counter()
    with Session(engine) as s:
        rows = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                ImageRow.sha256)).all()
        bad = {r.path: r for r in s.execute(select(SkippedRow)).scalars()}
    t1, c1 = time.perf_counter(), time.process_time()
    plan = plan_changes(files, rows, bad, ["/photos"])
    t2, c2 = time.perf_counter(), time.process_time()
    assert len(plan.unchanged) == n_total and not plan.todo and not plan.removed(), "the plan found changes"
    return {"query_s": t1 - t0, "plan_s": t2 - t1, "total_s": t2 - t0, "client_cpu_s": c2 - c0,
            "query_cpu_s": c1 - c0, "plan_cpu_s": c2 - c1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows for the re-scan")
    ap.add_argument("--insert-rows", type=int, default=20_000, help="rows inserted the indexer's way")
    ap.add_argument("--dim", type=int, default=1280, help="embedding size of the indexer-way inserts")
    ap.add_argument("--fill-dim", type=int, default=8, help="embedding size of the bulk-filled rows")
    ap.add_argument("--db", default=None, help="an empty PostgreSQL database (else a throw-away cluster)")
    ap.add_argument("--only", choices=["sqlite", "postgresql"], default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--commits-only", action="store_true",
                    help="only the indexer's commit rate, before vs now (and bulk): a section of scale-db.md")
    args = ap.parse_args()
    if args.commits_only:
        return commits_only(args)

    cluster = None
    pg_url = args.db
    if pg_url is None and args.only != "sqlite":
        from pgserver import Cluster

        cluster = Cluster(durable=True)
        pg_url = cluster.start()
        _say(f"PostgreSQL cluster at {pg_url}")
    results = []
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            dbs = [("sqlite", f"sqlite:///{Path(tmp) / 'index.db'}"), ("postgresql", pg_url)]
            for name, url in dbs:
                if args.only and name != args.only:
                    continue
                engine = _engine(url)
                Base.metadata.drop_all(engine)
                Base.metadata.create_all(engine)
                _say(f"{name}: inserting {args.insert_rows:,} rows the indexer's way")
                ins = insert_like_indexer(engine, args.insert_rows, args.dim, 0)
                with engine.begin() as c:
                    c.execute(delete(ImageRow))
                _say(f"{name}: filling {args.rows:,} rows")
                bulk = fill_bulk(engine, args.rows, args.fill_dim, 0)
                if engine.dialect.name == "postgresql":
                    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                        c.exec_driver_sql("VACUUM ANALYZE images")
                with engine.connect() as c:
                    assert c.execute(select(func.count()).select_from(ImageRow)).scalar() == args.rows
                runs = [rescan(engine, args.rows) for _ in range(2)]
                best = min(runs, key=lambda r: r["total_s"])
                results.append({"database": name, "insert_rows_s_indexer": ins, "insert_rows_s_bulk": bulk,
                                "rows": args.rows, **{k: round(v, 2) for k, v in best.items()},
                                "rescan_runs_s": [round(r["total_s"], 2) for r in runs]})
                Base.metadata.drop_all(engine)
                engine.dispose()
    finally:
        if cluster is not None:
            cluster.stop()
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"results": results, "loadavg": load, "args": vars(args)}))
        return
    by = {r["database"]: r for r in results}
    rows = [[r["database"], f"{r['insert_rows_s_indexer']:,.0f}", f"{r['insert_rows_s_bulk']:,.0f}", f"{r['rows']:,}",
             f"{r['query_s']:.1f}", f"{r['plan_s']:.1f}", f"{r['total_s']:.1f}",
             f"{r['client_cpu_s']:.1f} ({r['query_cpu_s']:.1f} + {r['plan_cpu_s']:.1f})", " / ".join(f"{x:.1f}" for x in r["rescan_runs_s"])] for r in results]
    text = (f"Index metadata at scale, PostgreSQL 15 (throw-away cluster, default durability) vs SQLite (WAL, "
            f"synchronous=NORMAL), one run, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
            f"{os.cpu_count()} cores (shared machine: absolute times are inflated, compare the ratios). One client "
            "thread.\n\n"
            + _common.table(["database", f"insert rows/s, indexer's way ({args.dim}-d, 32/commit)",
                             f"insert rows/s, bulk ({args.fill_dim}-d, 10k/commit)", "rows re-scanned",
                             "query s", "plan s", "re-scan s (best of 2)", "its client CPU s (query + plan)", "runs s"], rows)
            + "\n\nRe-scan: every row's (id, path, size, mtime_ns, sha256) and the skipped files read through "
            "SQLAlchemy, then indexer.plan.plan_changes against as many scanned entries, all unchanged (what "
            "`retrieve index` does before it reads any file); client CPU: this process's CPU time during it (the server's "
            "is not counted), a truer figure than wall time on a loaded machine. Target: ≤ 60 s at 1 M rows on either database.")
    if "sqlite" in by and "postgresql" in by:
        s, p = by["sqlite"], by["postgresql"]
        text += (f"\n\nRatios PostgreSQL / SQLite: inserts the indexer's way {p['insert_rows_s_indexer'] / s['insert_rows_s_indexer']:.2f}x, "
                 f"bulk {p['insert_rows_s_bulk'] / s['insert_rows_s_bulk']:.2f}x, re-scan time "
                 f"{p['total_s'] / s['total_s']:.2f}x.")
    text += f"\n\nReproduce: `python bench/scale_db.py --rows {args.rows} --insert-rows {args.insert_rows}`"
    _common.save("scale-db", text)


def commits_only(args) -> None:
    """The indexer's commits the first way (ORM row by row) and now (_commit_embedded, bulk: 32 rows a commit, and
    4096 as the Ray driver groups them), and a 10 000-row SQLAlchemy bulk insert, interleaved in rounds on both
    databases; replaces the "Commit rate" section of scale-db.md."""
    from indexer.rows import GROUP_MAX_ROWS
    import statistics

    cluster = None
    pg_url = args.db
    if pg_url is None and args.only != "sqlite":
        from pgserver import Cluster

        cluster = Cluster(durable=True)
        pg_url = cluster.start()
    out = []
    loads = []
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            for name, url in [("sqlite", f"sqlite:///{Path(tmp) / 'index.db'}"), ("postgresql", pg_url)]:
                if args.only and name != args.only:
                    continue
                engine = _engine(url)
                Base.metadata.drop_all(engine)
                Base.metadata.create_all(engine)
                got = {"before": [], "now": [], "grouped": [], "bulk": []}
                start = 0
                for _ in range(3):
                    for key, fn, dim in (("before", insert_like_indexer, args.dim),
                                         ("now", insert_through_indexer, args.dim),
                                         ("grouped", lambda *a: insert_through_indexer(*a, per_commit=GROUP_MAX_ROWS),
                                          args.dim),
                                         ("bulk", fill_bulk, args.dim)):
                        got[key].append(fn(engine, args.insert_rows, dim, start))
                        start += args.insert_rows
                    loads.append(os.getloadavg()[0])
                _say(f"{name}: {got}")
                med = {k: statistics.median(v) for k, v in got.items()}
                out.append([name, f"{med['before']:,.0f}", f"{med['now']:,.0f}", f"{med['now'] / med['before']:.1f}x",
                            f"{med['grouped']:,.0f}", f"{med['bulk']:,.0f}", f"{med['grouped'] / med['bulk']:.2f}"])
                Base.metadata.drop_all(engine)
                engine.dispose()
    finally:
        if cluster is not None:
            cluster.stop()
    section = (f"## Commit rate of the indexer\n\nRows/s committed by `retrieve index`'s `commit_embedded` "
               f"(indexer/rows.py: both engines commit through it), {args.dim}-d float32 embeddings: the first way "
               f"(an ORM row and a DELETE of the path's skipped record per image, 32 rows a transaction) vs now (one "
               f"DELETE per transaction for each, the ids allocated in one statement, the rows in one binary COPY on "
               f"PostgreSQL or one executemany on SQLite), 32 rows a transaction (a batch) and {GROUP_MAX_ROWS:,} (the "
               f"largest group the Ray driver commits when rows come fast), beside SQLAlchemy's bulk insert of the "
               f"same rows (insertmanyvalues, 10 000 per transaction). The FAISS mirror is not part of it. "
               f"{args.insert_rows:,} rows each, interleaved, median of 3 rounds, one client "
               f"thread, {os.cpu_count()} cores, 1-min load average {min(loads):.1f}-{max(loads):.1f}; PostgreSQL 15 "
               f"in a throw-away cluster with the server's default durability (fsync on), SQLite WAL with "
               f"synchronous=NORMAL as retrieve opens it.\n\n"
               + _common.table(["database", "first way rows/s (32/commit)", "now rows/s (32/commit)", "now / first",
                                f"now rows/s ({GROUP_MAX_ROWS}/commit)", "SQLAlchemy bulk rows/s (10k/commit)",
                                f"now ({GROUP_MAX_ROWS}) / SQLAlchemy bulk"], out)
               + f"\n\nReproduce: `python bench/scale_db.py --commits-only --insert-rows {args.insert_rows}`\n")
    path = _common.RESULTS / "scale-db.md"
    text = path.read_text() if path.exists() else ""
    head = text.split("## Commit rate of the indexer")[0].rstrip()
    path.write_text((head + "\n\n" if head else "") + section)
    print(section)


if __name__ == "__main__":
    main()
