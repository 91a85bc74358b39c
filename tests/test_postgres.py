"""Issue 12: an index's rows in PostgreSQL (``--db``), against a real server (tests/pgserver.py: ``.ci/run``'s, or
a throw-away cluster started here); skipped, with the reason in one line, only when no server can be started."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from clitools import ROOT, entry_point, run, run_json, run_process
from conftest import skimage_photo
from pgserver import new_database
from retrieval.index import database
from retrieval.index.schema import Base, ImageRow, SettingRow
from retrieval.index.settings import SCHEMA_VERSION


@pytest.fixture(autouse=True)
def _no_db_request():
    yield
    database.use(None)  # in-process CLI runs leave no --db behind for other tests


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    """48 distinct tiny real photos (crops of scikit-image's photos), fast to decode and embed."""
    d = tmp_path_factory.mktemp("pgphotos")
    rng = np.random.default_rng(12)
    sources = [skimage_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket")]
    for i in range(48):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        src.crop((x0, y0, x0 + cw, y0 + ch)).resize((96, 72)).save(d / f"{i:03d}.jpg", quality=85)
    return d


def _rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return c.execute(select(func.count()).select_from(ImageRow)).scalar()
    except Exception:
        return 0
    finally:
        engine.dispose()


def test_create_and_incremental_update_keep_rows_in_postgres(pg, small_photos, tmp_path):
    url = new_database(pg, "retrieve_create")
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    shutil.copytree(small_photos, photos)
    for p in sorted(photos.glob("*.jpg"))[12:]:
        p.unlink()
    with_password = url.replace("retrieve@", "retrieve:s3cret-pw@")  # trust auth ignores it; it must not be kept
    r = run_process("index", photos, "--index", idx, "--db", with_password, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["indexed"] == 12
    # the rows are on the server, the vector file in DIR, and DIR records the database without the password
    assert not (idx / "index.db").exists() and (idx / "vectors.faiss").is_file()
    assert json.loads((idx / "database.json").read_text())["url"] == url
    assert not any(b"s3cret-pw" in p.read_bytes() for p in idx.iterdir() if p.is_file())
    engine = create_engine(url)
    try:
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
        with engine.connect() as c:
            assert c.execute(select(func.count()).select_from(ImageRow)).scalar() == 12
            version = c.execute(select(SettingRow.value).where(SettingRow.key == "schema_version")).scalar()
            assert json.loads(version) == SCHEMA_VERSION
            types = {r[0]: r[1] for r in c.execute(text(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'images'"))}
            assert types["mtime_ns"] == "bigint" and types["vector"] == "bytea"
    finally:
        engine.dispose()

    # incremental: one removed, one moved, two new; later commands find the database through DIR
    files = sorted(photos.glob("*.jpg"))
    files[0].unlink()
    (photos / "sub").mkdir()
    files[1].rename(photos / "sub" / files[1].name)
    for p in sorted(small_photos.glob("*.jpg"))[20:22]:
        shutil.copy(p, photos / p.name)
    rep = run_json("index", photos, "--index", idx)
    assert (rep["indexed"], rep["moved"], rep["removed"], rep["unchanged"], rep["total"]) == (2, 1, 1, 10, 13)
    assert _rows(url) == 13
    assert run_json("index", photos, "--index", idx)["unchanged"] == 13  # 64-bit mtimes kept exactly

    query = photos / "sub" / files[1].name
    res = json.loads(run("search", query, "--index", idx, "--include-self", "--json").stdout)
    assert res["results"][0]["path"] == str(query)
    info = run_json("info", "--index", idx)
    assert info["database"] == url and info["images"] == 13
    assert run_json("check", "--index", idx)["consistent"]

    # another database, or --db on an SQLite index, is refused in one line
    other = url.rsplit("/", 1)[0] + "/elsewhere"
    r = run("search", query, "--index", idx, "--db", other, ok=False)
    assert r.exit_code == 1 and f"uses the database {url}, not {other}" in r.stderr and r.stderr.count("\n") == 1
    sqlite_dir = tmp_path / "sqlite"
    sqlite_dir.mkdir()
    (sqlite_dir / "index.db").write_bytes(b"")
    r = run("info", "--index", sqlite_dir, "--db", url, ok=False)
    assert r.exit_code == 1 and "(SQLite)" in r.stderr and r.stderr.count("\n") == 1


def test_second_writer_refused_search_answers_kill_9_then_resume(pg, small_photos, tmp_path):
    """A run frozen mid-way (SIGSTOP) holds the advisory lock: a second `retrieve index` (from another index
    directory, as on another machine) is refused in one line naming it, searches answer from the committed rows;
    then the run is killed with -9: the committed rows stay, `check` is green and the next run completes."""
    url = new_database(pg, "retrieve_lock")
    idx, elsewhere = tmp_path / "idx", tmp_path / "other-machine"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RETRIEVE_THREADS": "1"}
    p = subprocess.Popen(entry_point() + ["index", str(small_photos), "--index", str(idx), "--db", url,
                                          "--batch-size", "4", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.time() + 60
        while time.time() < end and p.poll() is None and _rows(url) < 8:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGSTOP)
        assert p.poll() is None, p.communicate()
        kept = _rows(url)
        assert 8 <= kept < 48

        r = run("index", small_photos, "--index", elsewhere, "--db", url, ok=False)
        assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"is being written by pid {p.pid} on " in r.stderr and "wait for it to finish" in r.stderr
        assert not elsewhere.exists()  # refused before anything was made

        res = json.loads(run("search", small_photos / "000.jpg", "--index", idx, "-k", "3", "--json").stdout)
        assert len(res["results"]) == 3  # the rows committed so far answer

        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    assert _rows(url) >= kept  # nothing committed was lost

    rep = run_json("check", "--index", idx)
    assert rep["consistent"] and rep["images"] >= kept
    engine = create_engine(url)  # the server drops the dead run's connection, and its lock with it
    try:
        for _ in range(200):
            with engine.connect() as c:
                if not c.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar():
                    break
            time.sleep(0.05)
    finally:
        engine.dispose()
    rep = run_json("index", small_photos, "--index", idx)
    assert rep["total"] == 48 and rep["indexed"] == 48 - rep["unchanged"] and rep["unchanged"] >= kept
    rep = run_json("check", "--index", idx)
    assert rep["consistent"] and not rep["trailing"] and rep["vectors"] == rep["images"] == 48


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bulk_insert_rows_ids_never_reused_and_columns_kept(backend, pg, tmp_path):
    """IndexStore.insert_rows in bulk (binary COPY on PostgreSQL, one executemany on SQLite), at the store level:
    new ids follow the highest ever given even after it was deleted, a row put back keeps its id, each column
    reads back as written (64-bit sizes and mtimes, 32-bit width/height/face, a non-UTF-8 name, the float32
    bytes), the replaced rows and the skipped record of a re-inserted path are gone, all in one transaction."""
    from retrieval.index.settings import IndexSettings
    from retrieval.index.store import IndexStore

    if backend == "postgresql":
        database.use(new_database(pg, "retrieve_bulk"))
    st = IndexSettings(model="synthetic", weights_id="x", weights_source="", preprocess={"size": 224},
                       metric="cosine", dim=8, index_type="flat", faiss_factory="")
    store = IndexStore.create(tmp_path / "idx", st)
    try:
        assert store.server == (backend == "postgresql")
        rng = np.random.default_rng(3)
        vecs = rng.standard_normal((6, 8)).astype(np.float32)
        odd = "/p/caf\udce9.jpg"  # a name that is not UTF-8 (stored escaped: retrieval/names.py)

        def row(i, path=None, **kw):
            return {"path": path or f"/p/{i}.jpg", "size": 5_000_000_000 + i, "mtime_ns": 1_700_000_000_123_456_789 + i,
                    "sha256": f"{i:064x}", "width": 4000 + i, "height": 3000, "vector": vecs[i].tobytes(),
                    "indexed_at": 1.5e9 + i, **kw}

        ids = store.insert_rows([row(0), row(1, odd), row(2, face=2, box="1,2,3,4")])
        assert list(ids) == [ids[0], ids[0] + 1, ids[0] + 2]
        store.delete_rows([int(ids[2])])  # the highest id goes: it is never given again
        store.record_skip("/p/3.jpg", 1, 1, "unreadable")
        more = store.insert_rows([row(3), row(4)], replace=[int(ids[0])])
        assert more.min() > ids[2] and store.skipped_count() == 0
        back = store.insert_rows([row(0, id=int(ids[0]))])  # a row restored with its old id (an undone move)
        assert list(back) == [ids[0]]
        got = store.rows_by_ids([*ids, *more])
        assert sorted(got) == sorted([int(ids[0]), int(ids[1]), *map(int, more)])
        r = got[int(ids[1])]
        assert (r.path, r.size, r.mtime_ns, r.width, r.height) == (odd, 5_000_000_001, 1_700_000_000_123_456_790, 4001, 3000)
        assert r.vector == vecs[1].tobytes() and r.indexed_at == 1.5e9 + 1
        assert store.insert_rows([]).shape == (0,)
        store.insert_rows([row(5, "/p/f.jpg", face=0, box="0,0,9,9"), row(5, "/p/f.jpg", face=1, box="9,9,19,19")])
        with store.engine.connect() as c:
            assert c.execute(text("SELECT face, box FROM images WHERE path = '/p/f.jpg' ORDER BY face")).all() == \
                [(0, "0,0,9,9"), (1, "9,9,19,19")]
        # a duplicate (path, face) fails the whole transaction: nothing of it is kept
        n = store.count()
        with pytest.raises(Exception):
            store.insert_rows([row(6, "/p/new.jpg"), row(6, "/p/3.jpg")], replace=[int(more[1])])
        assert store.count() == n and store.rows_by_ids([int(more[1])])
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_catalogue_ids_selected_by_the_database_as_by_their_paths(backend, pg, tmp_path):
    """retrieval/index/catalogue.py ids: the rows under the catalogue folders (or equal to a catalogue file), chosen
    by the database's substr (SQLite and PostgreSQL) and equal to comparing every row's path: a folder whose name
    only begins the same is not inside, and names stored escaped (not UTF-8) are found inside and as folders."""
    from retrieval.index import catalogue
    from retrieval.index.settings import IndexSettings
    from retrieval.index.store import IndexStore

    if backend == "postgresql":
        database.use(new_database(pg, "retrieve_catalogue_ids"))
    st = IndexSettings(model="synthetic", weights_id="x", weights_source="", preprocess={"size": 224},
                       metric="cosine", dim=4, index_type="flat", faiss_factory="")
    store = IndexStore.create(tmp_path / "idx", st)
    paths = ["/shop/a.jpg", "/shop/sub/b.jpg", "/shop2/c.jpg", "/shop.jpg", "/other/d.jpg", "/other/e.jpg",
             "/shop/caf\udce9.jpg", "/odd\udce9/x.jpg", "/odd/y.jpg", "/ünï/z.jpg"]
    try:
        ids = store.insert_rows([{"path": p, "size": 1, "mtime_ns": 1, "sha256": f"{i:064x}", "width": 1, "height": 1,
                                  "vector": np.zeros(4, np.float32).tobytes(), "indexed_at": 0.0}
                                 for i, p in enumerate(paths)])
        by = dict(zip(paths, ids.tolist()))
        for roots, want in ((["/shop", "/other/e.jpg"], ["/shop/a.jpg", "/shop/sub/b.jpg", "/other/e.jpg",
                                                         "/shop/caf\udce9.jpg"]),
                            (["/shop/"], ["/shop/a.jpg", "/shop/sub/b.jpg", "/shop/caf\udce9.jpg"]),
                            (["/odd\udce9"], ["/odd\udce9/x.jpg"]),  # (a folder stored escaped: every path read)
                            (["/ünï"], ["/ünï/z.jpg"]), ([], [])):
            assert catalogue.ids(store, roots).tolist() == sorted(by[p] for p in want), roots
    finally:
        store.close()
