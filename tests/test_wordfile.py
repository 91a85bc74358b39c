"""The streamed writer of ``words.npz`` (retrieval/match/wordfile.py): the bags of many images quantised together
are each image's bag by definition, and the file it writes a bucket of words at a time is the one the inverted file's
definition gives — from nothing, or copying the unchanged rows of an old file — whatever the chunk and bucket
sizes; a damaged word of the old file is never copied."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval.match import words as W
from retrieval.match import wordfile as B


def _vocab(branch: int = 8, seed: int = 0) -> W.Vocabulary:
    """A vocabulary over 128-d RootSIFT-like points: ``branch`` well-separated top centres, ``branch`` words
    around each, and a random orthonormal matching subspace."""
    rng = np.random.default_rng(seed)
    top = rng.random((branch, 128), dtype=np.float32) * 0.2
    top[np.arange(branch), np.arange(branch)] += 1.0
    sub = top[:, None, :] + rng.normal(0, 0.05, (branch, branch, 128)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(128, 128)))
    return W.Vocabulary(top, sub, q[:, :W.PROJECTION_DIMS].astype(np.float32))


def _descs(vocab: W.Vocabulary, n: int, seed: int) -> np.ndarray:
    """``n`` SIFT descriptors (uint8) near the vocabulary's words: what RootSIFT then maps close to them."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, vocab.size, n)
    centre = vocab.sub.reshape(-1, 128)[words] + rng.normal(0, 0.01, (n, 128)).astype(np.float32)
    sift = np.clip(centre, 0, None) ** 2 * 512  # RootSIFT is √(d / Σd): squares of the centres, scaled
    return np.clip(np.rint(sift), 0, 255).astype(np.uint8)


def _bag_by_definition(vocab: W.Vocabulary, desc: np.ndarray):
    """One image's bag from the definitions: each RootSIFT descriptor's nearest top centre, then its nearest word
    under it (squared distances); per distinct word its count and the signs of the summed residuals from the word's
    centre, projected on the first 64 axes of the matching subspace (bit 63 − j of a uint64 for axis j)."""
    root = W._root(desc).astype(np.float64)
    top = ((root[:, None, :] - vocab.top[None]) ** 2).sum(2).argmin(1)
    sub = np.array([((vocab.sub[t] - r) ** 2).sum(1).argmin() for t, r in zip(top, root)])
    words = top * vocab.sub.shape[1] + sub
    out_w, out_n, out_s = [], [], []
    for w in np.unique(words):
        res = (root[words == w] - vocab.sub.reshape(-1, 128)[w]).sum(0) @ vocab.projection[:, :W.SIG_BITS]
        out_w.append(w)
        out_n.append(int((words == w).sum()))
        out_s.append(int("".join("1" if v > 0 else "0" for v in res), 2))
    return np.array(out_w, np.int32), np.array(out_n, np.uint16), np.array(out_s, np.uint64)


def test_bagging_many_images_at_once_is_each_image_s_bag_by_definition():
    vocab = _vocab()
    descs = [_descs(vocab, n, seed) for seed, n in enumerate((300, 0, 1, 57, 500))]
    img, words, counts, sigs = vocab.bags(descs)
    assert np.all(np.diff(img) >= 0)
    agree = total = 0
    for j, d in enumerate(descs):
        w, n, s = _bag_by_definition(vocab, d)
        at = img == j
        np.testing.assert_array_equal(words[at], w)
        np.testing.assert_array_equal(counts[at], n)
        agree += int((sigs[at] == s).sum())
        total += len(s)
        one = vocab.bag(d)  # the query's bag: the same function, one image
        np.testing.assert_array_equal(one[0], words[at])
        np.testing.assert_array_equal(one[2], sigs[at])
    # signatures are signs of sums: float32 sums against float64 ones may differ where a sum is ~0 (none here)
    assert agree == total and total > 100


class _Rows:
    """A collection of synthetic images: id → (path, sha256), their descriptors by path."""

    def __init__(self, vocab, ids, seed=0):
        self.vocab, self.desc, self.rows = vocab, {}, {}
        for i in ids:
            self.add(i, seed)

    def add(self, i, seed):
        path = f"/p/{i}-{seed}.jpg"
        rng = np.random.default_rng([i, seed])
        self.desc[path] = _descs(self.vocab, int(rng.integers(0, 120)), seed=int(rng.integers(1 << 30)))
        self.rows[i] = (path, f"{i:04d}{seed:060d}")

    def features(self, path, sha):
        return SimpleNamespace(descriptors=self.desc[path])


