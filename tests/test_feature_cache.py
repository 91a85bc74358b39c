"""The per-content cache of local features (retrieval/match/verify.py, format 2): round trip, the old npz format
still read, damaged files re-extracted, reads in threads, and verification that loads in threads."""
from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import skimage_photo
from retrieval.match.verify import FORMAT_MAGIC, MIN_INLIERS, Verifier, verify_hits


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A verifier with its own cache, and a real photo on disk with its content hash."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    v = Verifier()
    p = tmp_path / "astronaut.jpg"
    skimage_photo("astronaut").save(p, quality=92)
    return v, p, hashlib.sha256(p.read_bytes()).hexdigest()


def _same(a, b) -> bool:
    return (a.size == b.size and np.array_equal(a.points, b.points) and np.array_equal(a.descriptors, b.descriptors)
            and a.points.dtype == np.float32 and a.descriptors.dtype == np.uint8)


def test_round_trip_is_exact_and_the_file_is_the_documented_layout(cached):
    v, p, sha = cached
    first = v.features(p, sha)  # extracted, then written
    f = v.cache_file(sha)
    data = f.read_bytes()
    n = len(first.points)
    assert n > 500 and data[:4] == FORMAT_MAGIC and len(data) == 24 + n * (8 + 128) + 4
    assert int.from_bytes(data[4:8], "little") == n
    assert (int.from_bytes(data[8:16], "little"), int.from_bytes(data[16:24], "little")) == first.size
    assert np.array_equal(np.frombuffer(data, "<f4", 2 * n, 24).reshape(n, 2), first.points)
    again = Verifier().features(p, sha)  # a new verifier: no memo, read from the file
    assert _same(again, first)
    assert not list(f.parent.glob("*.tmp"))  # no temporary left behind


def test_a_file_of_the_first_format_is_read_and_rewritten(cached):
    v, p, sha = cached
    feats = v.extract(__import__("retrieval.images", fromlist=["load_image"]).load_image(p, min_side=v.max_side))
    old = v.cache_file(sha).with_suffix(".npz")
    old.parent.mkdir(parents=True)
    np.savez(old, points=feats.points, descriptors=feats.descriptors, size=np.int64(feats.size))
    assert not v.cache_file(sha).exists()
    v.extract = lambda img: pytest.fail("features of the old format must be read, not extracted again")
    got = v.features(p, sha)
    assert _same(got, feats)
    assert v.cache_file(sha).is_file()  # written again in format 2
    assert _same(Verifier().cached(p.read_bytes()), feats)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "other magic"])
def test_a_damaged_file_is_extracted_again_and_rewritten(cached, damage):
    v, p, sha = cached
    good = v.features(p, sha)
    f = v.cache_file(sha)
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped byte":
        data[len(data) // 3] ^= 0x10  # inside the descriptors: only the CRC can tell
    elif damage == "empty":
        data = bytearray()
    else:
        data[:4] = b"XXXX"
    f.write_bytes(bytes(data))
    fresh = Verifier()
    assert fresh.cached(p.read_bytes()) is None  # never used as it is
    calls = []
    extract = fresh.extract
    fresh.extract = lambda img: calls.append(1) or extract(img)
    assert _same(fresh.features(p, sha), good) and calls == [1]  # extracted again: the same features
    assert f.read_bytes() == v.cache_file(sha).read_bytes() and _same(Verifier().cached(p.read_bytes()), good)


def test_reads_in_threads_need_no_lock(cached, monkeypatch):
    import retrieval.match.verify as verify

    v, p, sha = cached
    want = v.features(p, sha)

    class NoLock:  # format 2 never takes the npz lock (np.load's header parsing is what needs it)
        def __enter__(self):
            raise AssertionError("format 2 read under the npz lock")

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(verify, "_NPZ_LOCK", NoLock())
    out, errors = [], []

    def read():
        try:
            for _ in range(20):
                out.append(Verifier().cached(p.read_bytes()))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(out) == 80 and all(_same(f, want) for f in out)


def test_verify_hits_loads_in_threads_and_keeps_the_verdicts(cached, tmp_path):
    """The re-photographed astronaut among other photos: confirmed with the same inliers whether candidates are
    loaded and projected in threads (2 BLAS threads) or one by one; a vanished candidate stays, unverified."""
    from threadpoolctl import threadpool_limits

    from retrieval.match.words import fit_projection
    from retrieval.match.verify import _root
    from test_instance import rephotographed

    v, p, sha = cached
    q = tmp_path / "query.jpg"
    rephotographed(skimage_photo("astronaut"), skimage_photo("coffee")).save(q, quality=90)
    paths = [p]
    for n in ("rocket", "camera", "chelsea", "coins"):  # (not coffee: the background of the query)
        paths.append(tmp_path / f"{n}.jpg")
        skimage_photo(n).save(paths[-1], quality=92)
    basis = fit_projection(np.concatenate([_root(v.features(x).descriptors) for x in paths]))
    gone = tmp_path / "gone.jpg"
    hits = [SimpleNamespace(id=i, path=str(x), inliers=None, verification=None, rank=i + 1)
            for i, x in enumerate(paths[::-1] + [gone])]
    errors = []
    runs = []
    for pool, threads in ((True, 2), (False, 1)):
        fresh = Verifier(projection=basis, pool=pool)  # no memo: everything read from the cache files
        with threadpool_limits(threads):
            out = verify_hits(fresh, str(q), [SimpleNamespace(**vars(h)) for h in hits], len(hits),
                              on_error=lambda path, why: errors.append(path))
        runs.append({h.path: h.inliers for h in out})
        assert out[0].path == str(p) and out[0].inliers >= MIN_INLIERS
        assert all(h.inliers < MIN_INLIERS for h in out[1:])
        assert out[-1].path == str(gone) and out[-1].inliers == 0
    assert runs[0] == runs[1]
    assert errors == [str(gone), str(gone)]
