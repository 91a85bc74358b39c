"""`retrieve search q.jpg` on a 10 k index: ONNX Runtime alone (cached graph) vs the torch path, vs a bare
ONNX Runtime start.

    python bench/startup_search.py [--rounds 5] [--rows 10000]

Builds an index of data/samples (11 photos) and adds ``--rows`` rows with random unit vectors (a flat
FAISS file of that size; searching it is exact), then times fresh processes, interleaved, median of N:
bare (`import onnxruntime`, load the cached graph, one forward of one 224-px input), `retrieve search
chelsea.png -k 5` as it runs now (the torch-free path of retrieval/fastpath.py), and the same with
RETRIEVE_FAST_SEARCH=0 (torch imported, the model built, as before). Saves bench/results/startup-search.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from startup import timed  # the same wall-clock timer as bench/startup.py
import numpy as np

BARE = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {"x": np.zeros((1, 3, 224, 224), np.float32)})
"""


def add_rows(index: Path, n: int) -> None:
    from retrieval.store import ImageRow, IndexStore

    rng = np.random.default_rng(0)
    with IndexStore.open(index, writable=True) as store:
        for start in range(0, n, 2000):
            vecs = rng.standard_normal((min(2000, n - start), store.settings.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            with store.session() as s, s.begin():
                rows = [ImageRow(path=f"/synthetic/{start + i}.jpg", size=1, mtime_ns=0, sha256=f"{start + i:064x}",
                                 width=640, height=480, vector=v.tobytes(), indexed_at=time.time())
                        for i, v in enumerate(vecs)]
                s.add_all(rows)
                s.flush()
                ids = np.array([r.id for r in rows], np.int64)
            store.apply([], ids, vecs)
        store.update_mean()
        store.save_faiss()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=10000)
    args = ap.parse_args()
    q = str(_common.ROOT / "data" / "samples" / "chelsea.png")
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    retrieve = [sys.executable, "-m", "cli"]
    with tempfile.TemporaryDirectory() as tmp:
        idx = Path(tmp) / "idx"
        subprocess.run(retrieve + ["index", str(_common.ROOT / "data" / "samples"), "--index", str(idx)], check=True,
                       env=env, capture_output=True, cwd=_common.ROOT)
        add_rows(idx, args.rows)
        from retrieval.fastpath import fast_backbone
        from retrieval.store import IndexStore

        with IndexStore.open(idx) as store:
            fb = fast_backbone(store.settings, lambda: None)
            count = store.count()
        assert fb is not None, "no cached graph recorded for the torch-free path"
        graph = str(fb._folder / fb._doc["graphs"]["fp32:0x0"]["graph"])
        runs = {"bare: import onnxruntime, load the graph, one forward": [sys.executable, "-c", BARE, graph],
                "retrieve search q.jpg -k 5 (ONNX Runtime alone)": retrieve + ["search", q, "--index", str(idx),
                                                                              "-k", "5", "--json"],
                "retrieve search q.jpg -k 5, RETRIEVE_FAST_SEARCH=0 (torch, as before)":
                    retrieve + ["search", q, "--index", str(idx), "-k", "5", "--json"]}
        out = subprocess.run(runs["retrieve search q.jpg -k 5 (ONNX Runtime alone)"], env=env, capture_output=True,
                             text=True, check=True).stdout
        top = json.loads(out.splitlines()[0])["results"][0]["path"]
        times = {k: [] for k in runs}
        loads = []
        for _ in range(args.rounds):
            for k, cmd in runs.items():
                e = {**env, "RETRIEVE_FAST_SEARCH": "0"} if "FAST_SEARCH=0" in k else env
                times[k].append(timed(cmd, e))
            loads.append(os.getloadavg()[0])
    bare = statistics.median(times[next(iter(runs))])
    rows = [[k, round(statistics.median(v), 2), f"{statistics.median(v) / bare:.2f}"] for k, v in times.items()]
    text = (f"Start-up of `retrieve search` on a {count}-image flat index (11 photos + {args.rows} random unit "
            f"vectors), fresh processes, interleaved, median of {args.rounds} rounds, {os.cpu_count()} cores, 1-min "
            f"load average {min(loads):.1f}-{max(loads):.1f} (a shared machine: judge by the ratios). Top hit: "
            f"{Path(top).name}.\n\n")
    text += _common.table(["command", "seconds", "vs bare"], rows)
    _common.save("startup-search", text)


if __name__ == "__main__":
    main()
