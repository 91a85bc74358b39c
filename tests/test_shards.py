"""Sharded vectors (retrieval/index/shards.py): build in parallel, merge on disk, search memory-mapped, re-score exactly.

20 k clustered 64-d vectors in 4 shards; the checks are against brute force computed here with numpy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import IndexError_
from retrieval.index.shards import MANIFEST, ShardedVectors, ShardError

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
    sv = ShardedVectors.create(d, D, "ip", "float32").lock()
    for part in np.array_split(np.arange(N), SHARDS):
        sv.append(ids[part], x[part])
    sv.train(FACTORY, threads=1)
    sv.build(workers=2)
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
    m = json.loads((d / MANIFEST).read_text())
    assert [s["count"] for s in m["shards"]] == [len(p) for p in np.array_split(np.arange(N), SHARDS)]
    assert all(s["index"] for s in m["shards"])  # every shard was added (by the worker processes)
    index = sv.index()
    assert index.ntotal == N
    assert sv.is_mmapped()  # the searched lists are FAISS's on-disk lists, not an in-RAM copy
    assert (d / m["merged"]["ivfdata"]["file"]).stat().st_size > N * 16  # the PQ codes live in that file
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
    m = json.loads((d / MANIFEST).read_text())
    vec = d / m["shards"][2]["vectors"]["file"]
    with open(vec, "r+b") as f:  # flip bytes in the middle: same size, wrong contents
        f.seek(vec.stat().st_size // 2)
        f.write(b"\xff" * 64)
    sv = ShardedVectors.open(d)  # the cheap check (sizes) passes ...
    bad = sv.check(full=True)  # ... the checksums do not
    assert [p for p, _ in bad] == ["shard-00002"]
    assert "corrupted" in bad[0][1] and vec.name in bad[0][1]
    sv.close()

    with open(vec, "r+b") as f:  # a torn write: the file is shorter than the manifest says
        f.truncate(vec.stat().st_size - 100)
    with pytest.raises(ShardError, match="shard-00002.vec.*truncated or torn"):
        ShardedVectors.open(d)

    # its vectors written again from their source; its index rebuilt; the collection is whole again
    sv = ShardedVectors.open(d, check=False).lock()
    part = np.array_split(np.arange(N), SHARDS)[2]
    sv.replace_shard("shard-00002", ids[part], x[part])
    idx_file = d / "shard-00002.index"
    idx_file.write_bytes(idx_file.read_bytes()[:-10])  # a derived file torn too: rebuilt, not trusted
    sv.build(workers=1)
    assert sv.check(full=True) == []
    sv.close()
    sv = ShardedVectors.open(d)
    _, got = sv.search(q, 10, nprobe=16)
    _, want = _exact(x, ids, q)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= RECALL_FLOOR
    assert sorted(p.name for p in d.glob("merged-*")) == ["merged-2.index", "merged-2.ivfdata"]  # old generation gone


def test_bad_input_is_refused(tmp_path):
    sv = ShardedVectors.create(tmp_path / "s", 8, "ip", "float16").lock()
    sv.append(np.arange(10), np.ones((10, 8), np.float32))
    with pytest.raises(IndexError_, match="ids must increase"):
        sv.append(np.arange(5, 15), np.ones((10, 8), np.float32))
    with pytest.raises(IndexError_, match=r"expected \(3, 8\)"):
        sv.append(np.arange(20, 23), np.ones((3, 7), np.float32))
    with pytest.raises(IndexError_, match="not built yet"):
        sv.search(np.ones(8, np.float32))
    assert [p.name for p in (tmp_path / "s").glob(".*.tmp")] == []  # refused writes leave no temporaries
    with pytest.raises(IndexError_, match="no sharded vectors"):
        ShardedVectors.open(tmp_path / "nothing")
    with pytest.raises(IndexError_, match="already holds"):
        ShardedVectors.create(tmp_path / "s", 8)
