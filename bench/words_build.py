"""Building the visual-words file of a large collection: time and peak memory, this tree against another checkout.

    python bench/words_build.py --index INDEX --rows 100000 --against CHECKOUT [--repeat 1] [--threads 2]

INDEX: an instance index whose local features are cached (``retrieve index FOLDER --preset instance``; run with
the same ``XDG_CACHE_HOME``). The collection: ``--rows`` rows, row i showing the content of the index's row
i mod n (its cached features, linked under a hash of its own in a private cache), so that the descriptors are
real and the rows many. Each revision builds the file from nothing, as the end of a first ``retrieve index``
run does (``retrieval.match.words.sync`` by the index's writer: the vocabulary trained on the same seeded sample,
then every row quantised and inverted), in a fresh process, the two revisions alternating ``--repeat`` times:
wall seconds, CPU seconds, the process's peak RSS, the file's size. Then the two files are compared: the same
rows and vocabulary, and the share of postings (word, row, signature) they have in common.

Writes bench/results/words-build-<rows/1000>k.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, os.environ["TREE"])
from retrieval.index.store import IndexStore
from retrieval.match import words as W
from retrieval.match.verify import Verifier
with IndexStore.open(Path(os.environ["INDEX"])) as s:
    verifier = Verifier.for_index(s.settings)
rows = json.loads(Path(os.environ["ROWS"]).read_text())
rows = {int(i): (p, h) for i, p, h in rows}
store = SimpleNamespace(directory=Path(os.environ["OUT"]), writable=True,
                        row_paths=lambda: [(i, p, h) for i, (p, h) in rows.items()],
                        row_hashes=lambda: {i: h for i, (p, h) in rows.items()})
spent = {"train": 0.0}
def timed(train):
    def run(*a, **k):
        t0 = time.perf_counter()
        try:
            return train(*a, **k)
        finally:
            spent["train"] += time.perf_counter() - t0
    return run
W._train = timed(W._train)
t, c = time.perf_counter(), time.process_time()
wi = W.sync(store, verifier)
print(json.dumps({"wall": time.perf_counter() - t, "train": spent["train"], "cpu": time.process_time() - c,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bytes": (store.directory / W.WORDS_NAME).stat().st_size, "words": wi.vocab.size}))
"""


def collection(index: Path, n: int, work: Path) -> tuple[Path, Path]:
    """A private feature cache holding ``n`` rows' features (links to the index's rows' cached files) and the rows'
    (id, path, sha256) list; returns (XDG_CACHE_HOME, rows file)."""
    from retrieval.index.store import IndexStore
    from retrieval.match.verify import Verifier

    with IndexStore.open(index) as s:
        v = Verifier.for_index(s.settings)
        real = [(p, h) for _, p, h in s.row_paths() if v.cache_file(h).is_file()]
    if not real:
        raise SystemExit(f"{index}: no cached local features (index it with --preset instance, same XDG_CACHE_HOME)")
    xdg = work / "xdg"
    cache = xdg / v.cache.relative_to(v.cache.parents[2])  # …/retrieve/local/sift-…
    out = []
    for i in range(n):
        path, sha = real[i % len(real)]
        fake = f"{i:08x}" + sha[8:]
        f = cache / fake[:2] / f"{fake}.lf2"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            os.link(v.cache_file(sha), f)
        out.append((i + 1, f"/nowhere/{i}.jpg", fake))
    rows = work / "rows.json"
    rows.write_text(json.dumps(out))
    return xdg, rows


def run(tree: Path, index: Path, xdg: Path, rows: Path, out: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, TREE=str(tree), INDEX=str(index), ROWS=str(rows), OUT=str(out), XDG_CACHE_HOME=str(xdg),
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), RETRIEVE_THREADS=str(threads),
               PYTHONPATH=str(tree))
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, cwd=tree)
    if r.returncode:
        raise SystemExit(f"{tree}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """The two files' rows, vocabularies and postings side by side."""
    import numpy as np

    za, zb = np.load(a / "words.npz"), np.load(b / "words.npz")
    same_rows = bool(np.array_equal(za["ids"], zb["ids"]) and np.array_equal(za["shas"], zb["shas"]))
    same_vocab = bool(np.array_equal(za["top"], zb["top"]) and np.array_equal(za["sub"], zb["sub"]))

    def postings(z):
        ptr = z["post_ptr"]
        words = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
        return set(zip(words.tolist(), z["post_img"].tolist(), z["post_sig"].tolist()))

    pa, pb = postings(za), postings(zb)
    return {"same_rows": same_rows, "same_vocabulary": same_vocab, "postings": (len(pa), len(pb)),
            "in_common": len(pa & pb) / max(len(pa | pb), 1),
            "norm_max_rel": float(np.max(np.abs(za["row_norm"] - zb["row_norm"]) / np.maximum(za["row_norm"], 1e-6)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--against", type=Path, required=True, help="another checkout (the baseline)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--compare-postings", action="store_true", help="also compare the two files posting by posting")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="words-build."))
    xdg, rows = collection(a.index, a.rows, work)
    trees = {"now": _common.ROOT, "before": a.against.resolve()}
    got: dict[str, list[dict]] = {k: [] for k in trees}
    load0 = os.getloadavg()
    for rep in range(a.repeat):
        for name in (("before", "now") if rep % 2 == 0 else ("now", "before")):
            r = run(trees[name], a.index, xdg, rows, work / name, a.threads)
            print(name, json.dumps(r), flush=True)
            got[name].append(r)
    cmp = compare(work / "before", work / "now") if a.compare_postings else None
    rev = {k: subprocess.run(["git", "-C", str(t), "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True).stdout.strip() for k, t in trees.items()}
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "train", "cpu", "rss_mb", "bytes")}
           for k, v in got.items()}
    lines = [f"# Building words.npz from nothing: {a.rows:,} rows (issue 31)", "",
             f"`python bench/words_build.py --index {a.index.name} --rows {a.rows} --against {a.against} "
             f"--repeat {a.repeat} --threads {a.threads}`: the rows show the content of the {a.index.name}'s rows "
             f"in turn (their real cached SIFT features). Each revision in its own process, alternating; medians of "
             f"{a.repeat}. {a.threads} threads (BLAS, OpenMP). Load average {load0[0]:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end.", "",
             _common.table(["revision", "wall s", "of which training", "the rest (bags, inverted file, writing)",
                            "CPU s", "peak RSS MB", "words.npz MB"],
                           [[f"{k} ({rev[k]})", round(med[k]["wall"], 1), round(med[k]["train"], 1),
                             round(med[k]["wall"] - med[k]["train"], 1), round(med[k]["cpu"], 1),
                             round(med[k]["rss_mb"]), round(med[k]["bytes"] / 2**20, 1)] for k in ("before", "now")]),
             "", f"now / before: wall {med['now']['wall'] / med['before']['wall']:.2f}x (without the training "
             f"{(med['now']['wall'] - med['now']['train']) / (med['before']['wall'] - med['before']['train']):.2f}x), "
             f"peak RSS {med['now']['rss_mb'] / med['before']['rss_mb']:.2f}x."]
    if cmp is not None:
        lines += ["", f"The two files: same rows {cmp['same_rows']}, same vocabulary {cmp['same_vocabulary']}, "
                  f"postings {cmp['postings'][0]:,} / {cmp['postings'][1]:,}, {cmp['in_common']:.5f} of them in common "
                  f"(word, row, signature); rows' norms within {cmp['norm_max_rel']:.1e} (relative)."]
    _common.save(f"words-build-{a.rows // 1000}k", "\n".join(lines))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
