"""The visual-word lookup's postings budget (retrieval/match/words.py POSTINGS_BUDGET): equal to the ASMK* score's
definition when nothing exceeds it, at most the budget read when a query does, a true image still found."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.match import words as W


def _sigs(words, seed) -> np.ndarray:
    """Signatures for ``words``: a word's bits mostly shared between images (so that σ has work to do), the rest
    drawn per image."""
    words = np.asarray(words, np.int64)
    base = np.random.default_rng(12345).integers(0, 2**63, 4096, dtype=np.uint64)[words]
    noise = np.random.default_rng(seed).integers(0, 2**63, len(words), dtype=np.uint64)
    mask = np.random.default_rng(seed + 1).integers(0, 2**63, len(words), dtype=np.uint64)
    mask &= np.random.default_rng(seed + 2).integers(0, 2**63, len(words), dtype=np.uint64)  # ~1/4 of the bits
    return (base & ~mask) | (noise & mask)


def _index(bags: dict[int, tuple], branch: int = 16) -> W.WordIndex:
    """A word index over ``bags``: id → (words, counts[, signatures]) (signatures drawn by :func:`_sigs` when
    not given)."""
    rng = np.random.default_rng(0)
    top = rng.random((branch, 128), dtype=np.float32)
    vocab = W.Vocabulary(top, rng.random((branch, branch, 128), dtype=np.float32))
    wi = W.WordIndex(vocab, len(bags), "test")
    for i, (w, n, *s) in bags.items():
        wi.set(i, "sha", np.asarray(w, np.int32), np.asarray(n, np.uint16),
               np.asarray(s[0], np.uint64) if s else _sigs(w, i))
    return wi


def _definition(wi: W.WordIndex, qw, qn, qs, only=None) -> dict[int, float]:
    """ASMK* from the bags, one image at a time: Σ over the words it shares with the query of
    idf × σ(1 − 2h/64) (h: the signatures' Hamming distance, σ(u) = u³ for u > 0, else 0), over √(Σ idf) of the
    image's words and of the query's (idf = log((N + 1) / (df + 1))); the query without stop words (df above
    STOP_SHARE of N and STOP_MIN) and, with ``only``, restricted to those words. (``qn`` only orders the words
    for the budget.)"""
    ids = sorted(wi.bags)
    N = len(ids)
    df = np.zeros(wi.vocab.size)
    for i in ids:
        df[wi.bags[i][1]] += 1
    idf = np.log((N + 1) / (df + 1))
    query = {int(w): int(s) for w, s in zip(qw, np.asarray(qs, np.uint64))
             if df[w] <= max(W.STOP_SHARE * N, W.STOP_MIN) and (only is None or int(w) in only)}
    qnorm = np.sqrt(sum(idf[w] for w in query))
    out = {}
    for i in ids:
        _, w, _, s = wi.bags[i]
        total = 0.0
        for word, sig in zip(w.tolist(), s.tolist()):
            if word in query:
                u = 1 - 2 * bin(query[word] ^ sig).count("1") / 64
                total += idf[word] * (u ** 3 if u > 0 else 0.0)
        out[i] = total / np.sqrt(idf[w].sum()) / max(qnorm, 1e-12)
    return out


class Counting(np.ndarray):
    """An array that counts the elements read through slices or index arrays (the postings the lookup reads)."""
    read = 0

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, _ = key.indices(len(self))
            Counting.read += max(0, b - a)
        elif isinstance(key, np.ndarray):
            Counting.read += int(key.sum()) if key.dtype == bool else len(key)
        return super().__getitem__(key)


@pytest.fixture(params=["slices", "index array"])
def path(request, monkeypatch):
    """Both ways of reading the postings (retrieval/match/words.py SLICE_MIN)."""
    monkeypatch.setattr(W, "SLICE_MIN", 0 if request.param == "slices" else 10**9)
    return request.param


def _counted(wi: W.WordIndex):
    ivf = list(wi._inverted())
    ivf[1] = ivf[1].view(Counting)
    wi._ivf = tuple(ivf)
    Counting.read = 0
    return wi._ivf


def _random_bags(n: int, V: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)  # Zipf-like word frequencies: a few common words, many rare
    p /= p.sum()
    out = {}
    for i in range(n):
        w = np.unique(rng.choice(V, rng.integers(5, 60), p=p))
        out[10 + 3 * i] = (w, rng.integers(1, 5, len(w)))
    return out


def _query(qw, seed=99):
    return _sigs(qw, seed)


def test_uncapped_equals_definition_and_a_budget_nothing_exceeds_changes_nothing(path):
    wi = _index(_random_bags(300, 256))
    ids = wi._inverted()[0]
    qw, qn = np.unique(np.random.default_rng(5).choice(256, 80)), None
    qn = np.random.default_rng(6).integers(1, 4, len(qw))
    qs = _query(qw)
    want = _definition(wi, qw, qn, qs)
    free = wi.score_bag(qw, qn, qs, budget=0)
    assert np.count_nonzero(free) > 50 and len({round(float(v), 6) for v in free}) > 50  # σ sees varied agreements
    np.testing.assert_allclose(free, [want[int(i)] for i in ids], rtol=1e-5, atol=1e-6)
    total = int(sum(wi._inverted()[5][w] for w in qw))  # ≥ the postings read (stop words are skipped)
    np.testing.assert_array_equal(wi.score_bag(qw, qn, qs, budget=total), free)  # bit for bit
    np.testing.assert_array_equal(wi.score_bag(qw, qn, qs), free)  # the default budget is far above this


@pytest.mark.parametrize("budget", [40, 300, 1000])
def test_a_query_over_the_budget_reads_at_most_it_its_best_words_first(budget, path):
    wi = _index(_random_bags(300, 256))
    ids, _, _, ptr, idf, df, _ = ivf = _counted(wi)
    rng = np.random.default_rng(7)
    qw = np.unique(rng.choice(256, 120))
    qn = rng.integers(1, 4, len(qw))
    stop = df > max(W.STOP_SHARE * len(ids), W.STOP_MIN)
    assert df[qw[~stop[qw]]].sum() > budget  # the cap bites
    qs = _query(qw)
    got = wi.score_bag(qw, qn, qs, ivf, budget=budget)
    assert 0 < Counting.read <= budget
    # the definition restricted to the words a reader would pick: by weight √tf·idf, best first, while they fit
    order = sorted((w for w in range(len(qw)) if not stop[qw[w]]), key=lambda j: -np.sqrt(qn[j]) * idf[qw[j]])
    chosen, used = [], 0
    for j in order:
        if used + df[qw[j]] > budget:
            break
        chosen.append(int(qw[j]))
        used += int(df[qw[j]])
    assert used == Counting.read
    want = _definition(wi, qw, qn, qs, only=set(chosen))
    np.testing.assert_allclose(got, [want[int(i)] for i in ids], rtol=1e-5, atol=1e-6)


def test_the_true_image_is_still_found_when_the_cap_bites(monkeypatch, path):
    """400 distractors share the query's common words (each in ~50 images: under the stop share); the true image
    also shares its rare words. With a budget far below the common words' postings, the search (through its
    descriptors) still ranks it first."""
    rng = np.random.default_rng(3)
    bags = {}
    for i in range(400):
        w = np.unique(np.r_[rng.choice(40, 5, replace=False), 40 + rng.choice(200, 6, replace=False)])
        bags[i] = (w, np.ones(len(w)))
    rare = np.arange(240, 256)  # in the query and in the true image only (and in few others)
    for i in range(5):
        bags[400 + i] = (np.r_[rng.choice(40, 10, replace=False), rare[i * 3:i * 3 + 3]], np.ones(13))
    true = 999
    bags[true] = (np.r_[np.arange(0, 30, 3), rare], np.ones(26))
    wi = _index(bags)
    qw = np.r_[np.arange(0, 40), rare]
    qn = np.ones(len(qw), np.int64)
    qs = _query(qw)
    wi.vocab.bag = lambda desc: (qw.astype(np.int32), qn.astype(np.uint16), qs)  # the query's words, whatever the SIFT
    ivf = _counted(wi)
    df = ivf[5]
    kept = qw[df[qw] <= max(W.STOP_SHARE * len(bags), W.STOP_MIN)]
    assert df[kept].sum() > 200  # unstopped common words alone exceed the budget below
    monkeypatch.setattr(W, "POSTINGS_BUDGET", 200)
    hits = wi.search(np.zeros((3, 128), np.uint8), 5)
    assert Counting.read <= 200
    assert hits[0][0] == true
    free = wi.score_bag(qw, qn, qs, ivf, budget=0)
    assert int(ivf[0][np.argmax(free)]) == true  # the uncapped lookup agrees


def _rewrite(directory, drop=(), **replace):
    """words.npz rewritten without the members ``drop`` / with ``replace``d ones (its fingerprint's size too)."""
    import json

    f = directory / W.WORDS_NAME
    with np.load(f) as z:
        members = {k: z[k] for k in z.files if k not in drop}
    members.update(replace)
    with open(f, "wb") as out:
        np.savez(out, **members)
    meta = json.loads((directory / W.META_NAME).read_text())
    meta["bytes"] = f.stat().st_size
    (directory / W.META_NAME).write_text(json.dumps(meta))


def _write_format2(directory, wi, postings: bool = True):
    """``wi`` written as format 2 was (bench/_common.py write_format2, which the benchmarks compare with)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import _common

    _common.write_format2(directory, wi, postings)


def test_the_inverted_file_is_stored_read_back_as_built_and_an_old_file_still_read(tmp_path):
    bags = _random_bags(200, 256)
    built = _index(bags)._inverted()
    _index(bags).save(tmp_path)
    with np.load(tmp_path / W.WORDS_NAME) as z:  # format 3: the postings and the rows' norms
        assert {"post_img", "post_ptr", "post_sig", "row_norm"} <= set(z.files)
        assert not {"words", "counts", "sigs", "ptr", "post_w"} & set(z.files)
    loaded = W.WordIndex.load(tmp_path, "test")
    assert loaded._ivf is not None and loaded._bags is None  # read, not built; no bags made for a search
    for a, b in zip(loaded._ivf, built):
        np.testing.assert_array_equal(a, b)
    qw, qn = np.arange(0, 256, 5), np.ones(52, np.int64)
    qs = _query(qw)
    np.testing.assert_array_equal(loaded.score_bag(qw, qn, qs), _index(bags).score_bag(qw, qn, qs))
    for i in bags:
        np.testing.assert_array_equal(loaded.bags[i][1], np.unique(bags[i][0]))  # each row's bag from the postings
        np.testing.assert_array_equal(loaded.bags[i][3], _sigs(bags[i][0], i))  # the signatures read back
    loaded.set(10, "new", np.array([1, 2, 3], np.int32), np.ones(3, np.uint16), _sigs([1, 2, 3], 0))  # built again
    assert loaded._ivf is None and len(loaded._inverted()[1]) == len(built[1]) - len(bags[10][0]) + 3
    _rewrite(tmp_path, drop=("row_norm",))  # format 3 before the rows' norms were stored: computed, written again
    early = W.WordIndex.load(tmp_path, "test")
    assert early is not None and early.format == 2
    np.testing.assert_allclose(early._ivf[2], built[2], rtol=2e-7, atol=0)
    np.testing.assert_allclose(early.score_bag(qw, qn, qs), _index(bags).score_bag(qw, qn, qs), rtol=1e-6)
    for postings in (True, False):  # format 2, with the inverted file and from before it was stored
        _write_format2(tmp_path, _index(bags), postings)
        old = W.WordIndex.load(tmp_path, "test")
        assert old is not None and old.format == 2 and (old._ivf is not None) == postings
        for a, b in zip(old._inverted(), built):
            np.testing.assert_allclose(a, b, rtol=2e-7, atol=0)
    _index(bags).save(tmp_path)
    with np.load(tmp_path / W.WORDS_NAME) as z:
        bad = z["post_img"].copy()
    bad[7] = len(bags)  # a position past the rows: not trusted, the file is made again from the features
    _rewrite(tmp_path, post_img=bad)
    assert W.WordIndex.load(tmp_path, "test") is None
    _index(bags).save(tmp_path)
    with np.load(tmp_path / W.WORDS_NAME) as z:
        twice, ptr = z["post_img"].copy(), z["post_ptr"]
    a = ptr[np.nonzero(np.diff(ptr) >= 2)[0][0]]
    twice[a + 1] = twice[a]  # one row twice in a word: not a file any writer makes
    _rewrite(tmp_path, post_img=twice)
    assert W.WordIndex.load(tmp_path, "test") is None


def test_a_search_maps_the_postings_and_checks_the_words_it_reads(tmp_path):
    """A search's load maps the postings (nothing read until a query's words are) and scores exactly as the file
    read whole; a word whose stored postings were damaged fails its checksum when a query reads it, and only then;
    the whole read (a writer's, `retrieve check`'s) refuses the file."""
    bags = _random_bags(300, 256)
    _index(bags).save(tmp_path)
    whole, mapped = W.WordIndex.load(tmp_path, "test"), W.WordIndex.load(tmp_path, "test", mapped=True)
    assert isinstance(mapped._ivf[1].base, np.memmap) and isinstance(mapped._ivf[6].base, np.memmap)
    assert not isinstance(whole._ivf[1].base, np.memmap)
    np.testing.assert_array_equal(mapped._row_postings[1], np.bincount(whole._ivf[1], minlength=300))
    qw = np.arange(0, 256, 5)
    qn, qs = np.ones(len(qw), np.int64), _query(qw)
    np.testing.assert_array_equal(mapped.score_bag(qw, qn, qs), whole.score_bag(qw, qn, qs))
    read = qw[whole._ivf[5][qw] <= max(W.STOP_SHARE * 300, W.STOP_MIN)]  # (stop words are not read)
    assert 0 < len(read) < len(qw) and np.array_equal(np.flatnonzero(mapped._checked), read)  # each checked once
    ptr = whole._ivf[3]
    hit = int(read[np.argmax(np.diff(ptr)[read])])  # a word the query reads, with postings
    miss = int(np.setdiff1d(np.flatnonzero(np.diff(ptr)), qw)[0])  # one it does not read
    sig = W._members(tmp_path / W.WORDS_NAME, ("post_sig",))["post_sig"]
    at = sig.base.offset + int(ptr[hit]) * 8
    del sig
    with open(tmp_path / W.WORDS_NAME, "r+b") as f:  # one bit of one signature of the word, in place
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))
    assert W.WordIndex.load(tmp_path, "test") is None
    damaged = W.WordIndex.load(tmp_path, "test", mapped=True)
    other = np.array([miss])
    damaged.score_bag(other, np.ones(1, np.int64), _query(other))  # not this word's postings: not noticed
    with pytest.raises(W.DamagedWords, match=f"word {hit} fail"):
        damaged.score_bag(qw, qn, qs)
    _index(bags).save(tmp_path)
    _rewrite(tmp_path, drop=("post_crc",))  # a file from before the words' checksums: read whole, written again
    early = W.WordIndex.load(tmp_path, "test", mapped=True)
    assert early.format == 2 and early._checked is None and not isinstance(early._ivf[1].base, np.memmap)


def test_format_3_is_a_third_of_format_2(tmp_path):
    """What the rows' words cost on disk: 12 bytes a posting (row, signature) against format 2's 30 (the bags'
    word, count and signature, and the postings' row, weight and signature)."""
    bags = _random_bags(300, 256)
    _write_format2(tmp_path, _index(bags))
    before = (tmp_path / W.WORDS_NAME).stat().st_size
    _index(bags).save(tmp_path)
    after = (tmp_path / W.WORDS_NAME).stat().st_size
    n = sum(len(np.unique(b[0])) for b in bags.values())
    vocab = _index(bags).vocab
    fixed = (vocab.top.nbytes + vocab.sub.nbytes + 257 * 8 + 256 * 4  # the words' pointers and checksums
             + len(bags) * (8 + 64 + 4 + 4))  # ids, shas, norms, posting counts
    assert after - fixed <= 12 * n + 4096  # (the zip's headers)
    assert before - after >= 18 * n - (256 + 300) * 4  # the bags' word, count and signature, the postings' weights
    # (less the checksums and posting counts format 2 did not keep)
    assert W.WordIndex.load(tmp_path, "test") is not None


def test_both_ways_of_reading_the_postings_give_the_same_scores(monkeypatch):
    wi = _index(_random_bags(300, 256))
    rng = np.random.default_rng(9)
    qw = np.unique(rng.choice(256, 90))
    qn = rng.integers(1, 4, len(qw))
    got = []
    for slice_min in (0, 10**9):
        monkeypatch.setattr(W, "SLICE_MIN", slice_min)
        got.append([wi.score_bag(qw, qn, _query(qw), budget=b) for b in (0, 500)])
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)