def _reference(directory, vocab, rows: _Rows, order):
    """The file the inverted file's definition gives: every row's bag (Vocabulary.bag), in ``order``, written by
    WordIndex.save (the postings sorted by word then row, in memory)."""
    wi = W.WordIndex(vocab, 7, "test")
    for i in order:
        path, sha = rows.rows[i]
        wi.set(i, sha, *vocab.bag(rows.desc[path]))
    wi.save(directory)
    return np.load(directory / W.WORDS_NAME)


def _same_file(got, want):
    for name in ("ids", "shas", "post_ptr", "post_img", "post_sig", "row_postings", "post_crc", "top", "sub",
                 "projection"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["row_norm"], want["row_norm"], rtol=1e-6)  # (float64 sums in another order)


@pytest.mark.parametrize("chunk, bucket", [(1 << 16, 1024), (50, 7)])
def test_a_build_from_nothing_writes_the_file_the_definition_gives(tmp_path, monkeypatch, chunk, bucket):
    monkeypatch.setattr(B, "CHUNK_DESCRIPTORS", chunk)  # one chunk and one bucket; many of each
    monkeypatch.setattr(B, "BUCKET_WORDS", bucket)
    vocab = _vocab()
    rows = _Rows(vocab, [5, 3, 40, 41, 2, 7, 9, 11, 12, 100])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    done = []
    B.build(tmp_path / "a", vocab, 7, "test", rows.rows, rows.features, progress=lambda *a: done.append(a))
    assert done[-1] == (len(rows.rows), len(rows.rows)) and done == sorted(done)
    _same_file(np.load(tmp_path / "a" / W.WORDS_NAME), _reference(tmp_path / "b", vocab, rows, list(rows.rows)))
    got = W.WordIndex.load(tmp_path / "a", "test", mapped=True)  # read back as a search reads it, every word checked
    got._check_words()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [W.META_NAME, W.WORDS_NAME]  # no temporaries


@pytest.mark.parametrize("bucket", [1024, 5])
def test_a_build_copies_the_unchanged_rows_of_the_old_file(tmp_path, monkeypatch, bucket):
    """Rows removed, changed and added: the unchanged rows' postings come from the old file (not their features,
    which are gone), in the old order, the new rows after them — the file a rebuild of every row gives."""
    monkeypatch.setattr(B, "BUCKET_WORDS", bucket)
    monkeypatch.setattr(B, "CHUNK_DESCRIPTORS", 100)
    vocab = _vocab()
    rows = _Rows(vocab, range(20))
    B.build(tmp_path, vocab, 7, "test", rows.rows, rows.features)
    old = W.WordIndex.load(tmp_path, "test", mapped=True)
    for i in (3, 17):
        del rows.rows[i]  # removed
    for i in (4, 11):
        rows.add(i, seed=1)  # its content changed: quantised again, kept in its place
    for i in (30, 25):
        rows.add(i, seed=0)  # new: appended in the rows' order
    unchanged = {rows.rows[i][0] for i in range(20) if i in rows.rows and i not in (4, 11)}
    asked = []

    def features(path, sha):
        asked.append(path)
        return rows.features(path, sha)

    (tmp_path / "new").mkdir()
    B.build(tmp_path / "new", vocab, 7, "test", rows.rows, features, old)
    assert not unchanged & set(asked) and len(asked) == 4
    order = [i for i in range(20) if i in rows.rows] + [30, 25]
    (tmp_path / "ref").mkdir()
    _same_file(np.load(tmp_path / "new" / W.WORDS_NAME), _reference(tmp_path / "ref", vocab, rows, order))


def test_a_damaged_word_of_the_old_file_is_never_copied(tmp_path):
    vocab = _vocab()
    rows = _Rows(vocab, range(12))
    B.build(tmp_path, vocab, 7, "test", rows.rows, rows.features)
    z = dict(np.load(tmp_path / W.WORDS_NAME))
    w = int(np.flatnonzero(np.diff(z["post_ptr"]))[3])
    z["post_sig"][z["post_ptr"][w]] ^= np.uint64(1 << 9)  # one bit of one word's postings
    with open(tmp_path / W.WORDS_NAME, "wb") as f:
        np.savez(f, **z)
    old = W.WordIndex.load(tmp_path, "test", mapped=True)
    assert old is not None  # (the same size: the fingerprint still describes the file)
    rows.add(50, 0)
    (tmp_path / "new").mkdir()
    with pytest.raises(W.DamagedWords, match=f"word {w}"):
        B.build(tmp_path / "new", vocab, 7, "test", rows.rows, rows.features, old)
    assert not list((tmp_path / "new").iterdir())  # nothing left behind


