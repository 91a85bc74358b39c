"""What an unchanged `retrieve index` re-run no longer does at its end: μ over every embedding and the vector
file's rewrite, against the check that finds nothing changed (indexer/unchanged.py).

    python bench/unchanged_run.py [--rows 10000,50000] [--rounds 3]

For each size: an index of data/samples plus that many random unit vectors (as bench/startup_search.py
makes it), opened for writing as the indexer does; then, interleaved, median of N: ``update_mean`` +
``save_faiss`` (what every run did before) and ``indexer.unchanged.unchanged`` (what an unchanged run does
now). Saves bench/results/unchanged-run.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from startup_search import add_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,50000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from indexer.unchanged import record, unchanged
    from retrieval.index.store import IndexStore

    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    out, loads = [], []
    for n in [int(x) for x in args.rows.split(",")]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            idx = Path(tmp) / "idx"
            subprocess.run([sys.executable, "-m", "cli", "index", str(_common.ROOT / "data" / "samples"), "--index",
                            str(idx)], check=True, env=env, capture_output=True, cwd=_common.ROOT)
            add_rows(idx, n)
            full, check = [], []
            with IndexStore.open(idx, writable=True) as store:
                store.faiss_index()
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    store.update_mean()
                    store.save_faiss()
                    full.append(time.perf_counter() - t)
                    record(store)
                    t = time.perf_counter()
                    assert unchanged(store)
                    check.append(time.perf_counter() - t)
                    loads.append(os.getloadavg()[0])
                rows = store.count()
            size = (idx / "vectors.faiss").stat().st_size
        f, c = statistics.median(full), statistics.median(check)
        out.append([f"{rows:,}", f"{size / 2**20:,.0f}", f"{f * 1000:,.0f}", f"{c * 1000:,.1f}", f"{f / c:,.0f}x"])
    text = (f"The end of an unchanged `retrieve index` re-run, before (μ over every embedding + the vector file "
            f"rewritten, atomically) vs now (indexer/unchanged.py finds nothing changed and leaves both), on flat "
            f"indexes of 1280-d vectors, interleaved, median of {args.rounds}, {os.cpu_count()} cores, 1-min load "
            f"average {min(loads):.1f}-{max(loads):.1f} (shared machine). Both grow with the rows; the check "
            f"hashes the ids only.\n\n"
            + _common.table(["rows", "vector file MiB", "before: μ + rewrite ms", "now: the check ms", "saved"], out)
            + f"\n\nReproduce: `python bench/unchanged_run.py --rows {args.rows} --rounds {args.rounds}`")
    _common.save("unchanged-run", text)


if __name__ == "__main__":
    main()