def test_opening_a_file_without_the_inverted_file_writes_it_back_once(tmp_path, monkeypatch):
    """words.sync (what a search that opens the index runs) upgrades a file written before the inverted file
    was stored: the next open reads it; an up-to-date file is not written again."""
    from types import SimpleNamespace

    bags = _random_bags(50, 256)
    verifier = SimpleNamespace(cache=None, max_side=640, n_features=2000)
    sig = W.signature(verifier)
    wi = _index(bags)
    wi.signature = sig
    wi.vocab.projection = np.eye(128, W.PROJECTION_DIMS, dtype=np.float32)  # (none: sync would fit one)
    _write_format2(tmp_path, wi, postings=False)
    assert W.WordIndex.load(tmp_path, sig)._ivf is None
    monkeypatch.setattr(W, "_rows", lambda store: {i: (f"/x/{i}.jpg", "sha") for i in bags})
    store = SimpleNamespace(directory=tmp_path, row_hashes=lambda: {i: "sha" for i in bags})
    W.sync(store, verifier)
    again = W.WordIndex.load(tmp_path, sig)
    assert again._ivf is not None and again.format == W.FORMAT and set(again.bags) == set(bags)
    stamp = (tmp_path / W.WORDS_NAME).stat().st_mtime_ns
    monkeypatch.setattr(W, "_rows", lambda store: pytest.fail("a search of unchanged rows reads their paths"))
    assert W.sync(store, verifier)._checked is not None  # mapped, the rows' hashes compared, nothing else read
    assert (tmp_path / W.WORDS_NAME).stat().st_mtime_ns == stamp


