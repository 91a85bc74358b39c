"""Faces into people: clustering the face rows of a faces index, and assigning new faces to existing people.

Vectors are in the index's space (``store.transform``: centred on the fixed mean face, L2-normalised), so ``x @ x.T``
is the score the faces preset ranks by and ``same`` its calibrated same-person threshold. That threshold decides one
pair; grouping many faces multiplies its false matches, so two faces link only at ``same + MARGIN`` (the link test).
Chinese whispers labels the graph of links (deterministic: a seeded visiting order). It counts votes, so a chain of
look-alikes (each face linked to the next, the ends strangers) can become one person, and a face with many weak
links can join the wrong one. The guard (the default method) therefore keeps a face in a person only while it
passes the link test against the centroid of the person's other members (their mean, renormalised) and links to at
least SUPPORT of them, and moves a face to the person whose centroid it fits best; a face that fits no one stands
alone. New faces join people by the same centroid test (:func:`assign_to_people`), so a run and an incremental run
answer alike. Numpy only. The constants and the comparison with dlib's Chinese whispers and HDBSCAN:
bench/people.py.
"""
from __future__ import annotations

import numpy as np

METHODS = ("guarded", "whispers")  # guarded: whispers + the centroid/support guard (the default); whispers: no guard
DEFAULT_METHOD = "guarded"
MARGIN = 0.05  # the link test is score >= same + MARGIN (bench/people.py: chosen on the tuning identities)
NEIGHBOURS = 64  # links kept per face (its strongest passing ones): bounds the graph on large collections
SUPPORT = 0.5  # the guard: a face must link to at least this share of its person's other members
BLOCK = 4096  # rows per block of the score matrix
CANDIDATES = 5  # other people a face may move to per round (its best-scoring centroids)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def same_person_graph(x: np.ndarray, same: float, neighbours: int = NEIGHBOURS) -> list[dict[int, float]]:
    """Each face's links: {other face: score} for the (at most ``neighbours`` strongest) other faces whose score
    passes ``same``; symmetric (a link kept by either end is kept by both)."""
    x = _unit(x)
    n = len(x)
    links: list[dict[int, float]] = [dict() for _ in range(n)]
    for a in range(0, n, BLOCK):
        s = x[a:a + BLOCK] @ x.T
        for r in range(len(s)):
            i = a + r
            row = s[r]
            row[i] = -np.inf
            cand = np.flatnonzero(row >= same)
            if len(cand) > neighbours:
                cand = cand[np.argsort(-row[cand], kind="stable")[:neighbours]]
            for j in cand.tolist():
                w = float(row[j])
                links[i][j] = w
                links[j][i] = w
    return links


def chinese_whispers(links: list[dict[int, float]], seed: int = 0, rounds: int = 100) -> np.ndarray:
    """Chinese whispers (Biemann 2006) on weighted links: every face starts as its own label and, visiting faces
    in a seeded order each round, takes the label with the largest summed link weight among its neighbours (ties:
    the smaller label); stops when a round changes nothing."""
    n = len(links)
    labels = np.arange(n)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        changed = 0
        for i in rng.permutation(n).tolist():
            if not links[i]:
                continue
            votes: dict[int, float] = {}
            for j, w in links[i].items():
                lj = int(labels[j])
                votes[lj] = votes.get(lj, 0.0) + w
            best = min(votes, key=lambda lab: (-votes[lab], lab))
            if best != labels[i]:
                labels[i] = best
                changed += 1
        if not changed:
            break
    return labels


def centroids(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One row per label 0..max: the mean of its members, renormalised (a label with no member: zeros)."""
    x = _unit(x)
    m = int(labels.max()) + 1 if len(labels) else 0
    c = np.zeros((m, x.shape[1]), np.float32)
    np.add.at(c, labels, x)
    return _unit(c) if m else c


def assign_to_people(x_new: np.ndarray, centroids: np.ndarray, same: float, margin: float = MARGIN) -> np.ndarray:
    """For each new face, the index of the existing person it joins: the best-scoring centroid (rows renormalised)
    whose score passes the link test (``same + margin``, as :func:`cluster_faces`); -1 where none does."""
    same = same + margin
    x_new = _unit(np.atleast_2d(x_new))
    if len(centroids) == 0 or len(x_new) == 0:
        return np.full(len(x_new), -1, np.int64)
    s = x_new @ _unit(centroids).T
    best = np.argmax(s, axis=1)
    return np.where(s[np.arange(len(x_new)), best] >= same, best, -1).astype(np.int64)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels 0..m-1, the largest person first (ties: the one whose first face comes first)."""
    uniq, first, inv, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda k: (-counts[k], first[k]))
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(len(uniq))
    return rank[inv.reshape(-1)]


def _support(x: np.ndarray, i: int, members: np.ndarray, same: float) -> float:
    """The share of ``members`` (face ``i`` left out) that face ``i`` links to."""
    members = members[members != i]
    return float((x[members] @ x[i] >= same).mean()) if len(members) else 1.0


