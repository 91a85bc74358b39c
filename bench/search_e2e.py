"""End-to-end `retrieve search` of phone photos: this tree against another revision, each through its own CLI.

    python bench/search_e2e.py --index INDEX --before REV [--rounds 2] [--now-args ARGS] [--before-args ARGS]

INDEX: an instance index of bench/instance_set.py's set (`retrieve index bench/.cache/instance --preset instance`,
the catalogue's images recorded with `--catalogue`; or bench/quality.py's). The queries: each object's first phone
photo (``view1``) re-encoded at JPEG quality 90 into bench/.cache/e2e-queries (new bytes, so each query's SIFT is
extracted, as for a new photo; the photo itself is in the index and is found). Each tree searches its own copy of
INDEX, the trees alternating, ``--rounds`` rounds of one photo, then all of them; seconds of wall time and of CPU
(user + sys of the search process and its threads: its own work, whatever else shares the machine). The last round's
answers are compared: the same top-1 result and inliers, photos of the query's object in the top 10, and whether
the first catalogue image (``ref``) in the results is the object's. Writes bench/results/search-e2e.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

QUERIES = _common.ROOT / "bench" / ".cache" / "e2e-queries"


def make_queries(index: Path) -> list[Path]:
    """Each object's ``view1`` photo in ``index``, re-encoded (JPEG quality 90) under QUERIES as ``<object>.jpg``."""
    from PIL import Image

    from retrieval.index.store import IndexStore

    with IndexStore.open(index) as store:
        views = sorted(Path(p) for _, p, _ in store.row_paths() if Path(p).stem == "view1")
    if not views:
        raise SystemExit(f"{index}: no view1 photos (an index of bench/instance_set.py's set is needed)")
    QUERIES.mkdir(parents=True, exist_ok=True)
    out = []
    for v in views:
        q = QUERIES / f"{v.parent.name}.jpg"
        if not q.exists():
            Image.open(v).convert("RGB").save(q, quality=90)
        out.append(q)
    return out


def search(root: Path, index: Path, queries, args: list[str]) -> tuple[float, float, list[dict]]:
    """``retrieve search QUERIES --index INDEX --json ARGS`` by the CLI of the tree at ``root``: wall seconds, CPU
    seconds, the answers."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(root / "cli.py"), "search", *map(str, queries), "--index", str(index),
                        "--json", *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"retrieve search ({root}): {p.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, [json.loads(line) for line in p.stdout.splitlines()]


def agreement(a: list[dict], b: list[dict]) -> dict:
    """The last round's answers of the two trees side by side."""
    def label(r):
        return Path(r["query"]).stem.lower()

    def relevant(r):
        return sum(Path(h["path"]).parent.name.lower() == label(r) for h in r["results"])

    def catalogue_right(r):
        return next((Path(h["path"]).parent.name.lower() == label(r) for h in r["results"]
                     if Path(h["path"]).stem == "ref"), False)

    top = sum(x["results"][:1] and y["results"][:1] and x["results"][0]["path"] == y["results"][0]["path"]
              and x["results"][0].get("inliers") == y["results"][0].get("inliers") for x, y in zip(a, b))
    return {"top": top, "relevant": (sum(map(relevant, a)), sum(map(relevant, b))),
            "catalogue": (sum(map(catalogue_right, a)), sum(map(catalogue_right, b)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--before", required=True, metavar="REV", help="the other git revision (its own CLI)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--now-args", default="", help="search options of this tree's runs (default: the index's)")
    ap.add_argument("--before-args", default="", help="search options of REV's runs (default: the index's)")
    args = ap.parse_args()
    queries = make_queries(args.index)
    load0 = os.getloadavg()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="retrieve-e2e-") as tmp, \
            _common.worktree(args.before, Path(tmp) / "before") as before_root:
        trees = [(f"before ({args.before})", before_root, shlex.split(args.before_args)),
                 ("now", _common.ROOT, shlex.split(args.now_args))]
        for name, root, extra in trees:
            copy = Path(tmp) / f"idx-{name.split()[0]}"
            shutil.copytree(args.index, copy)
            search(root, copy, queries[:1], extra)  # a words file of another format is rebuilt here, not timed
            runs[name] = {"root": root, "extra": extra, "index": copy, "one": [], "all": [], "cpu": [], "cpu1": []}
        for _ in range(args.rounds):
            for name, r in runs.items():
                wall, cpu, _ = search(r["root"], r["index"], queries[:1], r["extra"])
                r["one"].append(wall)
                r["cpu1"].append(cpu)
                print(f"{name}: 1 photo {wall:.2f} s", flush=True)
            for name, r in runs.items():
                wall, cpu, answers = search(r["root"], r["index"], queries, r["extra"])
                r["all"].append(wall)
                r["cpu"].append(cpu)
                r["answers"] = answers
                print(f"{name}: {len(queries)} photos {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    n = len(queries)
    rows = []
    for name, r in runs.items():
        rows.append([name, " ".join(r["extra"]) or "(the index's)", n,
                     " / ".join(f"{w:.1f}" for w in r["all"]), " / ".join(f"{c:.1f}" for c in r["cpu"]),
                     f"{min(r['all']) / n:.3f}–{max(r['all']) / n:.3f}", f"{min(r['cpu']) / n:.3f}–{max(r['cpu']) / n:.3f}",
                     " / ".join(f"{w:.2f}" for w in r["one"])])
    (a, b) = [r["answers"] for r in runs.values()]
    ag = agreement(a, b)
    text = (f"`python bench/search_e2e.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}`: `retrieve search` of {n} "
            f"phone photos (each object's view1 re-encoded) against {args.index.name}, each tree on its own copy, "
            f"alternating, {args.rounds} rounds; {os.cpu_count()} cores, load average {load[:3]} → {load[3:]}. "
            "CPU: user + sys seconds of the search process (start-up included).\n\n")
    text += _common.table(["tree", "search options", "queries", "wall s (each round)", "CPU s (each round)",
                           "wall s/query", "CPU s/query", "one photo wall s"], rows)
    text += (f"\n\nLast round: the same top-1 result and inliers for {ag['top']} of {n}; photos of the query's object "
             f"in the top 10: {ag['relevant'][0]} before, {ag['relevant'][1]} now; the first catalogue image is the "
             f"object's for {ag['catalogue'][0]} before, {ag['catalogue'][1]} now.")
    _common.save("search-e2e", text)


if __name__ == "__main__":
    main()
