"""No silent damage (issue 28): `check --repair` keeps the rows of missing folders, local features are cached under
the hash of the bytes they came from, a search writes no index file while another process writes the index, and
the writer lock cannot be lost to an unlink."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from clitools import ROOT, run, run_json, run_process
from conftest import skimage_photo
from retrieval.errors import IndexLocked
from retrieval.index.check import missing_folders
from retrieval.index.lock import LOCK_NAME, WriterLock
from retrieval.index.store import IndexStore


# -- check --repair and missing folders ------------------------------------------------------------------------
@pytest.fixture
def with_trip(photos):
    """The photos, and trip/: 4 more photos in a folder of their own (the folder an unmounted drive takes away)."""
    trip = photos / "trip"
    trip.mkdir()
    for i, name in enumerate(("rocket", "coffee", "astronaut", "camera")):
        im = skimage_photo(name)
        im.crop((0, 0, im.width * 3 // 4, im.height * 3 // 4)).save(trip / f"t{i}.jpg", quality=90)
    return photos, trip


def test_repair_keeps_the_rows_of_a_missing_folder_and_its_hint_drops_them(with_trip, tmp_path):
    photos, trip = with_trip
    idx = tmp_path / "idx"
    assert run_json("index", photos, "--index", idx)["total"] == 13
    away = tmp_path / "elsewhere"
    shutil.move(trip, away)  # the drive is unplugged
    os.remove(photos / "horse.png")  # and one photo deleted from a folder that still holds the others
    r = run_process("check", "--repair", "--index", idx)  # the installed entry point
    assert r.returncode == 1, r.stdout + r.stderr  # the index still does not agree with the files on disk
    assert f"4 photos under {trip}: the folder is missing" in r.stdout and "; kept" in r.stdout, r.stdout
    assert "dropped 1 photo whose file was deleted" in r.stdout, r.stdout
    assert "run `retrieve check --repair" not in r.stdout  # it would change nothing
    rep = json.loads(run("check", "--index", idx, "--json", ok=False).stdout)
    assert rep["images"] == 12 and rep["missing_folders"] == [
        {"folder": str(trip), "exists": False, "paths": [str(trip / f"t{i}.jpg") for i in range(4)]}]
    assert rep["deleted_files"] == [] and rep["faiss_file"] == "ok"
    shutil.move(away, trip)  # plugged in again: nothing was lost
    rep = run_json("check", "--index", idx)
    assert rep["consistent"] and rep["images"] == rep["vectors"] == 12
    assert run_json("index", photos, "--index", idx)["unchanged"] == 12

    shutil.move(trip, away)  # gone for good: the printed command drops them
    r = run_process("check", "--index", idx)
    assert r.returncode == 1 and f"4 photos under {trip}: the folder is missing" in r.stdout, r.stdout
    hint = re.search(r"`(retrieve check --repair --prune-missing [^`]*)`", r.stdout)
    assert hint, r.stdout
    r = run_process(*shlex.split(hint.group(1))[1:])
    assert r.returncode == 0 and "dropped 4 photos in missing folders (--prune-missing)" in r.stdout, r.stdout
    rep = run_json("check", "--index", idx)
    assert rep["consistent"] and rep["images"] == rep["vectors"] == 8


def test_an_index_run_keeps_the_rows_of_a_missing_folder_unless_pruned(with_trip, tmp_path):
    """`retrieve index` over the parent of an unplugged drive's folder does not take its photos for deleted
    either; a photo deleted from a folder that holds others leaves; --prune-missing drops the folder's rows."""
    photos, trip = with_trip
    idx = tmp_path / "idx"
    assert run_json("index", photos, "--index", idx)["total"] == 13
    away = tmp_path / "elsewhere"
    shutil.move(trip, away)
    os.remove(photos / "horse.png")
    r = run_process("index", photos, "--index", idx)
    assert r.returncode == 0, r.stderr
    assert f"4 photos under {trip}: the folder is missing" in r.stdout and "; kept" in r.stdout, r.stdout
    assert "12 images in" in r.stdout and "1 removed" in r.stdout, r.stdout
    shutil.move(away, trip)  # back: nothing to embed again
    rep = run_json("index", photos, "--index", idx)
    assert rep["total"] == 12 and rep["unchanged"] == 12 and rep["indexed"] == 0 and rep["kept_missing"] == []
    shutil.move(trip, away)
    rep = run_json("index", photos, "--index", idx)
    assert rep["total"] == 12 and rep["removed"] == 0
    assert rep["kept_missing"] == [{"folder": str(trip), "exists": False, "photos": 4}]
    rep = run_json("index", photos, "--index", idx, "--prune-missing")
    assert rep["total"] == 8 and rep["removed"] == 4 and rep["kept_missing"] == []