def _members(labels: np.ndarray, m: int) -> list[np.ndarray]:
    """The faces of each label 0..m-1 (ascending)."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=m))[:-1])


def _best_others(x: np.ndarray, c: np.ndarray, labels: np.ndarray, top: int = CANDIDATES):
    """Each face's ``top`` best-scoring centroids other than its own person's, best first: (indices, scores),
    computed in blocks (n × people scores at once would not fit a large collection)."""
    n, top = len(x), min(top, max(len(c) - 1, 1))
    idx = np.zeros((n, top), np.int64)
    val = np.full((n, top), -np.inf, np.float32)
    for a in range(0, n, BLOCK):
        sc = x[a:a + BLOCK] @ c.T
        sc[np.arange(len(sc)), labels[a:a + BLOCK]] = -np.inf
        part = np.argpartition(-sc, top - 1, axis=1)[:, :top] if sc.shape[1] > top else np.tile(
            np.arange(sc.shape[1]), (len(sc), 1))
        ps = np.take_along_axis(sc, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[a:a + BLOCK, :part.shape[1]] = np.take_along_axis(part, order, 1)
        val[a:a + BLOCK, :part.shape[1]] = np.take_along_axis(ps, order, 1)
    return idx, val


def guard(x: np.ndarray, labels: np.ndarray, same: float, support: float = SUPPORT, rounds: int = 50) -> np.ndarray:
    """Refine a labelling until every face sits with the person it fits best. A face fits a person when its score
    with the centroid of the person's other members passes ``same`` and it links to at least ``support`` of them.
    Each round: a face that does not fit its own person (the worst one of each person per round, so that a good
    person never dissolves at once) leaves for the best other person it fits, else stands alone; a face that fits
    another person's centroid better than its own moves there (what :func:`assign_to_people` would do with it).
    Stops when nothing moves."""
    x = _unit(x)
    labels = _renumber(labels)
    n = len(x)
    for _ in range(rounds):
        m = int(labels.max()) + 1
        sums = np.zeros((m, x.shape[1]), np.float32)
        np.add.at(sums, labels, x)
        sizes = np.bincount(labels, minlength=m)
        c = _unit(sums)
        own = np.einsum("ij,ij->i", x, _unit(sums[labels] - x))
        own[sizes[labels] == 1] = -np.inf
        members = _members(labels, m)
        match = np.ones(n)
        for lab in np.flatnonzero(sizes > 1).tolist():
            idx = members[lab]
            sc = x[idx] @ x[idx].T
            match[idx] = ((sc >= same).sum(1) - 1) / (len(idx) - 1)
        cand, cand_s = _best_others(x, c, labels)
        fits = (sizes[labels] > 1) & (own >= same) & (match >= support)
        bad = np.flatnonzero((sizes[labels] > 1) & ~fits)
        worst: dict[int, int] = {}
        for i in bad.tolist():
            lab = int(labels[i])
            if lab not in worst or (own[i] + match[i], -i) < (own[worst[lab]] + match[worst[lab]], -worst[lab]):
                worst[lab] = i
        moves: dict[int, int] = {}  # face -> new label (-1: alone)
        for i in sorted(worst.values()):
            moves[i] = -1
        # better elsewhere: a face alone, or one that fits, whose best other centroid beats its own
        better = (cand_s[:, 0] >= same) & (cand_s[:, 0] > own) & ((sizes[labels] == 1) | fits)
        for i in np.flatnonzero(better).tolist():
            if i in moves:
                continue
            for k, sk in zip(cand[i].tolist(), cand_s[i].tolist()):
                if sk < same or sk <= own[i]:
                    break
                if _support(x, i, members[k], same) >= support:
                    moves[i] = k
                    break
        for i in list(moves):  # the faces that leave: the best other person they fit, else alone
            if moves[i] != -1:
                continue
            for k, sk in zip(cand[i].tolist(), cand_s[i].tolist()):
                if sk < same:
                    break
                if _support(x, i, members[k], same) >= support:
                    moves[i] = k
                    break
        if not moves:
            break
        nxt = m
        for i, k in sorted(moves.items()):
            if k == -1:
                labels[i], nxt = nxt, nxt + 1
            else:
                labels[i] = k
        labels = _renumber(labels)
    return labels


def cluster_faces(x: np.ndarray, same: float, method: str = DEFAULT_METHOD, *, seed: int = 0,
                  margin: float = MARGIN, support: float = SUPPORT) -> np.ndarray:
    """People among the faces ``x`` (n × d, in the index's space): labels 0..m-1 (n,), the largest person first; a
    face that matches no one is a person of its own (no -1). ``same``: the index's same-person threshold on the
    score; faces link at ``same + margin``. ``method``: "guarded" (Chinese whispers on the links, then the guard
    against chaining) or "whispers" (no guard). Deterministic for a given ``seed``."""
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r} (known: {', '.join(METHODS)})")
    x = np.asarray(x, np.float32)
    if len(x) == 0:
        return np.zeros(0, np.int64)
    same = same + margin
    labels = chinese_whispers(same_person_graph(x, same), seed=seed)
    if method == "guarded":
        return guard(x, labels, same, support)
    return _renumber(labels)
