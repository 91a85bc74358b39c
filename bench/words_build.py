"""Building the visual-words file of a large collection: time and peak memory, this tree against another checkout.

    python bench/words_build.py --index INDEX --rows 100000 --against CHECKOUT [--add 1000] [--repeat 1] [--threads 2]

INDEX: an instance index whose local features are cached (``retrieve index FOLDER --preset instance``; run with
the same ``XDG_CACHE_HOME``). The collection: ``--rows`` rows, row i showing the content of the index's row
i mod n (its cached features, linked under a hash of its own in a private cache), so that the descriptors are
real and the rows many. Each revision builds the file from nothing, as the end of a first ``retrieve index``
run does (``retrieval.match.words.sync`` by the index's writer: the vocabulary trained on the same seeded sample,
then every row quantised and inverted), in a fresh process, the two revisions alternating ``--repeat`` times:
wall seconds, CPU seconds, the process's peak RSS, the file's size. Then the two files are compared: the same
rows and vocabulary, and the share of postings (word, row, signature) they have in common. ``--add N``: then each
revision adds N rows to a copy of the same file (the one this tree built), as a later index run that adds photos
does.

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


def collection(index: Path, n: int, work: Path, add: int = 0) -> tuple[Path, Path, Path]:
    """A private feature cache holding ``n`` + ``add`` rows' features (links to the index's rows' cached files) and
    the rows' (id, path, sha256) lists, the first ``n`` and all; returns (XDG_CACHE_HOME, rows file, all rows file)."""
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
    for i in range(n + add):
        path, sha = real[i % len(real)]
        fake = f"{i:08x}" + sha[8:]
        f = cache / fake[:2] / f"{fake}.lf2"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            os.link(v.cache_file(sha), f)
        out.append((i + 1, f"/nowhere/{i}.jpg", fake))
    rows, every = work / "rows.json", work / "rows-all.json"
    rows.write_text(json.dumps(out[:n]))
    every.write_text(json.dumps(out))
    return xdg, rows, every


def run(tree: Path, index: Path, xdg: Path, rows: Path, out: Path, threads: int, start: Path | None = None) -> dict:
    """One revision's sync in a fresh process, into ``out`` (emptied; ``start``: a words file copied there first)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("words.npz", "words.json") if start is not None else ():
        shutil.copy2(start / name, out / name)
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
    ap.add_argument("--add", type=int, default=0, help="then add this many rows to the file (each revision updating "
                    "a copy of the same file, as an index run that adds photos does)")
    ap.add_argument("--add-only", action="store_true", help="with --add and --work: only the adding, to the file "
                    "an earlier run left in WORK/now (a results file of its own, words-build-<N/1000>k-add.md)")
    a = ap.parse_args()
    if a.add_only and not (a.add and a.work and (a.work / "now" / "words.npz").is_file()):
        raise SystemExit("--add-only needs --add N and a --work folder with an earlier run's now/words.npz")
    work = a.work or Path(tempfile.mkdtemp(prefix="words-build."))
    xdg, rows, every = collection(a.index, a.rows, work, a.add)
    trees = {"now": _common.ROOT, "before": a.against.resolve()}
    got: dict[str, list[dict]] = {k: [] for k in trees}
    load0 = os.getloadavg()
    for rep in range(0 if a.add_only else a.repeat):
        for name in (("before", "now") if rep % 2 == 0 else ("now", "before")):
            r = run(trees[name], a.index, xdg, rows, work / name, a.threads)
            print(name, json.dumps(r), flush=True)
            got[name].append(r)
    added: dict[str, list[dict]] = {k: [] for k in trees}
    for rep in range(a.repeat if a.add else 0):
        for name in (("before", "now") if rep % 2 == 0 else ("now", "before")):
            r = run(trees[name], a.index, xdg, every, work / f"add-{name}", a.threads, start=work / "now")
            print("add", name, json.dumps(r), flush=True)
            added[name].append(r)
    cmp = None if not a.compare_postings else compare(work / "add-before", work / "add-now") if a.add_only else \
        compare(work / "before", work / "now")
    rev = {k: subprocess.run(["git", "-C", str(t), "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True).stdout.strip() for k, t in trees.items()}
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "train", "cpu", "rss_mb", "bytes")}
           for k, v in got.items() if v}
    command = (f"`python bench/words_build.py --index {a.index.name} --rows {a.rows} --against {a.against} "
               f"{f'--add {a.add} ' if a.add else ''}{'--add-only ' if a.add_only else ''}--repeat {a.repeat} "
               f"--threads {a.threads}`")
    setting = (f"the rows show the content of {a.index.name}'s rows in turn (their real cached SIFT features). Each "
               f"revision in its own process, alternating; medians of {a.repeat}. {a.threads} threads (BLAS, OpenMP). "
               f"Load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    title = f"Adding to words.npz: {a.rows:,} + {a.add:,} rows" if a.add_only else \
        f"Building words.npz from nothing: {a.rows:,} rows"
    lines = [f"# {title} (issue 31)", "", f"{command}: {setting}"] if a.add_only else [
             f"# {title} (issue 31)", "", f"{command}: {setting}", "",
             _common.table(["revision", "wall s", "of which training", "the rest (bags, inverted file, writing)",
                            "CPU s", "peak RSS MB", "words.npz MB"],
                           [[f"{k} ({rev[k]})", round(med[k]["wall"], 1), round(med[k]["train"], 1),
                             round(med[k]["wall"] - med[k]["train"], 1), round(med[k]["cpu"], 1),
                             round(med[k]["rss_mb"]), round(med[k]["bytes"] / 2**20, 1)] for k in ("before", "now")]),
             "", f"now / before: wall {med['now']['wall'] / med['before']['wall']:.2f}x (without the training "
             f"{(med['now']['wall'] - med['now']['train']) / (med['before']['wall'] - med['before']['train']):.2f}x), "
             f"peak RSS {med['now']['rss_mb'] / med['before']['rss_mb']:.2f}x."]
    if a.add:
        ad = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "rss_mb", "bytes")}
              for k, v in added.items()}
        lines += ["", f"## Adding {a.add:,} rows to the {a.rows:,}-row file", "",
                  f"Each revision updates a copy of the same file (the one `now` built) to {a.rows + a.add:,} rows, "
                  "as the end of an index run that adds photos does (the vocabulary kept).", "",
                  _common.table(["revision", "wall s", "CPU s", "peak RSS MB", "words.npz MB"],
                                [[f"{k} ({rev[k]})", round(ad[k]["wall"], 1), round(ad[k]["cpu"], 1),
                                  round(ad[k]["rss_mb"]), round(ad[k]["bytes"] / 2**20, 1)] for k in ("before", "now")]),
                  "", f"now / before: wall {ad['now']['wall'] / ad['before']['wall']:.2f}x, "
                  f"peak RSS {ad['now']['rss_mb'] / ad['before']['rss_mb']:.2f}x."]
    if cmp is not None:
        lines += ["", f"The two files: same rows {cmp['same_rows']}, same vocabulary {cmp['same_vocabulary']}, "
                  f"postings {cmp['postings'][0]:,} / {cmp['postings'][1]:,}, {cmp['in_common']:.5f} of them in common "
                  f"(word, row, signature); rows' norms within {cmp['norm_max_rel']:.1e} (relative)."]
    _common.save(f"words-build-{a.rows // 1000}k{'-add' if a.add_only else ''}", "\n".join(lines))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