def test_an_empty_folder_keeps_its_rows_and_prune_needs_repair(with_trip, tmp_path):
    """An unmounted drive often leaves its mount point behind, empty: its photos are not taken for deleted."""
    photos, trip = with_trip
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    for f in trip.iterdir():
        f.unlink()
    r = run("check", "--index", idx, "--repair", ok=False)
    assert r.exit_code == 1 and f"4 photos in {trip}: none of the folder's indexed photos is there" in r.stdout
    assert run("check", "--index", idx, "--json", ok=False).stdout.count('"exists": true') == 1
    assert json.loads(run("check", "--index", idx, "--json", ok=False).stdout)["images"] == 13
    r = run("check", "--index", idx, "--prune-missing", ok=False)  # a usage error, naming what works
    assert r.exit_code == 2 and "retrieve check --repair --prune-missing" in r.output
    r = run("check", "--index", idx, "--repair", "--prune-missing")
    assert "dropped 4 photos in missing folders" in r.stdout and run_json("check", "--index", idx)["images"] == 9


def test_missing_files_are_grouped_by_the_folder_that_went_away(tmp_path):
    (tmp_path / "mnt" / "usb").mkdir(parents=True)  # an empty mount point
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "kept.jpg").write_bytes(b"x")
    m = str(tmp_path / "mnt" / "usb")
    missing = [f"{m}/photos/2020/a.jpg", f"{m}/photos/2021/b.jpg", f"{m}/c.jpg", f"{m}/c.jpg",  # (two faces)
               str(tmp_path / "home" / "deleted.jpg")]
    groups = missing_folders(missing, [str(tmp_path / "home" / "kept.jpg")])
    assert groups == [{"folder": m, "exists": True, "paths": [f"{m}/c.jpg"]},
                      {"folder": f"{m}/photos", "exists": False,
                       "paths": [f"{m}/photos/2020/a.jpg", f"{m}/photos/2021/b.jpg"]}]


# -- the local-features cache ----------------------------------------------------------------------------------
def _same(a, b) -> bool:
    return a.size == b.size and np.array_equal(a.points, b.points) and np.array_equal(a.descriptors, b.descriptors)


def test_a_photo_edited_in_place_gets_fresh_features_and_the_old_entry_stays_correct(tmp_path, monkeypatch):
    from retrieval.images import load_image
    from retrieval.match.verify import Verifier, indexed_hash

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    p = tmp_path / "photo.jpg"
    skimage_photo("astronaut").save(p, quality=92)
    old_sha = hashlib.sha256(p.read_bytes()).hexdigest()
    st = p.stat()
    row = SimpleNamespace(path=str(p), size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=old_sha)  # as indexed
    v = Verifier()
    old = v.extract(load_image(p, min_side=v.max_side))
    assert indexed_hash(row) == old_sha
    skimage_photo("coffee").save(p, quality=92)  # edited in place; the row still names the old content
    new_sha = hashlib.sha256(p.read_bytes()).hexdigest()
    new = v.extract(load_image(p, min_side=v.max_side))
    assert not _same(old, new)
    # a search asks for the row's hash with no entry cached for it (an index built without verification)
    got = Verifier().features(p, old_sha)
    assert _same(got, new)  # the file as it is
    assert not v.cache_file(old_sha).exists()  # nothing stored under the old content's hash
    assert _same(Verifier()._read(new_sha), new)  # but under the hash of the bytes they came from
    # with the old content's entry cached, a search sees the file changed (size, mtime) and gets fresh features
    v.save(old_sha, old)
    assert indexed_hash(row) is None
    assert _same(Verifier().features(p, indexed_hash(row)), new)
    assert _same(Verifier()._read(old_sha), old)  # and the old entry is still the old bytes' features
    os.remove(p)  # a file out of reach keeps its row's hash (its cached features still serve)
    assert indexed_hash(row) == old_sha and _same(Verifier().features(p, old_sha), old)


