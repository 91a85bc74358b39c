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
