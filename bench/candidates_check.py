"""Faces and categories under `--preset instance`: this tree's search defaults against another revision's, and
other verification budgets, through the CLI.

    python bench/candidates_check.py [--datasets att_faces caltech101] [--before REV] [--variant LABEL ARGS ...]

For each dataset (../shared/data): `retrieve index DATASET --preset instance` into a temporary index (with
``--before``: also by REV's own CLI, checked out in a temporary git worktree, into its own index), then
`retrieve search DATASET -k 10 --json` (every image a query, itself excluded) with each tree's defaults and with
each ``--variant`` (its label, then search options as one string, run by this tree): R@1 and mAP@10 (the other
images of the query's folder relevant), seconds for all the queries, start-up included. Issue 15 asks that faces
and Caltech be no worse than before. Writes bench/results/candidates-check.md. (It replaces bench/expansion_check.py,
whose run is kept in bench/results/expansion-check.md: that one is ``--variant 'expansion 10' '--expand 10'``.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common


def _run(root: Path, *args: str) -> str:
    p = subprocess.run([sys.executable, str(root / "cli.py"), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
    if p.returncode:
        raise SystemExit(f"retrieve {' '.join(args[:2])} ({root}): {p.stderr.strip()[-500:]}")
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
    ap.add_argument("--before", metavar="REV", help="also the defaults of this git revision (its own CLI and index)")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("LABEL", "ARGS"),
                    help="search options run by this tree, e.g. --variant 'K 60, W 30' '--verify 60 --words 30'")
    args = ap.parse_args()
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="retrieve-candidates-") as tmp, contextlib.ExitStack() as stack:
        trees = [("now", _common.ROOT)]
        if args.before:
            trees.insert(0, (f"before ({args.before})", stack.enter_context(
                _common.worktree(args.before, Path(tmp) / "before"))))
        for name in args.datasets:
            src = _common.shared_dataset(name)
            if src is None:
                continue
            for label, root in trees:
                idx = Path(tmp) / f"{name}-{label.split()[0]}"
                _run(root, "index", str(src), "--preset", "instance", "--index", str(idx))
                runs = [(f"{label}: defaults", [])]
                if root == _common.ROOT:
                    runs += [(f"{label}: {v}", shlex.split(a)) for v, a in args.variant]
                for run_label, extra in runs:
                    t = time.perf_counter()
                    out = _run(root, "search", str(src), "--index", str(idx), "-k", "10", "--json", *extra)
                    n, r1, m = _scores(out)
                    rows.append([name, run_label, n, round(r1, 3), round(m, 3), round(time.perf_counter() - t, 1)])
                    print(" | ".join(map(str, rows[-1])), flush=True)
    if not rows:  # no dataset found (each said so in one line): nothing to save
        return
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    text = (f"`python bench/candidates_check.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`: each dataset "
            f"indexed with `--preset instance` (by each tree), every image queried (`retrieve search DATASET -k 10 "
            f"--json`, the query itself excluded); seconds for all the queries, start-up included. Load average "
            f"{load[:3]} → {load[3:]}.\n\n")
    text += _common.table(["dataset", "search", "queries", "R@1", "mAP@10", "s"], rows)
    _common.save("candidates-check", text)


if __name__ == "__main__":
    main()
