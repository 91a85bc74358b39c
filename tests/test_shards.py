"""Sharded vectors (retrieval/index/sharded.py, ``ShardedVectors``): build in parallel, merge on disk, search
memory-mapped, re-score exactly; the crash protocol (nothing counts before ``commit``, a writer removes what
``current.json`` does not name).

20 k clustered 64-d vectors in 4 shards; the checks are against brute force computed here with numpy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import IndexError_
from retrieval.index.sharded import POINTER, ShardedVectors, ShardError

N, D, SHARDS = 20_000, 64, 4
FACTORY = "IVF128,PQ16"
RECALL_FLOOR = 0.95  # measured 0.99-1.0 at nprobe 16 with ×10 exact re-scoring; PQ alone is far lower


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, D)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.4 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    x = _data()
    ids = np.arange(N, dtype=np.int64) * 3 + 7  # not positions: ids the caller chose (increasing)
    d = tmp_path_factory.mktemp("shards")
    sv = ShardedVectors.new(d, D, "ip", "float32")
    for part in np.array_split(np.arange(N), SHARDS):
        sv.append(ids[part], x[part])
    sv.train(FACTORY, threads=1)
    sv.build(workers=2)
    sv.commit()
    sv.close()
    rng = np.random.default_rng(1)
    q = x[rng.integers(0, N, 50)] + 0.2 * rng.standard_normal((50, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return d, x, ids, q


def _exact(x, ids, q, k=10):
    s = q @ x.T
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, top, 1), ids[top]


def test_build_merges_every_shard_into_one_memory_mapped_index(built):
    d, x, ids, _ = built
    sv = ShardedVectors.open(d)
    m = json.loads((d / POINTER).read_text())
    assert [s["count"] for s in m["shards"]] == [len(p) for p in np.array_split(np.arange(N), SHARDS)]
    assert all(s["index"] for s in m["shards"])  # every shard was added (by the worker processes)
    index = sv.index()
    assert index.ntotal == N
    assert sv.is_mmapped()  # the searched lists are FAISS's on-disk lists, not an in-RAM copy
    assert (d / m["generation"] / m["merged"]["ivfdata"]["file"]).stat().st_size > N * 16  # the PQ codes live in that file
    assert sv.check(full=True) == []
    np.testing.assert_array_equal(sv.vectors_of(ids[[0, 5000, 19_999]]), x[[0, 5000, 19_999]])


def test_recall_against_exact_and_exact_scores(built):
    d, x, ids, q = built
    sv = ShardedVectors.open(d)
    scores, got = sv.search(q, 10, nprobe=16)
    want_s, want = _exact(x, ids, q)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= RECALL_FLOOR, recall
    # re-scored: the returned scores are the exact inner products of the returned ids, best first
    pos = (got - 7) // 3
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[pos]), rtol=0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # where both found the same id, the same score as brute force
    for i in range(len(q)):
        common = {j: s for j, s in zip(want[i], want_s[i])}
        for j, s in zip(got[i], scores[i]):
            if j in common:
                assert abs(s - common[j]) < 1e-5
    # PQ codes alone (no re-scoring) are approximate: the re-scoring is what makes the scores exact
    pq_scores, pq_ids = sv.search(q, 10, nprobe=16, rerank=1)
    pq_true = np.einsum("qd,qkd->qk", q, x[(pq_ids - 7) // 3])
    assert np.abs(pq_scores - pq_true).max() < 1e-5  # rerank=1 still re-scores its k candidates exactly
    pq_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pq_ids, want)])
    assert pq_recall <= recall


def test_exact_search_over_shards_is_brute_force(built):
    d, x, ids, q = built
    sv = ShardedVectors.open(d)
    s, i = sv.exact_search(q, 10, chunk=3000)  # chunks smaller than a shard
    want_s, want = _exact(x, ids, q)
    np.testing.assert_allclose(s, want_s, atol=1e-5)
    assert np.mean(i == want) > 0.99  # ties aside


def test_corrupted_shard_is_detected_and_rebuilt(built, tmp_path):
    import shutil

    src, x, ids, q = built
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    sv = ShardedVectors.open(d, writable=True)
    gen = sv.directory
    vec = gen / sv.shards[2]["vectors"]["file"]
    with open(vec, "r+b") as f:  # flip bytes in the middle: same size, wrong contents
        f.seek(vec.stat().st_size // 2)
        f.write(b"\xff" * 64)
    ShardedVectors.open(d)  # the cheap check (sizes) passes ...
    bad = sv.check(full=True)  # ... the checksums do not
    assert [p for p, _ in bad] == ["shard-00002"]
    assert "corrupted" in bad[0][1] and vec.name in bad[0][1]

    with open(vec, "r+b") as f:  # a torn write: the file is shorter than current.json says
        f.truncate(vec.stat().st_size - 100)
    with pytest.raises(ShardError, match="shard-00002.vec.*truncated or torn"):
        ShardedVectors.open(d)

    # a torn derived file (a shard's index) is rebuilt by build(), not trusted; the next merge replaces the old one
    idx_file = gen / sv.shards[1]["index"]["file"]
    idx_file.write_bytes(idx_file.read_bytes()[:-10])
    assert [p for p, _ in sv.check(full=False)] == ["shard-00001.index", "shard-00002"]
    sv.build(workers=1)
    assert [p for p, _ in sv.check(full=True)] == ["shard-00002"]  # rebuilt; the vectors are still damaged
    sv.commit()
    assert sorted(p.name for p in gen.glob("merged-*")) == ["merged-2.index", "merged-2.ivfdata"]  # merge 1 removed

    # damaged vectors are written again from their source, as a new generation; the damaged one is removed
    new = ShardedVectors.new(d, D, "ip", "float32")
    assert ShardedVectors.open(d, check=False).directory == gen  # still the current one until commit
    for part in np.array_split(np.arange(N), SHARDS):
        new.append(ids[part], x[part])
    new.train(FACTORY, threads=1)
    new.build(workers=1)
    new.commit()
    assert not gen.exists() and sorted(p.name for p in d.iterdir()) == sorted([POINTER, new.directory.name])
    sv = ShardedVectors.open(d)
    assert sv.check(full=True) == []
    _, got = sv.search(q, 10, nprobe=16)
    _, want = _exact(x, ids, q)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= RECALL_FLOOR


def test_bad_input_is_refused(tmp_path):
    sv = ShardedVectors.new(tmp_path / "s", 8, "ip", "float16")
    sv.append(np.arange(10), np.ones((10, 8), np.float32))
    with pytest.raises(IndexError_, match="ids must increase"):
        sv.append(np.arange(5, 15), np.ones((10, 8), np.float32))
    with pytest.raises(IndexError_, match=r"expected \(3, 8\)"):
        sv.append(np.arange(20, 23), np.ones((3, 7), np.float32))
    with pytest.raises(IndexError_, match="not built yet"):
        sv.search(np.ones(8, np.float32))
    assert list((tmp_path / "s").rglob(".*.tmp")) == []  # refused writes leave no temporaries
    with pytest.raises(IndexError_, match="no sharded vectors"):
        ShardedVectors.open(tmp_path / "nothing")
    sv.commit()
    with pytest.raises(IndexError_, match="opened for reading"):  # writers open it writable (holding the lock)
        ShardedVectors.open(tmp_path / "s").append(np.arange(30, 31), np.ones((1, 8), np.float32))


def test_nothing_counts_before_commit_and_a_writer_removes_the_rest(tmp_path):
    """A kill before ``commit`` leaves the committed collection as it was; the next writer removes the files and
    generations ``current.json`` does not name."""
    root = tmp_path / "s"
    sv = ShardedVectors.new(root, 8, "ip", "float16")
    sv.append(np.arange(10), np.ones((10, 8), np.float32))
    with pytest.raises(IndexError_, match="no sharded vectors"):
        ShardedVectors.open(root)  # written, not committed: nothing there yet
    sv.commit(note="the owner's field")
    gen = sv.directory
    sv.append(np.arange(10, 15), np.ones((5, 8), np.float32))  # a new shard, then "killed" before commit
    half = ShardedVectors.new(root, 8, "ip", "float16")  # and a rewrite begun, "killed" too
    half.append(np.arange(3), np.ones((3, 8), np.float32))
    (root / f".{POINTER}.123.tmp").write_text("{")
    r = ShardedVectors.open(root)  # a reader: the committed state, and it removes nothing
    assert (r.count, r.directory, r.doc["note"]) == (10, gen, "the owner's field")
    assert (gen / "shard-00001.vec").exists() and half.directory.exists()
    w = ShardedVectors.open(root, writable=True)  # a writer: what current.json does not name goes
    assert sorted(p.name for p in root.iterdir()) == [POINTER, gen.name]
    assert sorted(p.name for p in gen.iterdir()) == ["shard-00000.ids", "shard-00000.vec"]
    np.testing.assert_array_equal(w.ids(), np.arange(10))


def test_a_format_1_collection_is_read_and_rewritten(tmp_path):
    """Before one document, current.json named the generation and its manifest.json the files: still read, and a
    writer rewrites it as one document."""
    root = tmp_path / "s"
    sv = ShardedVectors.new(root, 8, "l2", "float32")
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    sv.append(np.arange(20) * 2, x)
    doc = sv.commit(space={"head": None}, removed=1)
    manifest = {k: doc[k] for k in ("dim", "metric", "dtype", "factory", "trained", "shards", "merged")}
    (sv.directory / "manifest.json").write_text(json.dumps({"format": 1, **manifest}))
    (root / POINTER).write_text(json.dumps({"format": 1, "generation": doc["generation"], "space": {"head": None},
                                            "removed": 1}))
    r = ShardedVectors.open(root)
    assert (r.count, r.doc["space"], r.doc["removed"]) == (20, {"head": None}, 1)
    np.testing.assert_array_equal(r.vectors_of(np.array([6, 38])), x[[3, 19]])
    assert r.exact_search(x[5], 1)[1][0, 0] == 10
    ShardedVectors.open(root, writable=True)
    assert json.loads((root / POINTER).read_text())["format"] == 2 and not (sv.directory / "manifest.json").exists()
