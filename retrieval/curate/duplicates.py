"""Groups of duplicate photos in an index: exact copies, near-duplicates (edited copies), similar shots (opt-in).

- **exact**: rows with the same content hash (sha256): one group per content.
- **near**: the same photo resized, recompressed, cropped, colour-adjusted, rotated by 90°, mirrored or with text
  added. Candidates come from the vector index (each photo's ``k`` nearest neighbours), never from all pairs, and
  are kept above a gate on the collection's own random-pair score distribution (its calibration); each candidate
  pair is then decided by the pair test of :mod:`retrieval.curate.pairtest` (geometry, rotation, overlap, pixels).
- **similar** (``similar=True``): pairs the geometry confirms (the same scene or object) that are not near-duplicates.

Each tier works on the keepers of the tier before it (a content with exact copies is its exact keeper in the near
tier; a near group is its keeper in the similar tier): a photo is a non-keeper in one group at most, and a group's
keeper is either kept or a non-keeper in the next tier, whose group's keeper then stands for it.

A group is the union of confirmed pairs, guarded against chaining: every member must pass the pair test against the
group's medoid (the member with the most confirmed pairs inside it); members that do not are split off and grouped
again among themselves. The keeper is the largest photo (width × height), then the oldest (EXIF DateTimeOriginal,
else the file's mtime), then the shortest path. Each other member carries its evidence against the keeper.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np

from retrieval.curate.pairtest import FeatureCache, PairResult, pair_test
from retrieval.errors import RetrieveError
from retrieval.index.calibration import for_search, pair_scores, percentile
from retrieval.names import json_name
from retrieval.presets import preset_of

TIERS = ("exact", "near", "similar")
K = 10  # nearest neighbours per photo searched for candidates (see module docstring)
GATE_PERCENTILE = 98.0  # candidate pairs score above this percentile of the collection's random pairs: at 99.9 a third
# of the edited copies in bench/duplicates.py's tuning split (crops, text) ranked 1-5 but scored under the gate; at 98
# every caltech/instance copy is a candidate, and the pair test, not the gate, keeps precision (1.000 there)
ALL_BELOW = 300  # a collection smaller than this tests every k-NN pair: its random pairs include its duplicates
# pairs in a share that moves a high percentile, and n·k tests are cheap anyway
# On a made set (Caltech photos, one edited copy of 210 of them), every copy but the turned ones is within rank 4 and
# above the 99.93rd percentile. A copy turned by 90° scores far lower (down to the 96th percentile, rank 27), so among
# the ROT_K nearest neighbours, the ROT_TOP best whose aspect ratio is the photo's turned (within ROT_ASPECT) and that
# score above the ROT_PERCENTILE are candidates too (a square photo's turned aspect is its own).
MEDOID_TRIES = 3  # members tried as a group's medoid (guarded_groups)
ROT_K = 100
ROT_TOP = 4
ROT_ASPECT = 0.01
ROT_PERCENTILE = 93.0
IVF_FROM = 20_000  # a flat index this large is searched through an inverted-file copy (_candidate_index)
IVF_NPROBE = 16
GIVE_UP = 3  # a candidate pair whose two photos each had this many candidates with no geometry at all (tested best
# first) gets the frame test alone: its copies, if any, were found already, but for a crop (the frame test misses it)
# that scores below as many unrelated photos. Most pair tests of a large collection are such look-alikes, and the
# frame test costs a fraction of the points'


@dataclass
class Member:
    row_id: int
    path: str  # as stored (retrieval/names.py ``shown`` for printing)
    size: int  # bytes
    width: int  # the photo's own, upright (from the file's header; the index's record when it cannot be read)
    height: int
    date: float  # unix seconds: EXIF DateTimeOriginal when present, else the file's mtime
    date_source: str  # "exif" | "mtime"
    keeper: bool = False
    score: float | None = None  # evidence of this member against the group's keeper (None on the keeper)
    percentile: float | None = None  # random-pair percentile of score
    inliers: int | None = None  # feature points on one alignment (None: the frames aligned without them, or exact)
    agreement: float | None = None  # the aligned pixels' agreement (pairtest.agreement), None for an exact copy


@dataclass
class Group:
    id: int
    tier: str
    members: list[Member]  # keeper first

    @property
    def keeper(self) -> Member:
        return self.members[0]


@dataclass
class Duplicates:
    groups: list[Group]
    photos: int
    pairs_checked: int
    seconds: float
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The ``--json`` shape; a path that is not UTF-8 also gets ``path_bytes`` (retrieval/names.py)."""
        return {"photos": self.photos, "pairs_checked": self.pairs_checked, "seconds": round(self.seconds, 3),
                "thresholds": self.thresholds,
                "groups": [{"id": g.id, "tier": g.tier, "members": [{**asdict(m), **json_name("path", m.path)}
                                                                    for m in g.members]}
                           for g in self.groups]}