def test_sync_builds_again_from_the_features_when_the_old_file_is_damaged(tmp_path, monkeypatch):
    """Through words.sync as the index's writer: rows added to an index whose file has a damaged word give a file
    of every row quantised again (the vocabulary kept), not one carrying the damage."""
    vocab = _vocab()
    rows = _Rows(vocab, range(12))
    verifier = SimpleNamespace(cache=None, max_side=640, n_features=2000)
    sig = W.signature(verifier)
    B.build(tmp_path, vocab, 7, sig, rows.rows, rows.features)
    z = dict(np.load(tmp_path / W.WORDS_NAME))
    z["post_img"][5] ^= 1
    with open(tmp_path / W.WORDS_NAME, "wb") as f:
        np.savez(f, **z)
    rows.add(12, 0)
    monkeypatch.setattr(W, "_features", lambda v: rows.features)
    wi = W.sync(_store(tmp_path, rows), verifier)
    wi._check_words()
    (tmp_path / "ref").mkdir()
    _same_file(np.load(tmp_path / W.WORDS_NAME), _reference(tmp_path / "ref", vocab, rows, list(rows.rows)))


def test_a_killed_build_s_temporary_folder_goes_with_the_next_writer(tmp_path, monkeypatch):
    left = tmp_path / (B.BUILD_PREFIX + "abc")
    left.mkdir()
    (left / "3.new").write_bytes(b"x" * 100)
    monkeypatch.setattr(W, "sync", lambda store, verifier, progress=None: None)
    from retrieval.match import verify

    monkeypatch.setattr(verify.Verifier, "for_index", staticmethod(lambda settings: None))
    W.update_index(SimpleNamespace(directory=tmp_path, settings=None))
    assert not left.exists()


def _store(directory, rows: _Rows, writable=True):
    return SimpleNamespace(directory=directory, writable=writable,
                           row_paths=lambda: [(i, *r) for i, r in rows.rows.items()],
                           row_hashes=lambda: {i: r[1] for i, r in rows.rows.items()})


def test_a_build_leaves_numpy_s_blas_threads_as_it_found_them(tmp_path, monkeypatch):
    """The chunks are bagged in threads on one BLAS thread each: threadpoolctl's limit is the process's, so it is
    set once around them, not by each (two overlapping limits can leave the process on one thread after them)."""
    from retrieval.match.verify import blas_threads

    monkeypatch.setattr(B, "CHUNK_DESCRIPTORS", 2000)  # chunks that take long enough to overlap
    vocab = _vocab()
    rows = _Rows(vocab, range(400))
    threads = blas_threads()
    if threads < 2:
        pytest.skip("NumPy's BLAS runs on one thread here (or threadpoolctl cannot tell)")
    for k in range(4):
        (tmp_path / str(k)).mkdir()
        B.build(tmp_path / str(k), vocab, 7, "test", rows.rows, rows.features)
        assert blas_threads() == threads


def test_an_index_without_a_matching_subspace_is_not_written_again_by_every_sync(tmp_path, monkeypatch):
    """A collection too small for a projection (no sample to fit one on) has a file without one: a sync of unchanged
    rows reads it and writes nothing, as the writer or as a search."""
    vocab = _vocab()
    vocab.projection = None
    rows = _Rows(vocab, range(6))
    verifier = SimpleNamespace(cache=None, max_side=640, n_features=2000)
    B.build(tmp_path, vocab, 6, W.signature(verifier), rows.rows, rows.features)
    monkeypatch.setattr(W, "_features", lambda v: rows.features)
    monkeypatch.setattr(W, "_sample", lambda rows, features, seed=0: None)
    stamp = (tmp_path / W.WORDS_NAME).stat().st_mtime_ns
    for writable in (True, False, True):
        assert W.sync(_store(tmp_path, rows, writable), verifier) is not None
    assert (tmp_path / W.WORDS_NAME).stat().st_mtime_ns == stamp


