"""Hostile files, interruptions, concurrent use and damaged indexes never cost the user their index."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import time
import zlib

import faiss
import numpy as np
import pytest
from PIL import Image

from clitools import ROOT, Forker, entry_point, run, run_json, run_process
from conftest import skimage_photo
from retrieval.index.check import check_index
from retrieval.index.store import IndexStore


def png_bomb(path, w=60000, h=60000):
    """A valid PNG header claiming w×h pixels, with almost no data: must be refused without allocating."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def test_hostile_collection(tmp_path):
    d = tmp_path / "hostile collection"
    (d / "sub dir ünïcødé").mkdir(parents=True)
    cat = skimage_photo("chelsea")
    good = {}
    # valid, if unusual
    cat.save(d / "sub dir ünïcødé" / "kätzchen 猫.jpg"); good["unicode"] = 1
    cat.convert("CMYK").save(d / "cmyk.jpg"); good["cmyk"] = 1
    exif = Image.Exif()
    exif[0x0112] = 6
    cat.save(d / "rotated.jpg", exif=exif); good["rotated"] = 1
    Image.fromarray(np.asarray(cat.convert("L"), np.uint16) * 257).save(d / "sixteen.png"); good["16bit"] = 1
    frames = [cat.resize((120, 80)), skimage_photo("coffee").resize((120, 80))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good["gif"] = 1
    pal = cat.convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(d / "palette_transparent.png", transparency=0); good["palette"] = 1
    Image.new("RGB", (1, 1), (9, 99, 199)).save(d / "one.png"); good["1x1"] = 1
    cat.resize((4000, 60)).save(d / "panorama.jpg"); good["panorama"] = 1
    # broken
    (d / "zero.jpg").write_bytes(b"")
    data = (d / "cmyk.jpg").read_bytes()
    (d / "eighth.jpg").write_bytes(data[: len(data) // 8])
    (d / "text.png").write_text("just text")
    png_bomb(d / "bomb.png")
    os.symlink(d, d / "sub dir ünïcødé" / "loop")  # a symlink loop
    (d / "readme.txt").write_text("ignored")
    t = time.perf_counter()
    r = run("index", d, "--index", tmp_path / "idx", "--json")
    rep = json.loads(r.stdout)
    assert rep["indexed"] == len(good) == rep["total"] and rep["skipped"] == 4
    reasons = dict(line.split(": ", 1) for line in r.stderr.strip().splitlines())
    assert set(reasons) == {str(d / n) for n in ("zero.jpg", "eighth.jpg", "text.png", "bomb.png")}
    assert reasons[str(d / "zero.jpg")] == "empty file"
    assert "truncated" in reasons[str(d / "eighth.jpg")]
    assert "decompression bomb" in reasons[str(d / "bomb.png")]
    assert time.perf_counter() - t < 60
    with IndexStore.open(tmp_path / "idx") as store:
        rot = store.row_by_path(str(d / "rotated.jpg"))
        assert (rot.width, rot.height) == (300, 451)  # indexed upright
        assert store.row_by_path(str(d / "sub dir ünïcødé" / "kätzchen 猫.jpg")) is not None
    assert check_index(tmp_path / "idx").consistent


def test_bomb_is_refused_quickly():
    from retrieval.errors import ImageError
    from retrieval.images import load_image
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as t:
        p = pathlib.Path(t) / "b.png"
        png_bomb(p)
        start = time.perf_counter()
        with pytest.raises(ImageError, match="bomb"):
            load_image(p)
        assert time.perf_counter() - start < 1


def test_empty_folder_and_vanishing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("index", tmp_path / "empty", "--index", tmp_path / "idx", ok=False)
    assert r.exit_code == 1 and "no images found" in r.stderr and "no index was created" in r.stderr
    assert not (tmp_path / "idx").exists()
    # a file deleted between scan and read is skipped with a reason, not fatal
    from indexer import run as indexer_run

    d = tmp_path / "photos"
    d.mkdir()
    skimage_photo("coffee").save(d / "a.png")
    skimage_photo("chelsea").save(d / "b.png")
    real_scan = indexer_run.scan_paths

    def scan_then_delete(paths):
        entries = list(real_scan(paths))
        os.remove(d / "b.png")
        return entries

    indexer_run.scan_paths = scan_then_delete
    try:
        rep = indexer_run.index_paths([d], tmp_path / "idx2")
    finally:
        indexer_run.scan_paths = real_scan
    assert rep.indexed == 1 and rep.skipped == 1
    assert rep.skipped_files == [{"path": str(d / "b.png"), "reason": "no such file"}]


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """300 distinct small real photos (crops of scikit-image's photos at varied places and sizes)."""
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    sources = [skimage_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket", "camera", "hubble_deep_field")]
    for i in range(300):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        src.crop((x0, y0, x0 + cw, y0 + ch)).resize((160, 120)).save(d / f"{i:03d}.jpg", quality=85)
    return d


def _count(idx) -> int:
    db = idx / "index.db"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("select count(*) from images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def _start_index(photos, idx, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RETRIEVE_THREADS": "1"}
    return subprocess.Popen(entry_point() + ["index", str(photos), "--index", str(idx), "--batch-size", "8",
                                             "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(idx, proc, at_least: int, timeout: float = 60) -> int:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        n = _count(idx)
        if n >= at_least:
            return n
        time.sleep(0.05)
    return _count(idx)


def _small_photos(d, n: int, seed: int):
    """``n`` distinct tiny real photos (crops of scikit-image's photos), fast to decode and embed."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = [skimage_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket")]
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        src.crop((x0, y0, x0 + cw, y0 + ch)).resize((96, 72)).save(d / f"{seed}_{i:03d}.jpg", quality=85)


def _change_collection(photos, rng, seed: int) -> None:
    """Work of every kind for the next run — a removal, a move, a modified photo, new photos — kept small (a
    few percent of the collection) so that each run is short and the moments to kill it are many."""
    existing = sorted(photos.rglob("*.jpg"))
    os.remove(existing[int(rng.integers(len(existing)))])
    existing = sorted(photos.rglob("*.jpg"))
    (photos / f"sub{seed}").mkdir()
    moved = existing[int(rng.integers(len(existing)))]
    os.rename(moved, photos / f"sub{seed}" / moved.name)
    skimage_photo("camera").resize((96, 72)).rotate(seed).save(sorted(photos.glob("*.jpg"))[0])
    _small_photos(photos, 2, seed=seed)


def test_kill_9_at_random_moments_check_is_green_and_the_next_run_completes(tmp_path):
    """Issue 14: after ``kill -9`` at any moment, ``retrieve check`` exits 0 and nothing committed is lost.

    Ten runs or more are killed at random moments (from before the index exists to the vector file's
    rename), each followed by ``check``; then a run completes and the index is whole.
    """
    photos, idx, log = tmp_path / "photos", tmp_path / "idx", tmp_path / "children.log"
    _small_photos(photos, 40, seed=1)
    args = ("index", photos, "--index", idx, "--batch-size", "8", "--head", "pca-whiten:8", "--json")
    rng = np.random.default_rng(14)
    forker = Forker(log)
    try:
        # Untouched runs into another index warm the ONNX cache and time a whole run and one with nothing to do
        forker.start(*args[:3], tmp_path / "warm", *args[4:])
        code, whole = forker.wait()
        assert code == 0, log.read_text()
        forker.start(*args[:3], tmp_path / "warm", *args[4:])
        code, idle = forker.wait()
        assert code == 0, log.read_text()
        kills = tries = 0
        completed, last = False, 0.0
        gone: set[str] = set()  # files this test deleted or moved: their rows leave at the end of a run
        while kills < 10:
            tries += 1
            assert tries <= 24, f"only {kills} of {tries} runs were killed while running"
            if completed:  # nothing left to do: give the next run work of every kind
                before_change = {str(p) for p in photos.rglob("*.jpg")}
                _change_collection(photos, rng, seed=100 + tries)
                gone |= before_change - {str(p) for p in photos.rglob("*.jpg")}
            # until a run has completed, the runs are long (embedding, head fit, finalisation): any moment of one
            # (the warm-up also exported the ONNX graph, so it runs longer than they do); then they are short
            expected = 0.8 * whole if not last else max(last, idle)
            forker.start(*args)
            time.sleep(float(rng.uniform(0, expected)))  # any moment of the run, from its start to its end
            before = _count(idx)
            code, lasted = forker.wait(kill=True)
            completed = code == 0
            if completed:  # it ended before the kill: aim within the duration of such a run next time
                last = lasted
            kills += code == -signal.SIGKILL
            if not (idx / "index.db").exists():  # killed before the index existed: none was half made
                r = run("check", "--index", idx, ok=False)
                assert r.exit_code == 1 and r.stderr.startswith("Error: no index at")
                continue
            r = run("check", "--index", idx, "--json", ok=False)
            rep = json.loads(r.stdout)
            # consistent (exit 0) but for rows of files the test removed, not yet reached by a run
            assert set(rep["missing_files"]) <= gone and rep["faiss_file"] in ("ok", "stale", "missing"), rep
            assert not rep["bad_embeddings"] and r.exit_code == (1 if rep["missing_files"] else 0), rep
            if not gone:  # before any file was removed, rows only come: none committed may be missing
                assert rep["images"] >= before, "committed rows were lost"
            with IndexStore.open(idx) as store:  # what a search sees: the rows, every one of them
                index = store.faiss_index()
                live = set(faiss.vector_to_array(index.id_map).tolist()) - set(store.removed_ids().tolist())
                assert live == set(store.row_ids().tolist()) and index.d == store.vector_dim
        forker.start(*args)
        assert forker.wait()[0] == 0, log.read_text()[-3000:]
    finally:
        forker.close()
    on_disk = {str(p) for p in photos.rglob("*.jpg")}
    with IndexStore.open(idx) as store:
        with store.session() as s:
            from sqlalchemy import select

            from retrieval.index.schema import ImageRow

            paths = s.execute(select(ImageRow.path)).scalars().all()
        assert store.head is not None and store.head.fitted_on >= 32
    assert len(paths) == len(set(paths)) and set(paths) == on_disk
    rep = run_json("check", "--index", idx)
    assert rep["consistent"] and not rep["trailing"] and rep["vectors"] == rep["images"] == len(on_disk)


def test_ctrl_c_stops_cleanly_and_keeps_the_work(many_photos, tmp_path):
    idx = tmp_path / "idx"
    p = _start_index(many_photos, idx)
    _wait_for_rows(idx, p, 40)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err
    assert "Interrupted" in err and "run the same command again" in err
    kept = json.loads(out)["total"]
    assert 40 <= kept < 300 and _count(idx) == kept
    assert check_index(idx).consistent
    rep = run_json("index", many_photos, "--index", idx)
    assert rep["indexed"] == 300 - kept and rep["total"] == 300


def test_second_writer_is_refused_and_search_reads_meanwhile(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    holder = IndexStore.open(idx, writable=True, what="retrieve index")  # another writer holds the lock
    try:
        r = run("index", photos, "--index", idx, ok=False)
        assert r.exit_code == 1 and f"pid {os.getpid()}" in r.stderr and "retrieve index" in r.stderr
        res = json.loads(run("search", photos / "chelsea.jpg", "--index", idx, "--json").stdout)
        assert res["results"][0]["path"] == str(photos / "more" / "cat_crop.jpg")
    finally:
        holder.close()
    assert run_json("index", photos, "--index", idx)["unchanged"] == 9


def test_check_detects_and_repairs(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    assert run_json("check", "--index", idx)["consistent"] is True
    # damage: truncate the FAISS file, delete a photo, corrupt one stored embedding
    f = idx / "vectors.faiss"
    f.write_bytes(f.read_bytes()[:100])
    os.remove(photos / "horse.png")
    con = sqlite3.connect(idx / "index.db")
    con.execute("update images set vector = x'00' where path = ?", (str(photos / "coffee.png"),))
    con.commit()
    con.close()
    r = run("check", "--index", idx, "--json", ok=False)
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["consistent"] is False and rep["faiss_file"] == "unreadable"
    assert rep["missing_files"] == [str(photos / "horse.png")] and len(rep["bad_embeddings"]) == 1
    r = run("check", "--index", idx, "--repair")
    assert "re-embedded 1" in r.stdout and "dropped 1" in r.stdout and "consistent" in r.stdout
    after = run_json("check", "--index", idx)
    assert after["consistent"] and after["images"] == after["vectors"] == 8


def test_damaged_or_foreign_index_is_a_one_line_error(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    # a truncated FAISS file: search still answers (rebuilt from the stored embeddings in memory)
    f = idx / "vectors.faiss"
    f.write_bytes(f.read_bytes()[:64])
    res = json.loads(run("search", photos / "chelsea.jpg", "--index", idx, "--json").stdout)
    assert len(res["results"]) == 8
    # a newer schema version
    con = sqlite3.connect(idx / "index.db")
    con.execute("update settings set value = '99' where key = 'schema_version'")
    con.commit()
    con.close()
    p = run_process("search", photos / "chelsea.jpg", "--index", idx)
    assert p.returncode == 1 and p.stderr.startswith("Error: ") and "newer" in p.stderr and "Traceback" not in p.stderr
    # a garbage database
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "index.db").write_bytes(b"this is not sqlite" * 100)
    p = run_process("search", photos / "chelsea.jpg", "--index", bad)
    assert p.returncode == 1 and "not a valid index database" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_process("index", photos, "--index", bad)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (bad / "index.db").read_bytes() == b"this is not sqlite" * 100  # left as it was


def test_read_only_index_dir(photos, tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    before = (idx / "index.db").read_bytes()
    if os.geteuid() == 0:  # root ignores permission bits: make the directory refuse writes the way it would
        import retrieval.index.store as store_mod

        real_open = os.open

        def read_only_open(path, flags, *a, **k):
            if str(path).startswith(str(idx)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(store_mod.os, "open", read_only_open)
    else:
        os.chmod(idx, 0o555)
    try:
        r = run("index", photos, "--index", idx, ok=False)
        assert r.exit_code == 1 and "not writable" in r.stderr and "Traceback" not in r.stderr
    finally:
        os.chmod(idx, 0o755)
    assert (idx / "index.db").read_bytes() == before


def test_full_disk_keeps_the_previous_vector_file(photos, tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx, "--head", "none")  # no head to re-fit: the file is only behind
    before = (idx / "vectors.faiss").read_bytes()
    skimage_photo("coins").rotate(90).save(photos / "new.png")
    import faiss

    def no_space(index, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("write failed: No space left on device")

    monkeypatch.setattr(faiss, "write_index", no_space)
    r = run("index", photos, "--index", idx, ok=False)
    assert r.exit_code == 1 and "cannot write the vector file" in r.stderr and "previous one is intact" in r.stderr
    assert (idx / "vectors.faiss").read_bytes() == before
    assert not list(idx.glob(".*.tmp"))
    monkeypatch.undo()
    lag = run_json("check", "--index", idx)  # rows committed, vector file behind: self-healing, exit 0
    assert lag["consistent"] and lag["trailing"] and lag["rows_without_vector"] and not lag["vectors_without_row"]
    text = run("check", "--index", idx).stdout
    assert "pending: 1 images committed after the vector file was written" in text and ": consistent" in text
    assert run_json("index", photos, "--index", idx)["total"] == 10  # space again: the next run catches up
    assert run_json("check", "--index", idx)["consistent"]