def test_a_catalogue_within_the_budget_is_scored_uncapped_while_the_collection_is_capped(monkeypatch):
    """search(allowed=…): when the allowed rows hold at most the budget's postings, all of them are read, so
    their scores are the uncapped ones (the same idf and norms as the whole collection) although the whole
    collection's lookup is capped; allowed rows over the budget fall back to the capped scores."""
    rng = np.random.default_rng(4)
    bags = {i: (np.unique(rng.choice(200, 15)), np.ones(15)) for i in range(300)}
    for i in range(300, 306):
        bags[i] = (np.unique(np.r_[rng.choice(200, 8), 200 + rng.choice(56, 4)]), np.ones(12))
    bags = {i: (w, np.ones(len(w))) for i, (w, *_) in bags.items()}
    wi = _index(bags)
    rng2 = np.random.default_rng(8)
    qw = np.unique(np.r_[rng2.choice(200, 30), 200 + rng2.choice(56, 10)]).astype(np.int32)
    qn = np.ones(len(qw), np.uint16)
    qs = _query(qw)
    wi.vocab.bag = lambda desc: (qw, qn, qs)
    ivf = wi._inverted()
    monkeypatch.setattr(W, "POSTINGS_BUDGET", 150)
    uncapped, capped = wi.score_bag(qw, qn, qs, budget=0), wi.score_bag(qw, qn, qs)
    assert not np.array_equal(uncapped, capped)  # the cap bites for the whole collection

    def best(scores, allowed, n):
        pos = np.nonzero(np.isin(ivf[0], allowed) & (scores > 0))[0]
        pos = pos[np.argsort(-scores[pos], kind="stable")][:n]
        return [(int(ivf[0][p]), float(scores[p])) for p in pos]

    catalogue = np.array([3, 17, 300, 301, 302, 303, 304, 305], np.int64)  # 8 rows, ≤ 150 postings
    desc = np.zeros((2, 128), np.uint8)
    assert wi.search(desc, 5, allowed=catalogue) == best(uncapped, catalogue, 5)
    assert wi.search(desc, 5, allowed=catalogue, exclude=[300]) == best(uncapped, catalogue[catalogue != 300], 5)
    many = np.arange(0, 300, 2, dtype=np.int64)  # 150 rows: over the budget
    assert wi.search(desc, 5, allowed=many) == best(capped, many, 5)