# -- readers write nothing -------------------------------------------------------------------------------------
def _snapshot(directory) -> dict:
    """Every file in the index directory: inode, size, mtime. SQLite's shared-memory file (-shm) is left out: any
    reader of a WAL database records its read marks there (SQLite's own coordination, not the index's data)."""
    out = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and not f.name.endswith("-shm"):
            s = f.stat()
            out[str(f.relative_to(directory))] = (s.st_ino, s.st_size, s.st_mtime_ns)
    return out


def test_a_search_during_an_index_run_writes_nothing(photos, tmp_path, monkeypatch):
    from retrieval.match import words

    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx, "--preset", "instance")
    assert (idx / words.WORDS_NAME).is_file()
    (idx / words.WORDS_NAME).unlink()  # a search now has a word index to build (and, as a writer, to store)
    (idx / words.META_NAME).unlink()
    holder = IndexStore.open(idx, writable=True, what="retrieve index")  # an index run holds the lock
    try:
        before = _snapshot(idx)
        r = run_process("search", photos / "chelsea.jpg", "--index", idx, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["results"][0]["path"] == str(photos / "more" / "cat_crop.jpg")
        assert _snapshot(idx) == before
    finally:
        holder.close()
    # a read-only directory (or any lock it cannot take): the search computes in memory and writes nothing
    monkeypatch.setattr(WriterLock, "acquire", lambda self, what: (_ for _ in ()).throw(PermissionError(13, "ro")))
    from retrieval.match.verify import Verifier

    with IndexStore.open(idx) as store:
        assert words.sync(store, Verifier.for_index(store.settings)) is not None
    assert not (idx / words.WORDS_NAME).exists()
    monkeypatch.undo()
    # with no writer about, a search stores what it built, as the index's writer for that moment
    r = run_process("search", photos / "chelsea.jpg", "--index", idx, "--json")
    assert r.returncode == 0, r.stderr
    assert (idx / words.WORDS_NAME).is_file() and (idx / LOCK_NAME).read_text() == ""
    with IndexStore.open(idx) as store:
        assert words.file_state(store, Verifier.for_index(store.settings)) == "ok"


# -- the writer lock -------------------------------------------------------------------------------------------
def test_a_lock_file_unlinked_while_held_never_gives_two_writers(tmp_path, monkeypatch):
    """A holds the lock and removes the file (as a failed creation does) just after B opened it; C then makes and
    locks a new one. B locks the unlinked file: it must see that and try the file at the path, held by C."""
    import fcntl

    a, b, c = WriterLock(tmp_path), WriterLock(tmp_path), WriterLock(tmp_path)
    a.acquire("A")
    real, armed = fcntl.flock, [True]

    def flock(fd, op):
        if armed[0]:  # B has opened the old file and is about to lock it
            armed[0] = False
            os.unlink(a.path)
            a.release()
            c.acquire("C")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(IndexLocked, match=r"\(C, since"):
        b.acquire("B")
    assert b.fd is None and c.fd is not None
    c.release()
    b.acquire("B")  # and once C is done, B gets the file at the path
    assert os.fstat(b.fd).st_ino == os.stat(b.path).st_ino
    b.release()
    assert b.path.is_file()  # released, never unlinked


def test_an_unlinked_lock_file_without_a_successor_is_made_again(tmp_path, monkeypatch):
    import fcntl

    a, b = WriterLock(tmp_path), WriterLock(tmp_path)
    a.acquire("A")
    real, armed = fcntl.flock, [True]

    def flock(fd, op):
        if armed[0]:
            armed[0] = False
            os.unlink(a.path)
            a.release()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    b.acquire("B")
    assert os.fstat(b.fd).st_ino == os.stat(b.path).st_ino and "(B, since" in b.path.read_text()
    b.release()


def test_two_processes_cannot_both_hold_the_lock(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from retrieval.index.lock import WriterLock; "
            "l = WriterLock(sys.argv[2]); l.acquire('other'); print('held', flush=True); sys.stdin.read(); "
            "l.release()")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(IndexLocked, match=rf"pid {p.pid} \(other"):
            WriterLock(tmp_path).acquire("me")
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    mine = WriterLock(tmp_path)
    mine.acquire("me")  # the other let go (the file stays: nothing to race on)
    mine.release()
    assert (tmp_path / LOCK_NAME).is_file()
