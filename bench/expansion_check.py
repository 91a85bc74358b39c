"""Verified query expansion on faces and categories: `--preset instance` through the CLI, `--expand 0` vs the default.

    python bench/expansion_check.py [--datasets att_faces caltech101]

For each dataset (../shared/data): `retrieve index DATASET --preset instance` into a temporary index, then
`retrieve search DATASET -k 10 --json` (every image a query, itself excluded) without expansion and with the
default (retrieval.search EXPAND), R@1 and mAP@10 (its other images of the same folder relevant). Issue 15 asks
that faces and Caltech be no worse. Writes bench/results/expansion-check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common


def _run(*args: str) -> str:
    p = subprocess.run([sys.executable, str(_common.ROOT / "cli.py"), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(_common.ROOT)})
    if p.returncode:
        raise SystemExit(f"retrieve {' '.join(args[:2])}: {p.stderr.strip()[-500:]}")
    return p.stdout


def _scores(out: str) -> tuple[int, float, float]:
    r1, aps = [], []
    for line in out.splitlines():
        r = json.loads(line)
        label = Path(r["query"]).parent.name
        rel = [Path(h["path"]).parent.name == label for h in r["results"]]
        if not rel:
            continue
        n_rel = sum(1 for p in Path(r["query"]).parent.iterdir() if p.suffix.lower() in (".jpg", ".pgm", ".png")) - 1
        hits, s = 0, 0.0
        for i, x in enumerate(rel[:10]):
            if x:
                hits += 1
                s += hits / (i + 1)
        r1.append(rel[0])
        aps.append(s / max(1, min(n_rel, 10)))
    return len(r1), sum(r1) / len(r1), sum(aps) / len(aps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["att_faces", "caltech101"])
    args = ap.parse_args()
    rows = []
    load0 = os.getloadavg()
    for name in args.datasets:
        src = _common.shared_dataset(name)
        if src is None:
            continue
        with tempfile.TemporaryDirectory(prefix="retrieve-expansion-") as tmp:
            idx = Path(tmp) / "idx"
            _run("index", str(src), "--preset", "instance", "--index", str(idx))
            for label, extra in (("off (--expand 0)", ["--expand", "0"]), ("default", [])):
                t = time.perf_counter()
                out = _run("search", str(src), "--index", str(idx), "-k", "10", "--json", *extra)
                n, r1, m = _scores(out)
                rows.append([name, label, n, round(r1, 3), round(m, 3), round(time.perf_counter() - t, 1)])
                print(rows[-1], flush=True)
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    text = (f"`python bench/expansion_check.py`: each dataset indexed with `--preset instance`, every image queried "
            f"(`retrieve search DATASET -k 10 --json`, the query itself excluded), verified query expansion off and "
            f"at its default; seconds for all the queries, start-up included. Load average {load[:3]} → "
            f"{load[3:]}.\n\n")
    text += _common.table(["dataset", "expansion", "queries", "R@1", "mAP@10", "s"], rows)
    _common.save("expansion-check", text)


if __name__ == "__main__":
    main()
