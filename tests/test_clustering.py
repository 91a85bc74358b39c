"""retrieval/curate/clustering.py on made vectors with known people: the partition found, the guard against chaining
(and the chain one cluster without it), a face moved to the person it fits best, determinism, the incremental
assignment (a stranger joins no one)."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.curate.clustering import MARGIN, assign_to_people, centroids, cluster_faces

SAME = 0.5  # the faces preset's threshold on the centred cosine; links at SAME + MARGIN


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def people(k=8, seed=0, strangers=5, noise=0.04, d=128):
    """k people (5..14 faces each) around random centres on the sphere, and ``strangers`` lone faces: (x, truth)
    with truth -1 for a stranger."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(k, d)))
    y = np.repeat(np.arange(k), rng.integers(5, 15, size=k))
    x = unit(centres[y] + rng.normal(scale=noise, size=(len(y), d)))
    x = np.vstack([x, unit(rng.normal(size=(strangers, d)))])
    y = np.concatenate([y, -np.ones(strangers, int)])
    order = rng.permutation(len(y))
    return x[order], y[order]


def partition(labels, y):
    """The partition as a set of frozensets of indices (strangers are their own)."""
    return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels)}


def truth_partition(y):
    parts = {frozenset(np.flatnonzero(y == v).tolist()) for v in np.unique(y[y >= 0])}
    return parts | {frozenset([i]) for i in np.flatnonzero(y < 0).tolist()}


def chain(n=12, width=5, d=128):
    """Faces along a path: face i covers dimensions i..i+width-1, so neighbours score 0.8, faces ``width`` apart 0."""
    x = np.zeros((n, d), np.float32)
    for i in range(n):
        x[i, i:i + width] = 1
    return unit(x)


@pytest.mark.parametrize("method", ["guarded", "whispers"])
def test_made_people_are_found_exactly(method):
    x, y = people()
    s = x @ x.T
    assert s[(y[:, None] == y[None]) & (y[:, None] >= 0)].min() > SAME + MARGIN  # the test's premise
    labels = cluster_faces(x, SAME, method)
    assert labels.shape == (len(x),) and labels.min() == 0
    assert partition(labels, y) == truth_partition(y)
    sizes = np.bincount(labels)
    assert list(sizes) == sorted(sizes, reverse=True)  # the largest person first, labels 0..m-1


def test_chain_of_look_alikes_is_not_one_person():
    x = chain()
    s = x @ x.T
    assert s[0, -1] == 0 and np.all(np.diag(s, 1) >= SAME + MARGIN)  # each within the threshold of the next
    plain = cluster_faces(x, SAME, "whispers")
    assert len(set(plain)) == 1  # without the guard: one "person" whose two ends do not look alike at all
    labels = cluster_faces(x, SAME)  # the default: guarded
    assert labels[0] != labels[-1]
    for v in np.unique(labels):
        idx = np.flatnonzero(labels == v)
        assert s[np.ix_(idx, idx)].min() > 0  # no two strangers in one person
        for i in idx:  # each member passes the link test against the centroid of the others
            others = idx[idx != i]
            if len(others):
                assert x[i] @ unit(x[others].sum(0)) >= SAME + MARGIN


def test_a_face_goes_to_the_person_it_fits_best():
    """Whispers counts votes, so a face with weaker links to a larger person joins it; the guard moves it to the
    person whose centroid it fits best (what assign_to_people would do)."""
    rng = np.random.default_rng(3)
    d = 128
    a, b = unit(rng.normal(size=(2, d)))
    big = unit(a + rng.normal(scale=0.02, size=(8, d)))  # 8 faces of person A
    small = unit(b + rng.normal(scale=0.02, size=(3, d)))  # 3 faces of person B
    face = unit(0.62 * a + 0.78 * b)
    x = np.vstack([big, small, face[None]])
    s = x @ x.T
    assert s[-1, :8].min() >= SAME + MARGIN and s[-1, 8:11].min() > s[-1, :8].max()  # premise: linked to both
    assert s[-1, :8].sum() > s[-1, 8:11].sum()  # ... but A's votes outweigh B's
    plain = cluster_faces(x, SAME, "whispers")
    guarded = cluster_faces(x, SAME)
    assert plain[-1] == plain[0]  # whispers: with A
    assert guarded[-1] == guarded[8] and guarded[-1] != guarded[0]  # guarded: with B


def test_deterministic():
    x, _ = people(seed=5)
    for method in ("guarded", "whispers"):
        a = cluster_faces(x, SAME, method, seed=0)
        b = cluster_faces(x.copy(), SAME, method, seed=0)
        assert np.array_equal(a, b)
    x = chain(16)
    assert np.array_equal(cluster_faces(x, SAME), cluster_faces(x, SAME))


def test_assign_to_people():
    x, y = people(seed=1, strangers=0)
    c = centroids(x, y)
    assert np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    rng = np.random.default_rng(9)
    new_faces = unit(c[[2, 0, 5]] + rng.normal(scale=0.04, size=(3, c.shape[1])))
    stranger = unit(rng.normal(size=(1, c.shape[1])))
    got = assign_to_people(np.vstack([new_faces, stranger]), c, SAME)
    assert got.tolist() == [2, 0, 5, -1]
    # between the threshold and the link test: no one (the same test the clustering links with)
    e = np.zeros((2, 128), np.float32)
    e[0, 0] = e[1, 1] = 1
    between = unit(np.array([[SAME + MARGIN / 2, np.sqrt(1 - (SAME + MARGIN / 2) ** 2)] + [0] * 126]))
    assert assign_to_people(between, e[:1], SAME).tolist() == [-1]
    assert assign_to_people(between, e[:1], SAME, margin=0.0).tolist() == [0]
    assert assign_to_people(new_faces, np.zeros((0, 128), np.float32), SAME).tolist() == [-1, -1, -1]


def test_incremental_run_agrees_with_clustering_all():
    x, y = people(seed=2)
    full = cluster_faces(x, SAME)
    half = np.arange(len(x)) % 2 == 0
    first = cluster_faces(x[half], SAME)
    to = assign_to_people(x[~half], centroids(x[half], first), SAME)
    labels = np.full(len(x), -1)
    labels[half] = first
    rest = np.flatnonzero(~half)
    labels[rest] = to
    left = rest[to < 0]
    labels[left] = cluster_faces(x[left], SAME) + labels.max() + 1
    assert partition(labels, y) == partition(full, y) == truth_partition(y)


def test_edges():
    assert cluster_faces(np.zeros((0, 128), np.float32), SAME).shape == (0,)
    assert cluster_faces(unit(np.ones((1, 128))), SAME).tolist() == [0]
    with pytest.raises(ValueError, match="unknown clustering method 'kmeans'"):
        cluster_faces(unit(np.ones((2, 128))), SAME, "kmeans")