def test_the_vocabulary_sample_stays_bounded_in_a_large_collection(monkeypatch):
    """The training sample holds at most TRAIN_DESCRIPTORS descriptors whatever the collection's size: beyond
    TRAIN_DESCRIPTORS / 50 rows, a seeded sample of the rows gives 50 each (before, every row gave 50: 5 M descriptors
    at 100 k rows); a smaller collection's sample is every row's, as before."""
    from types import SimpleNamespace

    monkeypatch.setattr(W, "TRAIN_DESCRIPTORS", 1000)
    monkeypatch.setattr(W, "BRANCH_MAX", 5)  # (its full vocabulary needs 5² × 20 = 500: the cap decides)
    rng = np.random.default_rng(0)
    desc = {i: rng.integers(0, 255, (120, 128), dtype=np.uint8) for i in range(100)}
    read = []

    def features(path, sha):
        read.append(sha)
        return SimpleNamespace(descriptors=desc[int(sha)])

    rows = {i: (f"/x/{i}.jpg", str(i)) for i in range(100)}
    sample = W._sample(rows, features)
    assert len(sample) == 1000 and len(read) == 20 == len(set(read))  # 20 rows × 50
    assert read == sorted(read, key=int) and np.array_equal(sample, W._sample(rows, features))  # seeded
    read.clear()
    small = {i: rows[i] for i in range(10)}
    assert len(W._sample(small, features)) == 1000 and len(read) == 10  # 10 rows × 100: every row
    # a cap below what the largest vocabulary needs (10² words × 20): enough rows for it, and it gets all its words
    monkeypatch.setattr(W, "BRANCH_MAX", 10)
    read.clear()
    sample = W._sample(rows, features)
    assert len(sample) == 2000 and len(read) == 40 == len(set(read))  # 40 rows × 50
    assert W.Vocabulary.train(sample).size == 100
