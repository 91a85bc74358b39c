"""Shared bits of the benchmark scripts: where results go, a table printer, the shared data folder."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = Path(os.environ.get("RETRIEVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))


def shared_dataset(name: str) -> Path | None:
    """The folder ``../shared/data/NAME``, or None (with a one-line note) when it is absent."""
    p = SHARED_DATA / name
    if not p.is_dir():
        print(f"skip: {p} not found (benchmark data lives in ../shared/data)")
        return None
    return p


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def save(name: str, text: str) -> Path:
    """Print ``text`` and save it, with the machine and date, to bench/results/NAME.md."""
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    header = (f"<!-- {time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
              f"{os.cpu_count()} cores · torch {torch.__version__} · threads {torch.get_num_threads()} -->\n")
    path = RESULTS / f"{name}.md"
    path.write_text(header + text + "\n")
    print(text)
    print(f"\nsaved {path.relative_to(ROOT)}")
    return path


def write_format2(directory: Path, wi, postings: bool = True) -> None:
    """The word index ``wi`` written as ``words.npz`` format 2 (before fb3ede4: the bags, and with ``postings`` the
    weighted inverted file beside them; without, as 977297a wrote it), with its fingerprint: what an index written
    by those versions holds, for the benchmarks that compare the formats."""
    import json

    import numpy as np
    from retrieval.match import words as W

    ivf = wi._inverted()
    bags = [wi.bags[i] for i in ivf[0].tolist()]
    members = dict(top=wi.vocab.top, sub=wi.vocab.sub, ids=ivf[0], shas=np.array([b[0] for b in bags], "S64"),
                   ptr=np.concatenate([[0], np.cumsum([len(b[1]) for b in bags])]).astype(np.int64),
                   words=np.concatenate([b[1] for b in bags] + [np.zeros(0, np.int32)]).astype(np.int32),
                   counts=np.concatenate([b[2] for b in bags] + [np.zeros(0, np.uint16)]).astype(np.uint16),
                   sigs=np.concatenate([b[3] for b in bags] + [np.zeros(0, np.uint64)]).astype(np.uint64))
    if wi.vocab.projection is not None:
        members["projection"] = wi.vocab.projection
    if postings:
        w = np.repeat(ivf[4], np.diff(ivf[3])) / np.maximum(ivf[2][ivf[1]], np.float32(1e-12))  # each posting's weight
        members.update(post_img=ivf[1], post_w=w.astype(np.float32), post_ptr=ivf[3], post_sig=ivf[6])
    with open(directory / W.WORDS_NAME, "wb") as f:
        np.savez(f, **members)
    meta = {**wi.fingerprint(), "format": 2, "bytes": (directory / W.WORDS_NAME).stat().st_size}
    (directory / W.META_NAME).write_text(json.dumps(meta))


@contextlib.contextmanager
def worktree(rev: str, where: Path):
    """A detached git worktree of revision ``rev`` at ``where`` (its own CLI, run by a benchmark beside this
    tree's), removed afterwards."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], capture_output=True)


def interleaved_runs(sessions: dict, x, step: int, rounds: int) -> tuple[dict, list[float]]:
    """Each ONNX Runtime session of ``sessions`` (name → session, input ``x``) run over ``x`` in slices of ``step``,
    ``rounds`` times, the sessions interleaved within each round so that they share the machine's load: the median
    seconds of each, and the 1-minute load average after each round."""
    import statistics

    times: dict = {n: [] for n in sessions}
    loads = []
    for _ in range(rounds):
        for n, s in sessions.items():
            t = time.perf_counter()
            for i in range(0, len(x), step):
                s.run(None, {"x": x[i:i + step]})
            times[n].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
    return {n: float(statistics.median(v)) for n, v in times.items()}, loads


class Components:
    """Connected components by union-find over hashable items (bench/faces.py's identities from labelled pairs,
    bench/duplicates.py's pictures from groups that share a photo)."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self) -> list[list]:
        out: dict = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return list(out.values())