def _file_facts(path: str) -> tuple[tuple[int, int] | None, float | None]:
    """The photo's own upright (width, height) and its EXIF DateTimeOriginal (else DateTime) as unix seconds, from the
    file's header (no pixels decoded); None for what cannot be read. The resolution is read here, not taken from the
    index: the index records the size a photo was decoded at for embedding, which for a large JPEG is a reduced one
    (a 4000 × 3000 photo and its 2000 × 1500 copy can both be recorded at 500 × 375)."""
    from PIL import Image

    size = when = None
    try:
        with Image.open(path) as img:
            exif = img.getexif()
            w, h = img.size
            size = (h, w) if exif.get(0x0112, 1) in (5, 6, 7, 8) else (w, h)  # turned by its EXIF orientation
            value = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
        if value:
            when = datetime.strptime(str(value).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").timestamp()
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass
    return size, when


def _exif_date(path: str) -> float | None:
    return _file_facts(path)[1]


def _member(row, width: int, height: int) -> Member:
    """A member from its index row (``FileRow``) and the resolution the index recorded, both corrected from the file's
    header when it can be read (:func:`_file_facts`); its date the EXIF one when present, else the file's mtime."""
    size, when = _file_facts(row.path)
    if size is not None:
        width, height = size
    source = "exif"
    if when is None:
        source = "mtime"
        when = row.mtime_ns / 1e9
    return Member(int(row.id), row.path, int(row.size), int(width or 0), int(height or 0), float(when), source)


def keeper_order(m: Member) -> tuple:
    """Sort key, keeper first: largest resolution, then oldest, then shortest path."""
    return (-(m.width * m.height), m.date, len(m.path), m.path)


class _Tester:
    """Pair tests, each photo's features computed once while it has pairs left to test (in a thread pool: OpenCV
    releases the GIL) and dropped after its last one, or when they would hold more than ``KEEP`` bytes (the least recently
    used first), so memory follows the pairs in flight, not the collection."""

    CHUNK = 64  # pairs tested together (in the pool) between two looks at what the confirmed pairs connect
    KEEP = 1 << 30  # bytes of photos' features held at most (about 7 000 photos: bench/duplicates.py's 10 000-photo
    # set, copies among most of its photos, decodes each photo 1.5 times, against 2.8 times with 3 000 photos held)

    def __init__(self, paths: dict[int, str], threads: int):
        self.paths = paths
        self.cache = FeatureCache(self.KEEP)
        self.results: dict[tuple[int, int], PairResult] = {}
        self.threads = threads
        self.confirmed: set[int] = set()  # photos in a near pair

    map = map  # the pool's while running(), else the builtin

    @contextlib.contextmanager
    def running(self):
        """The thread pool (``self.map``) for what runs inside, with OpenCV on one thread meanwhile: the pool's
        threads are the parallelism, OpenCV's own would oversubscribe the cores."""
        import cv2

        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with (ThreadPoolExecutor(self.threads) if self.threads > 1 else contextlib.nullcontext()) as pool:
                self.map = pool.map if pool is not None else map
                yield self
        finally:
            self.map = map
            cv2.setNumThreads(threads)

    def test_all(self, pairs, frame_only=frozenset()) -> list[PairResult]:
        """``pairs`` tested in the pool (each once; results kept); those in ``frame_only`` by the frame test alone."""
        return list(self.map(lambda p: self.test(*p, points=p not in frame_only), pairs))

    def test(self, a: int, b: int, points: bool = True) -> PairResult:
        key = (a, b) if a < b else (b, a)
        r = self.results.get(key)
        if r is None or (r.partial and points):
            pa, pb = self.cache.get(key[0], self.paths[key[0]]), self.cache.get(key[1], self.paths[key[1]])
            r = pair_test(pa, pb, points) if pa is not None and pb is not None \
                else PairResult(False, False, 0, why="unreadable")
            self.results[key] = r
        return r

    def test_unconnected(self, pairs: list[tuple[int, int]], progress=None) -> list[tuple[int, int]]:
        """Test ``pairs`` (best first) except those whose two photos the near pairs confirmed so far already connect:
        those are returned (untested). A group of n copies then costs about n - 1 tests, not n(n - 1)/2; the medoid
        guard and the keeper's evidence test what they need afterwards. Each chunk holds pairs that would not close
        a loop among themselves if all were confirmed (one that would waits for the chunk's results)."""
        parent: dict[int, int] = {}

        def find(x):
            while parent.get(x, x) != x:
                parent[x] = parent.get(parent[x], parent[x])
                x = parent[x]
            return x

        left: dict[int, int] = {}
        for p in pairs:
            for i in p:
                left[i] = left.get(i, 0) + 1
        skipped: list[tuple[int, int]] = []
        fails: dict[int, int] = {}  # tests per photo that found no geometry
        frame_only: set[tuple[int, int]] = set()  # pairs tested by the frame test alone (see GIVE_UP)
        waiting: list[tuple[int, int]] = []  # pairs that waited for the last chunk's results
        pos = done = 0
        while waiting or pos < len(pairs):
            batch: list[tuple[int, int]] = []
            joined: dict[int, int] = {}

            def top(x):  # the root if every pair of the chunk so far were confirmed
                x = find(x)
                while joined.get(x, x) != x:
                    x = joined[x]
                return x

            def consider(p) -> bool:  # skip, wait or take p; True when the chunk is full
                nonlocal done
                ra, rb = find(p[0]), find(p[1])
                if ra == rb:
                    skipped.append(p)
                    self._done(p, left)
                    done += 1
                    return False
                if min(fails.get(p[0], 0), fails.get(p[1], 0)) >= GIVE_UP:
                    frame_only.add(p)
                ta, tb = top(ra), top(rb)
                if ta == tb:
                    wait.append(p)
                    return False
                joined[max(ta, tb)] = min(ta, tb)
                batch.append(p)
                return len(batch) == self.CHUNK

            wait: list[tuple[int, int]] = []
            for n, p in enumerate(waiting):
                if consider(p):
                    wait.extend(waiting[n + 1:])
                    break
            while len(batch) < self.CHUNK and pos < len(pairs):
                consider(pairs[pos])
                pos += 1
            waiting = wait
            photos = [i for i in dict.fromkeys(i for p in batch for i in p) if i not in self.cache]
            list(self.map(lambda i: self.cache.get(i, self.paths[i]), photos))
            for p, r in zip(batch, self.test_all(batch, frame_only)):
                if r.near:
                    ra, rb = find(p[0]), find(p[1])
                    parent[max(ra, rb)] = min(ra, rb)
                    self.confirmed.update(p)
                elif not r.similar and not r.partial:  # no geometry at all: not even another photo of the same thing
                    for i in p:
                        fails[i] = fails.get(i, 0) + 1
                self._done(p, left)
            done += len(batch)
            if progress:
                progress(done, len(pairs))
        return skipped

    def _done(self, p: tuple[int, int], left: dict[int, int]) -> None:
        for i in p:
            left[i] -= 1
            if not left[i] and i not in self.confirmed:  # a confirmed one's are likely asked for again (groups)
                self.cache.drop(i)


def _components(nodes, edges) -> list[list[int]]:
    parent = {n: n for n in nodes}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    out: dict[int, list[int]] = {}
    for n in nodes:
        out.setdefault(find(n), []).append(n)
    return [sorted(c) for c in out.values() if len(c) > 1]


def guarded_groups(edges: dict[tuple[int, int], float], passes: Callable[[int, int], bool],
                   guard: bool = True, untested: dict[tuple[int, int], float] | None = None,
                   map_=map) -> list[list[int]]:
    """Groups from confirmed pairs (``edges``: pair → score): connected components, each member checked against the
    component's medoid: of the MEDOID_TRIES members with the most confirmed or untested pairs in it (then the highest
    sum of their scores, then the smallest id), the first that passes with every member, else the one that passes
    with the most (untested pairs are not all confirmed: the first alone split off copies); members that fail are
    grouped again among themselves, over their confirmed pairs and the ``untested`` candidate pairs among them that
    pass (pairs left untested because confirmed pairs already connected them). ``guard=False``: plain connected components (a chain of look-alikes merges; the tests show the
    difference). ``map_``: how the components are worked through (a pool's map runs them in parallel)."""
    nodes = sorted({i for e in edges for i in e})
    near: dict[int, list[tuple[int, float]]] = {}  # each photo's confirmed and untested pairs: (other, score)
    for (a, b), v in itertools.chain(edges.items(), (untested or {}).items()):
        near.setdefault(a, []).append((b, v))
        near.setdefault(b, []).append((a, v))
    return [g for gs in map_(lambda comp: _guarded(comp, edges, near, passes, guard), _components(nodes, edges))
            for g in gs]


def _guarded(comp: list[int], edges, near, passes, guard: bool) -> list[list[int]]:
    """One component's groups (guarded_groups)."""
    out = []
    todo = [comp]
    while todo:
        comp = todo.pop()
        if not guard or len(comp) <= 2:
            out.append(comp)
            continue
        members = set(comp)
        degree = {i: (sum(1 for j, _ in near[i] if j in members), sum(v for j, v in near[i] if j in members))
                  for i in comp}
        keep: list[int] = []
        for medoid in sorted(comp, key=lambda i: (-degree[i][0], -degree[i][1], i))[:MEDOID_TRIES]:
            kept = [i for i in comp if i == medoid or passes(medoid, i)]
            if len(kept) > len(keep):
                keep = kept
            if len(keep) == len(comp):
                break
        kept_set = set(keep)
        rest = [i for i in comp if i not in kept_set]
        if len(keep) > 1:
            out.append(sorted(keep))
        if len(rest) > 1:
            rest_set = set(rest)
            sub = {(i, j): v for i in rest for j, v in near[i] if i < j and j in rest_set
                   and ((i, j) in edges or passes(i, j))}
            todo.extend(_components(sorted({i for e in sub for i in e}), sub))
    return out


def _candidate_index(store):
    """The index the candidates' nearest neighbours are searched in: the store's own, or, when that one is exact
    (flat) and holds IVF_FROM vectors or more, an inverted-file copy of it (IVF_NPROBE of 4·√n lists searched, the
    distances exact): every photo searched against every other is quadratic, 100 000 photos a quarter of an hour on
    two cores, and the neighbours a near-duplicate needs are the closest ones, which an inverted file finds."""
    import faiss

    index = store.faiss_index()
    n = index.ntotal
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if n < IVF_FROM or not isinstance(inner, (faiss.IndexFlatIP, faiss.IndexFlatL2)):
        return index
    d, metric = index.d, index.metric_type
    nlist = int(4 * np.sqrt(n))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlat(d, metric), d, nlist, metric)
    ivf.train(np.ascontiguousarray(store.transform(store.training_sample(40 * nlist)), np.float32))
    for ids, raw in store.iter_vectors():
        ivf.add_with_ids(np.ascontiguousarray(store.transform(raw), np.float32), ids.astype(np.int64))
    ivf.nprobe = IVF_NPROBE
    return ivf