def test_an_index_directory_that_cannot_be_written_costs_the_file_not_the_run(tmp_path, monkeypatch):
    """The writer's build fails (a full disk): sync builds in a temporary folder and returns that, the index
    directory keeps its old file and no temporaries; with no temporary folder either, no visual words (None)."""
    vocab = _vocab()
    rows = _Rows(vocab, range(8))
    verifier = SimpleNamespace(cache=None, max_side=640, n_features=2000)
    sig = W.signature(verifier)
    B.build(tmp_path, vocab, 8, sig, rows.rows, rows.features)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    real = B.build

    def full(directory, *a, **k):
        if directory == tmp_path:
            raise OSError(28, "No space left on device")
        return real(directory, *a, **k)

    monkeypatch.setattr(B, "build", full)
    monkeypatch.setattr(W, "_features", lambda v: rows.features)
    rows.add(20, 0)
    wi = W.sync(_store(tmp_path, rows), verifier)
    assert wi is not None and 20 in wi.shas
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(B, "build", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert W.sync(_store(tmp_path, rows), verifier) is None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
def test_a_writer_s_pass_over_a_mapped_file_does_not_leave_it_resident(tmp_path):
    """A writer checks every word of the mapped postings (or copies them into the next file): each range's pages are
    let go of once read, so the process's resident size does not grow by the file's size."""
    rng = np.random.default_rng(0)
    n_rows, per_row, V = 4000, 1500, 4096  # 6 M postings: 72 MB
    post_img = np.tile(np.arange(n_rows, dtype=np.int32), per_row)
    words = np.repeat(np.arange(V), -(-len(post_img) // V))[:len(post_img)]
    order = np.lexsort((post_img, words))
    post_img = post_img[order]
    ptr = np.zeros(V + 1, np.int64)
    np.cumsum(np.bincount(words, minlength=V), out=ptr[1:])
    post_sig = rng.integers(0, 2**63, len(post_img), dtype=np.uint64)
    vocab = _vocab(branch=64)
    wi = W.WordIndex(vocab, n_rows, "test")
    wi.shas = {i: f"{i:064d}" for i in range(n_rows)}
    wi._bags = None
    wi._ivf = W.WordIndex._stored_inverted(np.arange(n_rows, dtype=np.int64), post_img, ptr, post_sig, None, None,
                                           vocab.size)[0]
    wi._row_postings = (wi._ivf, np.full(n_rows, per_row, np.int32))
    wi.save(tmp_path)
    del wi, post_img, post_sig, words, order

    def resident_mb():  # the file-backed part of the resident size: the mapped postings, not the heap's ups and downs
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    mapped = W.WordIndex.load(tmp_path, "test", mapped=True)
    before = resident_mb()
    mapped._check_words()
    assert mapped._checked.all()
    assert resident_mb() - before < 30  # (72 MB of postings read)
    (tmp_path / "next").mkdir()
    rows = {i: (f"/p/{i}", f"{i:064d}") for i in range(n_rows)}
    before = resident_mb()
    B.build(tmp_path / "next", vocab, n_rows, "test", rows, lambda p, h: None, mapped)  # every row copied
    assert resident_mb() - before < 30
    assert (tmp_path / "next" / W.WORDS_NAME).stat().st_size == (tmp_path / W.WORDS_NAME).stat().st_size


def test_an_index_run_shows_the_visual_words_as_a_stage_of_its_own(photos, tmp_path):
    """The quantisation at the end of an instance run takes minutes at 100 k images: a Progress that has stages (the
    CLI's bar) gets one for it, advanced to the rows quantised."""
    from indexer.run import index_paths

    class Recorder:
        def __init__(self):
            self.calls = []

        def start(self, total):
            self.calls.append(("start", total))

        def advance(self, n):
            self.calls.append(("advance", n))

        def stage(self, label, total):
            self.calls.append(("stage", label, total))

    rec = Recorder()
    report = index_paths([photos], tmp_path / "idx", preset="instance", progress=rec)
    at = rec.calls.index(("stage", "visual words", report.total))
    assert sum(c[1] for c in rec.calls[at + 1:] if c[0] == "advance") == report.total
    assert sum(c[1] for c in rec.calls[:at] if c[0] == "advance") == report.indexed
