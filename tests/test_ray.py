"""``retrieve index --engine ray``: a real (local) Ray, real photos, compared with the local engine.

One Ray session for the module (started here, ``num_cpus=2``: one embedding actor and a logical CPU for
the decoding tasks); the in-process runs use it, the command-line run connects to it by
its address. About forty photos: scikit-image's and data/samples, with resized and flipped variants.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import ROOT, entry_point, run
from conftest import PHOTOS, skimage_photo

NEEDS_EXTRA = "the Ray engine needs the ray extra: pip install -e '.[ray]'"


def test_missing_extra_is_one_line_naming_it(tmp_path):
    """Without Ray installed (an import of ``ray`` that fails): one line naming the extra, exit 1, no index."""
    fake = tmp_path / "noray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    photo = tmp_path / "p"
    photo.mkdir()
    skimage_photo("coffee").save(photo / "coffee.jpg")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    p = subprocess.run(entry_point() + ["index", str(photo), "--index", str(tmp_path / "idx"), "--engine", "ray"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines() == [f"Error: {NEEDS_EXTRA}"]
    assert not (tmp_path / "idx").exists()


def test_ray_address_needs_the_ray_engine(tmp_path):
    r = run("index", str(tmp_path), "--ray-address", "auto", ok=False)
    assert r.exit_code == 2 and "--ray-address needs --engine ray" in r.output


def test_driver_commits_grow_with_the_rate_rows_come_in(monkeypatch):
    """indexer/rows.py Commits (the Ray driver's): rows that come fast go in one transaction per GROUP_SECONDS (at
    most GROUP_MAX_ROWS), rows that come slowly one per batch as before; every row committed once, in order."""
    from indexer import rows as rows_mod
    from indexer.common import IndexReport
    from retrieval.scan import FileEntry

    clock = [0.0]
    monkeypatch.setattr(rows_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(rows_mod, "GROUP_MAX_ROWS", 100)
    commits = []

    class Store:
        def insert_rows(self, values, replace=()):
            commits.append([v["path"] for v in values])
            return np.arange(len(values))

        def apply(self, *_):
            pass

    done = []
    c = rows_mod.Commits(Store(), {}, IndexReport(), 4, done.append)
    d = [rows_mod.Decoded(FileEntry(f"/p/{i}.jpg", 1, 1), f"{i:064x}", 1, 1) for i in range(400)]
    v = np.zeros(8, np.float32)
    for i in range(10):  # slow: a batch every second
        c.add(d[i], v)
        clock[0] += 0.3
    assert [len(x) for x in commits] == [4, 4]  # the first at once, then every batch
    for i in range(10, 300):  # fast: 1000 rows a second
        c.add(d[i], v)
        clock[0] += 0.001
    c.flush()
    sizes = [len(x) for x in commits]
    assert sum(sizes) == 300 and [p for x in commits for p in x] == [e.entry.path for e in d[:300]]
    assert max(sizes) == 100 and len(commits) < 12 and c.report.indexed == 300 and sum(done) == 300


ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300_000_000,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """40 real photos (JPEG and PNG, several sizes and aspects) and one corrupt file."""
    d = tmp_path_factory.mktemp("raycoll")
    for name in PHOTOS:
        im = skimage_photo(name)
        im.save(d / f"{name}.jpg", quality=92)
        im.resize((max(32, im.width // 3), max(32, im.height // 2))).save(d / f"{name}_small.png")
        im.transpose(Image.FLIP_LEFT_RIGHT).save(d / f"{name}_flip.jpg", quality=85)
        im.rotate(90, expand=True).save(d / f"{name}_rot.jpg", quality=88)
    for f in sorted((ROOT / "data" / "samples").iterdir()):
        if f.suffix in (".jpg", ".png"):
            shutil.copy(f, d / f"sample_{f.name}")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return d


def _vectors(index_dir: Path) -> dict:
    con = sqlite3.connect(f"file:{index_dir / 'index.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT path, vector, indexed_at FROM images").fetchall()
    finally:
        con.close()
    return {p: (np.frombuffer(v, np.float32), t) for p, v, t in rows}


@pytest.fixture(scope="module")
def local_index(collection, tmp_path_factory, lite0):
    from indexer import index_paths

    idx = tmp_path_factory.mktemp("local") / "idx"
    skips = []
    report = index_paths([collection], idx, backbone=lite0, on_skip=lambda p, r: skips.append((p, r)))
    return idx, report, skips


def test_same_vectors_counts_and_skips_as_the_local_engine(cluster, collection, local_index, lite0, tmp_path):
    from indexer import index_paths

    lidx, lrep, lskips = local_index
    work = tmp_path / "photos"  # a copy: changed below
    shutil.copytree(collection, work)
    idx = tmp_path / "idx"
    skips = []
    rep = index_paths([work], idx, backbone=lite0, engine="ray", batch_size=8,
                      on_skip=lambda p, r: skips.append((p, r)))
    n = len([f for f in collection.iterdir() if f.name != "broken.jpg"])
    assert n >= 40
    assert (rep.indexed, rep.skipped, rep.total) == (lrep.indexed, lrep.skipped, lrep.total) == (n, 1, n)
    assert [(Path(p).name, r) for p, r in skips] == [(Path(p).name, r) for p, r in lskips] == \
        [("broken.jpg", lskips[0][1])] and lskips[0][1]  # the same file, for the same reason
    a = {Path(k).name: v for k, v in _vectors(lidx).items()}
    b = {Path(k).name: v for k, v in _vectors(idx).items()}
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k][0] - b[k][0]).max()) for k in a)
    assert diff <= 1e-5, diff

    # incremental: nothing to embed, the corrupt file is not retried, no row rewritten
    rep2 = index_paths([work], idx, backbone=lite0, engine="ray")
    assert (rep2.indexed, rep2.unchanged, rep2.skipped, rep2.skipped_before) == (0, n, 0, 1)
    again = {Path(k).name: v for k, v in _vectors(idx).items()}
    assert all(np.array_equal(again[k][0], b[k][0]) and again[k][1] == b[k][1] for k in b)

    # a moved file keeps its row, a copy reuses the stored vector, a new photo is embedded by the workers
    os.rename(work / "coffee.jpg", work / "coffee_moved.jpg")
    shutil.copy(work / "horse.jpg", work / "horse_copy.jpg")
    skimage_photo("cat").save(work / "new_cat.jpg", quality=90)
    rep3 = index_paths([work], idx, backbone=lite0, engine="ray")
    assert (rep3.indexed, rep3.moved, rep3.unchanged, rep3.total) == (2, 1, n - 1, n + 2)
    v = {Path(k).name: val for k, val in _vectors(idx).items()}
    assert np.array_equal(v["coffee_moved.jpg"][0], b["coffee.jpg"][0]) and v["coffee_moved.jpg"][1] == b["coffee.jpg"][1]
    assert np.array_equal(v["horse_copy.jpg"][0], b["horse.jpg"][0])
    ref = lite0.embed_images([Image.open(work / "new_cat.jpg").convert("RGB")])[0]
    assert float(np.abs(v["new_cat.jpg"][0] - ref).max()) <= 1e-5


def test_killed_run_resumes_without_re_embedding_committed_rows(cluster, collection, lite0, tmp_path):
    """``retrieve index --engine ray`` (connected to the module's Ray) killed with SIGKILL after its first
    commit; the next run embeds only what was not committed, and the committed rows stay as they were."""
    from indexer import index_paths

    idx = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.Popen(entry_point() + ["index", str(collection), "--index", str(idx), "--engine", "ray",
                                          "--ray-address", cluster, "--batch-size", "2", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    committed = {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if (idx / "index.db").exists():
                try:
                    committed = _vectors(idx)
                except sqlite3.OperationalError:  # being created
                    committed = {}
                if committed:
                    break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally:
        out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run ended before it was killed: {p.returncode}\n{err}"
    committed = _vectors(idx)  # what was committed by the time it died
    n = len([f for f in collection.iterdir() if f.name != "broken.jpg"])
    assert 0 < len(committed) < n
    rep = index_paths([collection], idx, backbone=lite0, engine="ray")
    assert rep.indexed == n - len(committed) and rep.total == n
    after = _vectors(idx)
    for path, (vec, at) in committed.items():  # not re-embedded: the same row, indexed at the same time
        assert after[path][1] == at and np.array_equal(after[path][0], vec)
