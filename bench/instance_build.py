"""The instance preset's index run, this tree beside another checkout: wall time and peak RSS, side by side.

    python bench/instance_build.py --against CHECKOUT [--rounds 2] [--threads 2] [--out bench/.cache/catalogue]

Each tree builds the instance set's 500-image index as a user does (``retrieve index REFS --catalogue --preset
instance``: the 100 clean references, 84 different sizes; then ``retrieve index PHOTOS``: the 400 phone photos),
each with an XDG cache of its own that holds the graphs. The first build per tree is *cold* (its installation's
graphs are checked, its local features made); then *warm graphs* rounds, alternating the order, each in a new index
with the local-features cache emptied (so every keypoint is extracted again) and the graphs kept. Measured: both
commands' wall time, the references' alone, and peak RSS: the indexing processes' own (VmHWM) and with their
children's (``wait4``: the child that prepares graphs with torch). Reuses the references and photos that
bench/catalogue_100k.py lays out under ``--out`` (``catalogue-0/``, ``photos/``), else makes them. Writes
bench/results/instance-build.md (``--name``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import catalogue_100k  # noqa: E402
import instance_set  # noqa: E402


def layout(out: Path) -> tuple[Path, Path]:
    """``out/catalogue-0`` (the references) and ``out/photos`` (the phone photos), as bench/catalogue_100k.py makes
    them."""
    refs, photos = out / "catalogue-0", out / "photos"
    if refs.is_dir() and photos.is_dir():
        return refs, photos
    caltech = _common.shared_dataset("caltech101")
    if caltech is None:
        raise SystemExit(1)
    inst = instance_set.build(caltech, out / "instance")
    for d in sorted(p for p in inst.iterdir() if p.is_dir()):
        (refs / d.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(d / "ref.jpg", refs / d.name / "ref.jpg")
        (photos / d.name).mkdir(parents=True, exist_ok=True)
        for v in sorted(d.glob("view*.jpg")):
            shutil.copy2(v, photos / d.name / v.name)
    return refs, photos


def build(env: dict, refs: Path, photos: Path, index: Path) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    a = catalogue_100k.run(env, "index", str(refs), "--catalogue", "--preset", "instance", "--index", str(index),
                           "--json")
    b = catalogue_100k.run(env, "index", str(photos), "--index", str(index), "--json")
    shutil.rmtree(index, ignore_errors=True)
    return {"wall": a["wall"] + b["wall"], "refs": a["wall"], "self": max(a["rss_self"], b["rss_self"]),
            "tree": max(a["rss"], b["rss"]), "refs_self": a["rss_self"], "photos_self": b["rss_self"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", type=Path, required=True, metavar="CHECKOUT", help="another checkout of retrieve")
    ap.add_argument("--rounds", type=int, default=2, help="warm-graph rounds per tree")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=_common.ROOT / "bench" / ".cache" / "catalogue")
    ap.add_argument("--name", default="instance-build")
    args = ap.parse_args()
    refs, photos = layout(args.out)
    trees = {"before": args.against.resolve(), "now": _common.ROOT}
    graphs = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieve" / "onnx"
    work = args.out / "instance-build"
    env, runs = {}, {k: [] for k in trees}
    for k, tree in trees.items():
        cache = work / f"xdg-{k}"
        shutil.rmtree(cache, ignore_errors=True)
        if graphs.is_dir():  # (the graph files; each tree checks them as its own installation)
            shutil.copytree(graphs, cache / "retrieve" / "onnx")
        env[k] = {**os.environ, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(cache),
                  "RETRIEVE_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
        runs[k].append(("cold", build(env[k], refs, photos, work / f"index-{k}")))
        print(k, runs[k][-1], flush=True)
    for r in range(args.rounds):
        for k in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            shutil.rmtree(work / f"xdg-{k}" / "retrieve" / "local", ignore_errors=True)
            runs[k].append(("warm graphs", build(env[k], refs, photos, work / f"index-{k}")))
            print(k, runs[k][-1], flush=True)
    mb = lambda b: f"{b / 2 ** 20:,.0f}"  # noqa: E731
    rows = []
    for k, tree in trees.items():
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        for label, m in runs[k]:
            rows.append([f"{k} ({rev})", label, f"{m['wall']:.1f}", f"{m['refs']:.1f}", mb(m["self"]),
                         mb(m["refs_self"]), mb(m["photos_self"]), mb(m["tree"])])
    warm = {k: [m for label, m in runs[k] if label == "warm graphs"] for k in trees}
    ratio = lambda f: (sum(m[f] for m in warm["now"]) / len(warm["now"])) / (  # noqa: E731
        sum(m[f] for m in warm["before"]) / len(warm["before"]))
    text = (f"# The instance preset's index run: this tree beside another\n\n"
            f"`python bench/instance_build.py --against CHECKOUT --rounds {args.rounds} --threads {args.threads}` · "
            f"{os.cpu_count()} cores, RETRIEVE_THREADS={args.threads} · load average {os.getloadavg()[0]:.1f} at "
            "the end.\n\n"
            "Both commands of a user's first instance index (the 100 references `--catalogue --preset instance`, 84 "
            "sizes; then the 400 phone photos), each tree with its own graph cache. *cold*: the tree's first build "
            "(its graphs checked, its keypoints extracted); *warm graphs*: a new index with the keypoints extracted "
            "again. RSS in MiB: the indexing processes' own peak (VmHWM), the references' and the photos' command "
            "apart, and with their children's (`wait4`).\n\n")
    text += _common.table(["tree", "build", "wall s", "references s", "peak RSS", "references' run", "photos' run",
                           "with children"], rows)
    text += (f"\n\nWarm graphs, now / before: wall {ratio('wall'):.2f}×, references {ratio('refs'):.2f}×, peak RSS "
             f"{ratio('self'):.2f}×.\n")
    _common.save(args.name, text)


if __name__ == "__main__":
    main()
