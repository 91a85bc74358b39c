"""``retrieve index --engine ray`` on a real two-node Ray cluster: a head and a second node started with ``ray start``
on this machine (one logical CPU each, their own raylets and object stores), the command line connecting to the head
by its address. The index equals the local engine's; a worker node killed mid-run (its raylet's process group and
everything under it, as when a machine is lost) costs nothing committed and the next run completes.

The cluster is this module's: started in its own temporary directory, with token authentication off (it listens on
this machine only), torn down by process id whatever happens (``ray stop`` would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import ROOT, entry_point
from conftest import skimage_photo

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

NAMES = ("chelsea", "coffee", "astronaut", "rocket", "camera", "horse")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, process group) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError):
                pass
    return out


def _tree(pgid: int) -> set[int]:
    """The processes of group ``pgid`` (what one ``ray start`` made: the node's raylet and daemons) and every
    descendant (its Ray workers and actors, each in a process group of its own)."""
    procs = _processes()
    found = {p for p, (_, g) in procs.items() if g == pgid}
    stack = list(found)
    while stack:
        parent = stack.pop()
        for p, (pp, _) in procs.items():
            if pp == parent and p not in found:
                found.add(p)
                stack.append(p)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class TwoNodes:
    """A head (``ray start --head``) and a worker node (``ray start --address``), one logical CPU each."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths live under it
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.address = f"127.0.0.1:{_free_port()}"
        self.groups: dict[str, int] = {}

    def _start(self, name: str, *args: str) -> None:
        p = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus", "1",  # `ray start`
                              "--disable-usage-stats", *args],
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=self.env)
        self.groups[name] = p.pid  # its own process group: what it starts stays in it
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, f"ray start ({name}) failed:\n{out[-2000:]}"

    def start(self) -> None:
        """Both nodes started in a thread (the local engine's index is made meanwhile): :meth:`ready` waits."""
        import threading

        def run():
            try:
                self._start("head", "--head", "--port", self.address.rsplit(":", 1)[1], "--node-ip-address",
                            "127.0.0.1", "--temp-dir", str(self.root), "--include-dashboard", "false")
                self._start("worker", "--address", self.address, "--node-ip-address", "127.0.0.1")
            except BaseException as e:  # noqa: BLE001  (reported by ready())
                self.failed = e

        self.failed = None
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def ready(self) -> "TwoNodes":
        self.thread.join(timeout=240)
        assert not self.thread.is_alive(), "ray start did not finish in 240 s"
        if self.failed is not None:
            raise self.failed
        return self

    def on(self, name: str) -> set[str]:
        """What the node's Ray workers and actors are doing now (their process titles, ``ray::…``)."""
        return {t.split()[0] for t in map(_cmdline, _tree(self.groups[name])) if t.startswith("ray::")}

    def kill(self, name: str) -> None:
        _kill(_tree(self.groups[name]))

    def stop(self) -> None:
        """Every process of both nodes (and any stray worker naming our directory) killed by id, the directory gone."""
        self.thread.join(timeout=240)
        for _ in range(3):
            pids = set().union(*(_tree(g) for g in self.groups.values()))
            pids |= {p for p in _processes() if str(self.root) in _cmdline(p)}
            pids.discard(os.getpid())
            if not pids:
                break
            _kill(pids)
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes():
    """The module's two-node cluster (asked for first: it starts while the local engine's index is made)."""
    cluster = TwoNodes()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """24 real photos (six of scikit-image's, each also flipped, turned and reduced): enough blocks of work that
    the worker node's kill comes while some are still to do."""
    d = tmp_path_factory.mktemp("clustercoll")
    for name in NAMES:
        im = skimage_photo(name)
        im.save(d / f"{name}.jpg", quality=92)
        im.transpose(Image.FLIP_LEFT_RIGHT).save(d / f"{name}_flip.jpg", quality=85)
        im.rotate(90, expand=True).save(d / f"{name}_rot.jpg", quality=88)
        im.resize((im.width // 2, im.height // 2)).save(d / f"{name}_half.png")
    return d


@pytest.fixture(scope="module")
def local_index(collection, tmp_path_factory, lite0) -> dict:
    from indexer import index_paths

    idx = tmp_path_factory.mktemp("clusterlocal") / "idx"
    rep = index_paths([collection], idx, backbone=lite0)
    assert rep.indexed == len(NAMES) * 4
    return _vectors(idx)


def _vectors(index_dir: Path) -> dict:
    con = sqlite3.connect(f"file:{index_dir / 'index.db'}?mode=ro", uri=True)
    try:
        return {Path(p).name: (np.frombuffer(v, np.float32), t)
                for p, v, t in con.execute("SELECT path, vector, indexed_at FROM images")}
    finally:
        con.close()


def _count(index_dir: Path) -> int:
    try:
        return len(_vectors(index_dir))
    except sqlite3.Error:  # not created yet, or being created
        return 0


def _same_as_local(index_dir: Path, local: dict) -> None:
    got = _vectors(index_dir)
    assert got.keys() == local.keys()
    diff = max(float(np.abs(got[k][0] - local[k][0]).max()) for k in got)
    assert diff <= 1e-5, diff


def _index(nodes, collection, idx, *extra) -> subprocess.Popen:
    nodes.ready()
    return subprocess.Popen(entry_point() + ["index", str(collection), "--index", str(idx), "--engine", "ray",
                                             "--ray-address", nodes.address, "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nodes.env)


def test_two_nodes_index_equals_the_local_engines(nodes, collection, local_index, tmp_path):
    """The run uses both nodes (the worker node's Ray workers seen at work) and gives the local engine's index."""
    idx = tmp_path / "idx"
    p = _index(nodes, collection, idx, "--batch-size", "2", "--workers", "2")
    seen: set[str] = set()
    try:
        while p.poll() is None:
            seen |= nodes.on("worker")
            time.sleep(0.05)
    finally:
        out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert any("MapBatches" in t or "ReadItems" in t for t in seen), seen  # the pipeline ran there too
    _same_as_local(idx, local_index)


def test_worker_node_killed_mid_run_keeps_what_was_committed_and_the_next_run_completes(nodes, collection,
                                                                                        local_index, tmp_path):
    """The worker node is killed after the first commit: the run completes on the head, or fails in one line saying
    to run it again; the committed rows are kept as they were and the next run (the head alone) completes."""
    idx = tmp_path / "idx"
    p = _index(nodes, collection, idx, "--batch-size", "2", "--workers", "2")
    try:
        deadline = time.monotonic() + 240
        while p.poll() is None and time.monotonic() < deadline and not _count(idx):
            time.sleep(0.02)
        assert p.poll() is None, f"the run ended before the kill: {p.returncode}\n{p.stderr.read()}"
        nodes.kill("worker")
        committed = _vectors(idx)  # at least what was committed before the kill
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert 0 < len(committed) < len(local_index)
    if p.returncode == 0:  # carried on with the head alone
        assert len(_vectors(idx)) == len(local_index)
    else:
        errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
        assert p.returncode == 1 and len(errors) == 1 and "run the same command again" in errors[0], err

    again = _index(nodes, collection, idx)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    _same_as_local(idx, local_index)
    after = _vectors(idx)
    for name, (vec, at) in committed.items():  # nothing committed was lost or re-embedded
        assert after[name][1] == at and np.array_equal(after[name][0], vec)