def find_duplicates(store, *, similar: bool = False, k: int = K, progress=None, guard: bool = True) -> Duplicates:
    """The duplicate groups of an open index (read-only is enough); see the module docstring.

    ``progress(done, total)``: called as the candidate pairs are tested (``total`` pairs). ``guard``: the medoid
    guard (always on outside tests). An exact copy's evidence is its score (no local features are compared)."""
    from retrieval.models.graphs import inference_threads

    t0 = time.perf_counter()
    settings = store.settings
    if preset_of(settings).per_face:
        raise RetrieveError(f"{store.where} is a faces index (one row per face); duplicates needs a photo index: "
                            "`retrieve index PHOTOS --index DIR`")
    photos = store.count()
    cal = for_search(store)
    metric = store.metric

    # 1. exact: the same bytes
    files = store.files()
    by_hash: dict[str, list[int]] = {}
    for f in files:
        by_hash.setdefault(f.sha256, []).append(f.id)
    exact = [sorted(ids) for ids in by_hash.values() if len(ids) > 1]
    by_id = {f.id: f for f in files}
    dims = {int(i): (w or 0, h or 0) for i, w, h in store.query("SELECT id, width, height FROM images")}
    members_of: dict[int, Member] = {}

    def member(i: int) -> Member:
        if i not in members_of:
            members_of[i] = _member(by_id[i], *dims[i])
        return members_of[i]

    # below, a content with exact copies is one photo: its exact group's keeper
    first_of = {i: min(ids, key=lambda j: keeper_order(member(j))) for ids in exact for i in ids}

    # 2. candidates: k nearest neighbours above the gate, and turned look-alikes above the lower gate
    def gate_at(q: float) -> float:
        return float(np.interp(q, np.linspace(0, 100, len(cal.random)), cal.random)) if cal else -np.inf

    gate, rot_gate = gate_at(GATE_PERCENTILE), gate_at(ROT_PERCENTILE)
    if photos < ALL_BELOW:
        gate = rot_gate = -np.inf
    aspect = {i: (w or 1) / (h or 1) for i, (w, h) in dims.items()}
    pairs: dict[tuple[int, int], float] = {}
    index = _candidate_index(store) if photos >= 2 else None
    live = set(aspect)
    for ids, raw in (store.iter_vectors() if index is not None else ()):
        x = np.ascontiguousarray(store.transform(raw), np.float32)
        d, nb = index.search(x, min(max(k, ROT_K) + 1, index.ntotal))
        for own, ds, ns in zip(ids, d, nb):
            own = int(own)
            a = first_of.get(own, own)
            rank = turned = 0
            for dist, other in zip(ds, ns):
                other = int(other)
                if other < 0 or other == own or other not in live:
                    continue
                rank += 1
                b = first_of.get(other, other)
                score = float(dist) if metric.similarity else -float(dist)
                if a == b:
                    continue
                take = rank <= k and score >= gate
                if not take and score >= rot_gate and turned < ROT_TOP \
                        and abs(aspect[own] * aspect[other] - 1) < ROT_ASPECT:
                    take = True
                    turned += 1
                if take:
                    key = (min(a, b), max(a, b))
                    pairs[key] = max(pairs.get(key, -np.inf), score)

    # 3. the pair test on the candidates
    paths = {f.id: f.path for f in files}
    tester = _Tester(paths, inference_threads())
    with tester.running():
        skipped = tester.test_unconnected(sorted(pairs, key=lambda p: (-pairs[p], p)), progress)
        near_edges = {p: pairs[p] for p, r in tester.results.items() if r.near}
        similar_edges = {p: pairs[p] for p, r in tester.results.items() if r.similar and not r.near}
        near_groups = guarded_groups(near_edges, lambda a, b: tester.test(a, b).near, guard,
                                     {p: pairs[p] for p in skipped}, tester.map)
        list(tester.map(member, {i for ids in near_groups for i in ids}))  # file headers read in the pool too
        ordered = [sorted(ids, key=lambda i: keeper_order(member(i))) for ids in near_groups]
        tester.test_all([(i, ids[0]) for ids in ordered for i in ids[1:]])  # each member against its keeper

    # 4. groups
    vec_cache: dict[int, np.ndarray] = {}

    def vector(i: int) -> np.ndarray:
        if i not in vec_cache:
            for ids_, raw in store.vectors_of([i]):
                vec_cache[i] = store.transform(raw)[0]
        return vec_cache[i]

    groups: list[Group] = []

    def make(tier: str, ids: list[int]) -> None:
        ms = sorted((member(i) for i in ids), key=keeper_order)
        out = []
        for n, m in enumerate(ms):
            m = Member(**{**asdict(m), "keeper": n == 0})
            if n:
                s = float(pair_scores(vector(m.row_id)[None], vector(ms[0].row_id)[None], metric)[0])
                m.score = s
                m.percentile = float(percentile(cal.random, s)) if cal else None
                if tier != "exact":
                    r = tester.test(m.row_id, ms[0].row_id)
                    m.inliers = r.inliers if r.aligned == "points" else None
                    m.agreement = round(float(r.agree), 3)
            out.append(m)
        groups.append(Group(0, tier, out))

    for ids in exact:
        make("exact", ids)
    for ids in near_groups:
        make("near", ids)
    if similar:  # over the near groups' keepers (module docstring)
        keeper_of = {m.row_id: g.keeper.row_id for g in groups if g.tier == "near" for m in g.members}
        sim: dict[tuple[int, int], float] = {}
        for (a, b), v in similar_edges.items():
            a, b = keeper_of.get(a, a), keeper_of.get(b, b)
            if a != b:
                sim[(min(a, b), max(a, b))] = max(v, sim.get((min(a, b), max(a, b)), v))
        for ids in guarded_groups(sim, lambda a, b: tester.test(a, b).similar, guard):
            make("similar", ids)
    groups.sort(key=lambda g: (-len(g.members), TIERS.index(g.tier), g.keeper.path))
    for n, g in enumerate(groups, 1):
        g.id = n
    from retrieval.curate import pairtest as pt

    thresholds = {"exact": "same sha256",
                  "candidates": {"k": k, "gate_random_percentile": GATE_PERCENTILE,
                                 "gate_score": gate if np.isfinite(gate) else None,
                                 "turned": {"k": ROT_K, "top": ROT_TOP, "aspect": ROT_ASPECT,
                                            "gate_random_percentile": ROT_PERCENTILE,
                                            "gate_score": rot_gate if np.isfinite(rot_gate) else None},
                                 "every_knn_pair_below": ALL_BELOW},
                  "near": {"side": pt.SIDE, "min_agree": pt.MIN_AGREE,
                           "frame": {"aspect": pt.FRAME_ASPECT, "thumbnail_ncc": pt.FRAME_NCC,
                                     "min_agree_small": [pt.SMALL_SIDE, pt.FRAME_AGREE_SMALL]},
                           "points": {"min_inliers": pt.NEAR_INLIERS, "angle_deg": pt.ANGLE_DEG,
                                      "min_cover": pt.MIN_COVER, "min_cover_both": pt.MIN_COVER_BOTH,
                                      "min_agree_small": [pt.SMALL_SIDE, pt.MIN_AGREE_SMALL],
                                      "after_failures": GIVE_UP}},
                  "similar": {"min_inliers": pt.MIN_INLIERS} if similar else None}
    return Duplicates(groups, photos, len(tester.results), time.perf_counter() - t0, thresholds)
