"""Visual words: an inverted file over the collection's local descriptors, a second candidate stage.

The global embedding ranks whole photos; a phone photo of a product in clutter can rank its own clean
catalogue image beyond any shortlist it gives, although the two share hundreds of SIFT matches. The
classic mobile-visual-search answer is a *bag of visual words* (Sivic & Zisserman 2003; Nistér &
Stewénius 2006): every RootSIFT descriptor (retrieval/match/verify.py) is quantised to its nearest word in a
two-level vocabulary tree (faiss k-means, ``k1 × k2`` words, trained on a sample of the collection's
descriptors), each image becomes a bag of words, and
an inverted file (word → images) scores a query against the whole collection in time proportional to
the postings of its words, not to the collection. The score is ASMK* (Tolias, Avrithis & Jégou, "To aggregate
or not to aggregate: selective match kernels for image search", ICCV 2013): each image keeps, per word, the
sign of the sum of its descriptors' residuals from the word's centre (64 bits, in the matching subspace), and
a word shared by query and image counts idf × σ(1 − 2h/64), with h the Hamming distance of the two signatures
and σ(u) = u³ for u > 0, else 0 — two descriptors in one word count only when they also agree within it, and
bursts of similar descriptors count once. On the instance set it puts the catalogue image in a phone photo's
top 5 for 94 % of the photos against 21 % for tf-idf bags of the same words and 36 % for the global
embedding (bench/results/quality.md). :class:`retrieval.match.search.Searcher` merges its top
candidates with the global shortlist before geometric verification.

**Stored with the index.** ``words.npz`` in the index directory holds the vocabulary and each row's
words, keyed by row id *and content hash*; ``words.json`` is its fingerprint (format, SIFT settings,
vocabulary shape, row count, file size), written after it, both atomically (temporary file, fsync,
rename). The file is a cache derived from the rows and the local features (cached per content hash):
on every open it is reconciled with the rows (ids missing, gone, or whose content changed), and a file
that is missing, damaged or described by another fingerprint is rebuilt from them — never searched as it
is. The indexer brings it up to date at the end of every run; a search writes it only when it can take the
writer lock without waiting (:func:`save_as_writer`). What it holds is the inverted file (format 3): each
word's postings, a row position (int32) and a signature (uint64) each, 12 bytes, from which the rows' bags and
the postings' weights follow, with each row's norm and posting count and a CRC-32 of each word's postings. The
postings are memory-mapped and each word is checked against its CRC-32 as it is first read
(:meth:`WordIndex._check_words`): a fresh process's query reads the pages of its own words, not the file (873 MB at
100 k images); a writer checks every word, as it copies the unchanged rows' postings into the next file or, when
nothing changed, all of them; ``retrieve check`` reads the file whole. The file is written by
retrieval/match/wordfile.py, with bounded memory: the new rows' bags quantised many images at a time, the
postings inverted a bucket of words at a time. Format 2 also kept the bags and the weights (30 bytes a posting);
its files, and format-3 files without the counts or checksums, are still read (whole), and written again by the
next writer.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from retrieval.match import wordfile
from retrieval.match.wordfile import FORMAT, META_NAME, WORDS_NAME, DamagedWords, release

if TYPE_CHECKING:
    from retrieval.index.store import IndexStore
    from retrieval.match.verify import LocalFeatures, Verifier

READ_FORMATS = (2, 3)
MAPPED = ("post_img", "post_sig")  # memory-mapped by a search: the postings, 12 bytes each (the rest: a few MB)
SCRATCH_PREFIX = "retrieve-words."  # a search's private build under $TMPDIR (retrieval/scratch.py)
TEMPORARY_GLOBS = (f".{WORDS_NAME}.*.tmp", f".{META_NAME}.*.tmp")
BRANCH_MAX = 128  # words = branch²: 16,384 for a large collection
TRAIN_DESCRIPTORS = 300_000  # about this many descriptors (a seeded sample) train the vocabulary; a collection
# beyond 6 000 rows gives what its largest vocabulary needs, BRANCH_MAX² × TRAIN_PER_WORD (327 680; _sample)
TRAIN_PER_WORD = 20  # the branch grows with the training sample: branch² ≤ sample / this
TRAIN_BLOCK = 32_768  # sample rows at a time in the training's dense products (bounds their memory)
RETRAIN_GROWTH = 4  # the vocabulary is trained again when the collection has grown this much since
STOP_SHARE = 0.15  # query words in more than this share of the images (and more than STOP_MIN of them) are
STOP_MIN = 20      # skipped: they cost time in proportion to the collection and hardly inform
POSTINGS_BUDGET = 4_000_000  # at most this many postings are read per query: its most informative words
# (highest idf × √tf) first, so a lookup stops growing with the collection; at 500 images and at 10 k no query
# comes near it. At 100 k (synthetic distractors, bench/results/words-growth.md) ASMK* scores them in ~127 ms
# with the true images' recall in the words top 30 at 0.84 against 0.87 uncapped (396 ms); 1 M postings took
# 32 ms but kept 0.60 (tf-idf scoring had lost nothing to 1 M)
SHORTLIST = 30  # the inverted file's top candidates merged with the global shortlist (the instance preset's words W)
SLICE_MIN = 100  # words with this many postings on average are read as slices (one Python step per word), fewer
# through one index array (one step per posting; 3× faster at 500 images, 2× slower at 100 k)
CHECK_WORDS = 1024  # a check of every word of a mapped file goes this many words at a time (:func:`release`)
PROJECTION_DIMS = 64  # verification matches RootSIFT in this many dimensions, learned with the vocabulary
SIG_BITS = 64  # ASMK* signature: the signs of a word's aggregated residual in the first 64 axes of that subspace
ASMK_ALPHA = 3.0  # selectivity: σ(u) = u**α for u > τ; α 3, τ 0 as in the paper (α 1: catalogue image in the
ASMK_TAU = 0.0    # top 5 for 80 % of the phone photos, against 94 %; bench/results/quality.md)
_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy ≥ 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POP8[np.ascontiguousarray(x, np.uint64).view(np.uint8)].reshape(-1, 8).sum(1)


def _empty_bag() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bag of an image without descriptors: no words, counts or signatures."""
    return np.zeros(0, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.uint64)


def selectivity(agree: np.ndarray) -> np.ndarray:
    """ASMK's σ of the signatures' agreement u = 1 − 2h/64 (h: Hamming distance): u³ above τ, else 0."""
    u = np.asarray(agree, np.float32)
    return np.where(u > ASMK_TAU, u ** ASMK_ALPHA, 0).astype(np.float32)


def _root(desc: np.ndarray) -> np.ndarray:
    from retrieval.match.verify import _root as root

    return root(desc)


def fit_projection(sample: np.ndarray, dims: int = PROJECTION_DIMS) -> np.ndarray | None:
    """128 × ``dims``: the top eigenvectors of the *uncentred* second moments of RootSIFT rows ``sample`` —
    the subspace that best keeps the rows themselves, hence their cosines, which matching compares
    (retrieval.match.verify.project). None when the sample is too small to fit it."""
    n, d = sample.shape
    if n < 4 * d or dims >= d:
        return None
    # float64 sums: a float32 GEMM's rounding depends on the BLAS kernel and thread count, and moves eigenvectors
    # of close eigenvalues; summed over fixed blocks of rows, so that a float64 copy of the whole sample (300 MB
    # at TRAIN_DESCRIPTORS) is never held
    m = np.zeros((d, d), np.float64)
    for at in range(0, n, TRAIN_BLOCK):
        b = np.asarray(sample[at:at + TRAIN_BLOCK], np.float64)
        m += b.T @ b
    w, v = np.linalg.eigh(m / n)
    basis = v[:, ::-1][:, :dims]
    basis *= np.where(basis.sum(0) < 0, -1.0, 1.0)  # a fixed sign per axis: the same sample, the same basis
    return np.ascontiguousarray(basis, np.float32)


class Vocabulary:
    """A two-level k-means tree over RootSIFT descriptors: word = top · k2 + sub; and the subspace that
    verification matches RootSIFT in (``projection``, 128 × d; None in a file written before it)."""

    def __init__(self, top: np.ndarray, sub: np.ndarray, projection: np.ndarray | None = None):
        self.top = np.ascontiguousarray(top, np.float32)  # k1 × 128
        self.sub = np.ascontiguousarray(sub, np.float32)  # k1 × k2 × 128
        self.projection = None if projection is None else np.ascontiguousarray(projection, np.float32)
        self._top_half = 0.5 * (self.top ** 2).sum(1)
        self._sub_half = 0.5 * (self.sub ** 2).sum(2)

    @property
    def size(self) -> int:
        return self.sub.shape[0] * self.sub.shape[1]

    @classmethod
    def train(cls, sample: np.ndarray, seed: int = 0) -> "Vocabulary":
        """k-means (faiss) on RootSIFT ``sample``: ``k1`` clusters, then ``k2`` within each."""
        import faiss

        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # many small k-means: OpenMP's barriers cost more than they save
        try:
            return cls._train(sample, seed)
        finally:
            faiss.omp_set_num_threads(threads)

    @classmethod
    def _train(cls, sample: np.ndarray, seed: int) -> "Vocabulary":
        import faiss

        x = np.ascontiguousarray(sample, np.float32)
        k = max(2, min(BRANCH_MAX, int(math.sqrt(len(x) / TRAIN_PER_WORD))))
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, max_points_per_centroid=1 << 30,
                          min_points_per_centroid=1)
        km.train(x)
        top = km.centroids.copy()
        half = 0.5 * (top ** 2).sum(1)
        assign = np.concatenate([np.argmax(x[at:at + TRAIN_BLOCK] @ top.T - half, axis=1)  # by blocks of rows:
                                 for at in range(0, len(x), TRAIN_BLOCK)])  # never the whole N × k matrix
        sub = np.empty((k, k, x.shape[1]), np.float32)
        for c in range(k):
            part = x[assign == c]
            if len(part) <= k:  # too few to split: the cluster's points (or its centre) as its words
                sub[c] = top[c]
                sub[c, :len(part)] = part
                continue
            km2 = faiss.Kmeans(x.shape[1], k, niter=15, seed=seed + 1 + c, max_points_per_centroid=1 << 30,
                                 min_points_per_centroid=1)
            km2.train(np.ascontiguousarray(part))
            sub[c] = km2.centroids
        return cls(top, sub, fit_projection(x))

    def quantise(self, root: np.ndarray) -> np.ndarray:
        """The word of each RootSIFT descriptor (rows of ``root``)."""
        from retrieval.match.verify import one_blas_thread

        if not len(root):
            return np.zeros(0, np.int32)
        with one_blas_thread():  # one product per cluster, each small (retrieval.match.verify.one_blas_thread)
            t = np.argmax(root @ self.top.T - self._top_half, axis=1)
            out = np.empty(len(root), np.int64)
            for c in np.unique(t):
                sel = np.nonzero(t == c)[0]
                s = np.argmax(root[sel] @ self.sub[c].T - self._sub_half[c], axis=1)
                out[sel] = c * self.sub.shape[1] + s
        return out.astype(np.int32)

    def bag(self, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct words, their counts, their ASMK* signatures) of an image's SIFT descriptors (uint8): a
        word's signature has bit j set when the sum of its descriptors' residuals from the word's centre
        (RootSIFT), projected on axis j of the matching subspace, is positive (bit 63 − j of the uint64)."""
        _, words, counts, sigs = self.bags([desc])
        return words, counts, sigs

    def bags(self, descs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The bags (:meth:`bag`) of several images' descriptors at once, as each posting's image (its position in
        ``descs``, int32), word (int32), count (uint16) and signature (uint64), by image then word. Quantising
        tens of images together takes one product per top-level cluster for all of them, not for each."""
        lens = np.fromiter((len(d) for d in descs), np.int64, len(descs))
        if not lens.sum():
            return (np.zeros(0, np.int32), *_empty_bag())
        from retrieval.match.verify import one_blas_thread

        root = _root(np.concatenate(descs))
        key = np.repeat(np.arange(len(descs), dtype=np.int64), lens) * self.size + self.quantise(root)
        order = np.argsort(key, kind="stable")  # each image's descriptors by word, in their order within a word
        key = key[order]
        start = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        u, n = key[start], np.diff(np.append(start, len(key)))
        with one_blas_thread():  # each descriptor's residual from its word's centre, projected (a linear map: the
            proj = self._basis().T @ (root[order] - self.sub.reshape(-1, self.sub.shape[2])[key % self.size]).T
        # sums' projection is the projections' sum), as rows (dimension × descriptor), summed per (image, word) along
        # contiguous rows (np.add.reduceat down a column takes a slow step per word: 10 of 23 s of bagging 5 000 images)
        agg = np.add.reduceat(proj, start, axis=1).T
        sig = np.packbits(np.ascontiguousarray(agg > 0), axis=1).view(">u8").ravel().astype(np.uint64)
        return (u // self.size).astype(np.int32), (u % self.size).astype(np.int32), n.astype(np.uint16), sig

    def _basis(self) -> np.ndarray:
        """128 × 64: the axes the signatures' bits are signs on (the matching subspace, or RootSIFT's first 64)."""
        if self.projection is not None and self.projection.shape[1] >= SIG_BITS:
            return self.projection[:, :SIG_BITS]
        return np.eye(self.top.shape[1], SIG_BITS, dtype=np.float32)


def _word_crcs(post_img: np.ndarray, post_sig: np.ndarray, ptr: np.ndarray, words: Iterable[int] | None = None):
    """CRC-32 of each word's postings (its rows' bytes, then its signatures'), for ``words`` (default: all), uint32.
    Stored with the file, so that a search that maps the postings checks the words it reads, and only those."""
    words = range(len(ptr) - 1) if words is None else words
    out = []
    for w in words:
        a, b = int(ptr[w]), int(ptr[w + 1])
        out.append(zlib.crc32(post_sig[a:b], zlib.crc32(post_img[a:b])))
    return np.asarray(out, np.uint32)


def _members(path: Path, mapped: Iterable[str] = (), size: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file at ``path`` by name, each read whole (its CRC checked) except those named in
    ``mapped``, which are memory-mapped where stored uncompressed (as :func:`numpy.savez` stores them): the pages a
    search touches are read, not the file — ``words.npz`` is 889 MB at 100 k images, reading and CRC-checking it took
    3 s of a fresh process's query (bench/results/catalogue-100k.md). A mapped array's size is checked against the
    zip's directory; its bytes are not checked (the file's size is, by the fingerprint; see :meth:`WordIndex.load`).
    A writer replaces the file by renaming a new one over it, so a mapping stays the file it was opened as."""
    import struct
    import zipfile

    mapped = set(mapped)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # (one open: the file a rename left there)
        if size is not None and os.fstat(f.fileno()).st_size != size:
            raise ValueError(f"{path}: not the size its fingerprint records")
        for name in z.files:
            info = z.zip.getinfo(name + ".npy")
            if name not in mapped or info.compress_type != zipfile.ZIP_STORED:
                out[name] = z[name]
                continue
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise ValueError(f"{name}: no local header")
            start = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            size = math.prod(shape) * dtype.itemsize
            if fortran or dtype.hasobject or offset - start + size != info.file_size:
                raise ValueError(f"{name}: its header does not fit its size")
            out[name] = np.zeros(shape, dtype) if not size else \
                np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)
    return out


class WordIndex:
    """Every row's bag of words, and the inverted file over them (see the module docstring)."""

    def __init__(self, vocab: Vocabulary, trained_on: int, signature: str):
        self.vocab = vocab
        self.trained_on = trained_on
        self.signature = signature  # the local features' settings (Verifier.cache's name)
        self.shas: dict[int, str] = {}  # id → sha256 of the content its words were made from
        self._bags: dict[int, tuple] | None = {}  # id → (sha256, words, counts, signatures); None: not made yet
        # from the postings read from the file (a search never needs them; a change to the rows does)
        self.format = FORMAT  # the format of the file it was read from
        self._ivf = None  # built lazily from the bags
        self._last_bag = None  # (the query's descriptors, the inverted file, its bag, every row's score): reused
        self._part = None  # (allowed ids, the inverted file, the allowed rows' own inverted file or None)
        self._row_postings = None  # (the inverted file, each row's number of postings in it)
        self.path: Path | None = None  # the file it was read from
        self._crc = None  # a memory-mapped file's CRC-32 of each word's postings (_word_crcs), and which words a
        self._checked = None  # search has checked against it (bool per word)

    @property
    def bags(self) -> dict[int, tuple]:
        """id → (sha256, distinct words, counts, signatures). Read from a file of format 3, made from its postings
        (each row's postings in word order are its bag); their counts are then 1: the file does not keep them, as
        ASMK* scores a word's aggregated signature, not its count."""
        if self._bags is None:
            self._check_words()
            ids, post_img, _, ptr, _, df, post_sig = self._ivf
            words = np.repeat(np.arange(len(df), dtype=np.int32), np.diff(ptr))
            order = np.argsort(post_img, kind="stable")  # each row's postings, in word order
            bounds = np.searchsorted(post_img[order], np.arange(len(ids) + 1))
            w, sg = words[order], post_sig[order]
            self._bags = {int(i): (self.shas[int(i)], w[a:b], np.ones(b - a, np.uint16), sg[a:b])
                          for i, a, b in zip(ids.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())}
        return self._bags

    @bags.setter
    def bags(self, bags: dict[int, tuple]) -> None:
        self._bags = dict(bags)
        self.shas = {i: b[0] for i, b in self._bags.items()}
        self._ivf = self._crc = self._checked = None

    # -- keeping it equal to the rows ---------------------------------------------------------------
    def set(self, i: int, sha: str, words: np.ndarray, counts: np.ndarray, sigs: np.ndarray) -> None:
        self.bags[int(i)] = (sha, words, counts, sigs)
        self.shas[int(i)] = sha
        self._ivf = None

    def remove(self, ids: Iterable[int]) -> None:
        bags = self.bags
        for i in ids:
            bags.pop(int(i), None)
            self.shas.pop(int(i), None)
        self._ivf = None

    def reconcile(self, rows: dict[int, tuple[str, str]],
                  features: Callable[[str, str], "LocalFeatures | None"]) -> int:
        """Make the bags those of ``rows`` (id → (path, sha256)): ids gone leave, ids new or whose content
        changed get their bag (``features(path, sha)``; None: an unreadable image, an empty bag). Returns
        how many changed."""
        changed = 0
        gone = [i for i in self.shas if i not in rows]
        if gone:
            self.remove(gone)
            changed += len(gone)
        for i, (path, sha) in rows.items():
            if self.shas.get(i) == sha:
                continue
            f = features(path, sha)
            self.set(i, sha, *(self.vocab.bag(f.descriptors) if f is not None else _empty_bag()))
            changed += 1
        return changed

    # -- the inverted file ------------------------------------------------------------------------------
    def _inverted(self):
        if self._ivf is not None:
            return self._ivf
        bags = self.bags
        ids = np.fromiter(bags.keys(), np.int64, len(bags))
        post_img, norm, ptr, idf, df, post_sig = _postings(list(bags.values()), self.vocab.size)
        self._ivf = (ids, post_img, norm, ptr, idf, df, post_sig)
        self._crc = self._checked = None  # (made here, not read from a file)
        self._row_postings = (self._ivf, np.fromiter((len(b[1]) for b in bags.values()), np.int32, len(bags)))
        return self._ivf

    def search(self, desc: np.ndarray, n: int, allowed: np.ndarray | None = None,
               exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """The ``n`` rows whose words best match the descriptors ``desc`` (ASMK*, :meth:`score_bag`), best
        first, as (id, score); ``allowed``: only these ids (sorted array); ``exclude``: never these. When the
        allowed rows hold at most ``POSTINGS_BUDGET`` postings (a catalogue), all of theirs are read: their
        scores are the uncapped ones, whatever the collection's size."""
        if n <= 0 or not self.shas or not len(desc):
            return []
        ivf = self._inverted()
        last = self._last_bag
        if last is None or last[0] is not desc or last[1] is not ivf:  # the words and catalogue stages ask
            bag = self.vocab.bag(desc)  # with the same query: quantised (and scored) once
            last = self._last_bag = (desc, ivf, bag, self.score_bag(*bag, ivf))
        part = self._allowed_part(allowed, ivf) if allowed is not None else None
        if part is not None:
            ids, scores = part[0], self.score_bag(*last[2], ivf, part=part)
        else:
            ids, scores = ivf[0], None if last[3] is None else last[3].copy()
            if scores is not None and allowed is not None:
                scores[~np.isin(ids, allowed)] = 0
        if scores is None:
            return []
        ex = np.fromiter((int(i) for i in exclude), np.int64)
        if len(ex):  # one pass, not one per excluded id (the catalogue stage excludes ~100)
            scores[np.isin(ids, ex)] = 0
        cand = np.nonzero(scores > 0)[0]
        if len(cand) > n:
            cand = cand[np.argpartition(-scores[cand], n - 1)[:n]]
        cand = cand[np.argsort(-scores[cand], kind="stable")]
        return [(int(ids[c]), float(scores[c])) for c in cand]

    def _check_words(self, words: np.ndarray | None = None) -> None:
        """Check the postings of ``words`` (default: all) of a memory-mapped file against their stored CRC-32s, once
        each; DamagedWords when one fails (the search reads the file whole instead: it fails its checks and is made
        again). A file read whole was checked as it was read."""
        if self._checked is None:
            return
        if words is None:  # every word, a range at a time, letting go of each range's pages once checked
            for w0 in range(0, len(self._checked), CHECK_WORDS):
                w1 = min(len(self._checked), w0 + CHECK_WORDS)
                self._check_words(np.arange(w0, w1))
                _, post_img, _, ptr, _, _, post_sig = self._ivf
                release(post_img, int(ptr[w0]), int(ptr[w1]))
                release(post_sig, int(ptr[w0]), int(ptr[w1]))
            return
        todo = np.unique(words[~self._checked[words]])
        if not len(todo):
            return
        _, post_img, _, ptr, _, _, post_sig = self._ivf
        bad = todo[_word_crcs(post_img, post_sig, ptr, todo.tolist()) != self._crc[todo]]
        if len(bad):
            raise DamagedWords(f"{self.path or WORDS_NAME}: damaged (the postings of word {int(bad[0])} fail their "
                               "checksum)")
        self._checked[todo] = True

    def _allowed_part(self, allowed: np.ndarray, ivf):
        """The inverted file of the rows ``allowed`` alone, weighted as in the whole collection's (the same idf
        and row norms), as (ids, rows, their norms, word pointers, signatures); None when they hold more than
        ``POSTINGS_BUDGET`` postings. Kept for the next query with the same ``allowed``."""
        have = self._part
        if have is not None and have[1] is ivf and np.array_equal(have[0], allowed):
            return have[2]
        ids, post_img, norm, ptr, _, _, post_sig = ivf
        rows = np.nonzero(np.isin(ids, allowed))[0]
        part = None
        if self._row_postings is None or self._row_postings[0] is not ivf:  # (stored, or made with the inverted file)
            self._row_postings = (ivf, np.bincount(post_img, minlength=len(ids)).astype(np.int32))
        if int(self._row_postings[1][rows].sum(dtype=np.int64)) <= POSTINGS_BUDGET:  # their postings, in the same order
            if self._checked is not None and len(post_img) and (post_img.min() < 0 or post_img.max() >= len(ids)):
                raise DamagedWords(f"{self.path or WORDS_NAME}: damaged (a posting names a row past the {len(ids)})")
            # (a mapped file's words are checked as a query reads them, in the whole file: score_bag)
            keep = np.zeros(len(ids), bool)
            keep[rows] = True
            at = np.flatnonzero(keep[post_img])  # (by word, then row)
            pos = np.full(len(ids), -1, np.int32)
            pos[rows] = np.arange(len(rows), dtype=np.int32)
            part = (ids[rows], pos[post_img[at]], norm[rows], np.searchsorted(at, ptr).astype(np.int64),
                    post_sig[at])
        self._part = (np.array(allowed, copy=True), ivf, part)
        return part

    def score_bag(self, qw: np.ndarray, qn: np.ndarray, qs: np.ndarray, ivf=None, budget: int | None = None,
                  part=None) -> np.ndarray | None:
        """Every row's score for a query bag (distinct words ``qw``, their counts ``qn``, their signatures ``qs``):
        ASMK*, Σ over the words shared with the row of idf × σ(1 − 2h/64) (h: the Hamming distance of the two
        signatures, σ: :func:`selectivity`), over √(Σ idf) of the row's words and of the query's — over the query
        words that are not stop words and that fit the budget: the words taken by weight (idf × √tf, highest
        first) while their postings add up to at most ``budget`` (default :data:`POSTINGS_BUDGET`; 0: no cap).
        ``part``: the rows of :meth:`_allowed_part` only (the query weighted by the whole collection). None: no
        word in common."""
        ids, post_img, norm, ptr, idf, df, post_sig = self._inverted() if ivf is None else ivf
        budget = POSTINGS_BUDGET if budget is None else budget
        qw = np.asarray(qw, np.int64)
        keep = df[qw] <= max(STOP_SHARE * len(ids), STOP_MIN)
        qw, qn, qs = qw[keep], np.asarray(qn)[keep], np.asarray(qs, np.uint64)[keep]
        q = np.sqrt(qn.astype(np.float32)) * idf[qw]
        if part is not None:
            ids, post_img, norm, ptr, post_sig = part
        starts, ends = ptr[qw], ptr[qw + 1]
        if budget and int((ends - starts).sum()) > budget:  # the best words whose postings fit the budget
            best = np.argsort(-q, kind="stable")
            best = np.sort(best[np.cumsum((ends - starts)[best]) <= budget])  # (kept in word order)
            qw, qs, starts, ends = qw[best], qs[best], starts[best], ends[best]
        self._check_words(qw)  # (with ``part``: the whole words its postings were cut from)
        lens = ends - starts
        total = int(lens.sum())
        if not total:
            return None
        if total >= SLICE_MIN * len(qw):  # each word's postings one slice: no index array
            s, e = starts.tolist(), ends.tolist()
            img = np.concatenate([post_img[a:b] for a, b in zip(s, e)])
            sig = np.concatenate([post_sig[a:b] for a, b in zip(s, e)])
        else:  # the postings' positions in one array (the same order)
            at = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(total)
            img, sig = post_img[at], post_sig[at]
        # each read posting's weight: its word's idf over √(Σ idf) of its row's words (ASMK*'s normalisation),
        # computed for the postings read only (the file keeps the rows' norms, not a weight per posting)
        w = np.repeat(idf[qw], lens) / np.maximum(norm[img], np.float32(1e-12))
        agree = 1 - _popcount(sig ^ np.repeat(qs, lens)).astype(np.float32) * np.float32(2 / SIG_BITS)
        w *= selectivity(agree)
        return np.bincount(img, w, minlength=len(ids)) / math.sqrt(max(float(idf[qw].sum()), 1e-12))

    # -- the file ---------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return wordfile.fingerprint(self.vocab, self.trained_on, self.signature, len(self.shas))

    def save(self, directory: Path) -> None:
        """Write ``words.npz``, then its fingerprint, each atomically; an unwritable directory only costs time."""
        directory = Path(directory)
        tmp = directory / f".{WORDS_NAME}.{os.getpid()}.tmp"
        tmp_meta = directory / f".{META_NAME}.{os.getpid()}.tmp"
        ivf = self._inverted()
        self._check_words()  # (a mapped file's postings written again only once checked)
        ids = ivf[0]
        shas = np.array([self.shas[i] for i in ids.tolist()], dtype="S64")
        try:
            extra = {} if self.vocab.projection is None else {"projection": self.vocab.projection}
            with open(tmp, "wb") as f:  # the postings (rows int32, signatures uint64, by word) and the rows' norms
                np.savez(f, top=self.vocab.top, sub=self.vocab.sub, ids=ids, shas=shas, post_img=ivf[1],
                         post_ptr=ivf[3], post_sig=ivf[6], row_norm=ivf[2], row_postings=self._row_postings[1],
                         post_crc=_word_crcs(ivf[1], ivf[6], ivf[3]), **extra)
            wordfile.publish(directory, tmp, tmp_meta, self.fingerprint())
        except OSError:
            tmp.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path, signature: str, mapped: bool = False) -> "WordIndex | None":
        """The stored word index when its fingerprint describes this very file (else None: rebuild). ``mapped`` (a
        search): the postings are memory-mapped, not read (:func:`_members`), and checked as far as that costs no
        pass over them; else (a writer, ``retrieve check``) every member is read, CRC-checked and checked whole."""
        try:
            described = _described(directory, signature)
            if described is None:
                return None
            path, meta = described
            z = _members(path, MAPPED if mapped else (), meta.get("bytes"))
            if mapped and "post_ptr" in z and "post_crc" not in z:  # (no words' checksums: an older file, read whole)
                z, mapped = _members(path, (), meta.get("bytes")), False
            top, sub, ids, shas = z["top"], z["sub"], z["ids"], z["shas"]
            projection = z.get("projection")  # absent: written before it
            post = (z["post_img"], z["post_ptr"], z["post_sig"], z.get("row_norm"), z.get("row_postings")) \
                if "post_ptr" in z else None
            crc = z.get("post_crc")
            bags = (z["ptr"], z["words"], z["counts"], z["sigs"]) if post is None else None  # format 2 only
        except Exception:  # noqa: BLE001 - missing, truncated, damaged (BadZipFile, CRC, zlib, ValueError…)
            return None
        if (ids.ndim != 1 or shas.ndim != 1 or shas.dtype.kind != "S" or ids.dtype != np.int64
                or list(sub.shape[:2]) != meta.get("vocabulary") or len(ids) != meta.get("count") or len(shas) != len(ids)
                or top.shape[0] != sub.shape[0] or (post is None and bags is None)
                or (projection is not None and (projection.ndim != 2 or projection.shape[0] != top.shape[1]))):
            return None
        out = cls(Vocabulary(top, sub, projection), int(meta.get("trained_on", len(ids))), signature)
        out.path = path
        # a file of format 3 from before the rows' norms or posting counts were stored is taken as format 2: the
        # next writer writes it again, with them
        out.format = int(meta["format"]) if post is None or (post[3] is not None and post[4] is not None
                                                              and crc is not None) else 2
        out.shas = {i: h.decode() for i, h in zip(ids.tolist(), shas)}
        if post is not None:
            stored = cls._stored_inverted(ids, *post, out.vocab.size, whole=not mapped)
            if stored is None:
                return None
            out._ivf, counts = stored
            out._row_postings = (out._ivf, counts)
            if crc is not None and (crc.shape != (out.vocab.size,) or crc.dtype != np.uint32):
                return None
            if mapped:  # each word's postings checked by the first search that reads them
                out._crc, out._checked = crc, np.zeros(out.vocab.size, bool)
            elif crc is not None and not np.array_equal(_word_crcs(post[0], post[2], post[1]), crc):
                return None
            out._bags = None  # made from the postings when a change to the rows needs them
            return out
        ptr, words, counts, sigs = bags  # a format-2 file written before the inverted file was stored
        if (len(ptr) != len(ids) + 1 or ptr[-1] != len(words) or len(counts) != len(words) or sigs.shape != words.shape
                or sigs.dtype != np.uint64
                or (len(words) and (words.min() < 0 or words.max() >= sub.shape[0] * sub.shape[1]))):
            return None
        for j, i in enumerate(ids.tolist()):
            a, b = ptr[j], ptr[j + 1]
            out._bags[i] = (out.shas[i], words[a:b], counts[a:b], sigs[a:b])
        return out

    @staticmethod
    def _stored_inverted(ids, post_img, post_ptr, post_sig, norm, counts, V: int, whole: bool = True):
        """The inverted file from the stored postings, rows' norms and rows' posting counts (what :meth:`_inverted`
        builds from the same bags: the idf from the words' document frequencies; ``norm`` or ``counts`` None: computed
        from the postings), with each row's posting count; None when the arrays do not fit together. ``whole``: also
        the checks that read every posting (each names a row, each word's rows in order); without it a search checks
        the rows of the postings it reads (:meth:`score_bag`)."""
        n = len(post_img) if post_img.ndim == 1 else -1
        if (post_img.shape != (n,) or post_sig.shape != (n,) or post_sig.dtype != np.uint64
                or post_ptr.shape != (V + 1,) or post_img.dtype != np.int32 or post_ptr.dtype != np.int64
                or post_ptr[0] != 0 or post_ptr[-1] != n or np.any(np.diff(post_ptr) < 0)
                or (norm is not None and (norm.shape != ids.shape or norm.dtype != np.float32
                                          or not np.all(np.isfinite(norm)) or np.any(norm < 0)))
                or (counts is not None and (counts.shape != ids.shape or counts.dtype != np.int32
                                            or np.any(counts < 0) or int(counts.sum()) != n))):
            return None
        if whole or norm is None or counts is None:
            if n and (post_img.min() < 0 or post_img.max() >= len(ids)):
                return None
            step = post_img[1:] > post_img[:-1]  # within a word, each row once and in order (a word's first posting aside)
            step[post_ptr[1:-1][(post_ptr[1:-1] > 0) & (post_ptr[1:-1] < n)] - 1] = True
            if not step.all():
                return None
            have = np.bincount(post_img, minlength=len(ids)).astype(np.int32)
            if counts is not None and not np.array_equal(have, counts):
                return None
            counts = have
        df = np.diff(post_ptr).astype(np.float32)
        idf = np.log((len(ids) + 1) / (df + 1)).astype(np.float32)
        if norm is None:
            norm = np.sqrt(np.bincount(post_img, np.repeat(idf, np.diff(post_ptr)), minlength=len(ids))).astype(np.float32)
        return (ids, post_img, norm, post_ptr, idf, df, post_sig), counts


def _postings(bags: list, V: int):
    """The inverted file of ``bags`` ((sha256, words, counts, signatures) per row, in row order) over ``V`` words:
    each posting's row (int32) and signature (uint64), sorted by word and, within a word, by row; each row's norm
    (√(Σ idf) of its words, float32: a posting weighs its word's idf over its row's norm, ASMK*'s normalisation);
    the words' pointers into the postings (V + 1); the idf and document frequencies."""
    lens = np.fromiter((len(b[1]) for b in bags), np.int64, len(bags))
    words = np.concatenate([b[1] for b in bags] + [np.zeros(0, np.int32)]).astype(np.int32)  # (half an int64's memory)
    sigs = np.concatenate([b[3] for b in bags] + [np.zeros(0, np.uint64)]).astype(np.uint64)
    img = np.repeat(np.arange(len(bags), dtype=np.int32), lens)
    df = np.bincount(words, minlength=V).astype(np.float32)
    idf = np.log((len(bags) + 1) / (df + 1)).astype(np.float32)
    w = idf[words]
    norm = np.sqrt(np.bincount(img, w, minlength=len(bags))).astype(np.float32)
    # stable: each word's postings in row order. Words fit int16 (branch ≤ 128: ≤ 16,384 words), whose
    # stable argsort is a radix sort, twice as fast as int32's at 100 k images (the same order)
    order = np.argsort(words.astype(np.int16) if V <= np.iinfo(np.int16).max + 1 else words, kind="stable")
    ptr = np.zeros(V + 1, np.int64)
    np.cumsum(np.bincount(words, minlength=V), out=ptr[1:])
    return img[order], norm, ptr, idf, df, sigs[order]


# -- one index's word index -------------------------------------------------------------------------------
def signature(verifier: "Verifier") -> str:
    return Path(str(verifier.cache)).name if verifier.cache is not None else \
        f"sift-{verifier.max_side}-{verifier.n_features}"


def _rows(store: "IndexStore") -> dict[int, tuple[str, str]]:
    return {i: (path, sha) for i, path, sha in store.row_paths()}


def _features(verifier: "Verifier"):
    from retrieval.errors import ImageError

    def get(path: str, sha: str):
        try:
            return verifier.features(path, sha)
        except (ImageError, OSError):
            return None  # the file went away and its features were never cached: no words for it

    return get


def _sample(rows: dict[int, tuple[str, str]], features, seed: int = 0) -> np.ndarray | None:
    """A seeded sample of the rows' RootSIFT descriptors (None: too few to train a vocabulary on)."""
    rng = np.random.default_rng(seed)
    order = sorted(rows)
    per = max(50, TRAIN_DESCRIPTORS // max(len(order), 1))
    if len(order) * per > TRAIN_DESCRIPTORS:  # beyond 6 000 rows: a seeded sample of the rows, 50 descriptors each;
        # 50 from each of all 100 k rows was 5 M descriptors, 2.5 GB of the 100 k catalogue's peak. Enough rows for
        # the largest vocabulary (BRANCH_MAX² words, TRAIN_PER_WORD descriptors each: 327 680), as 50 from every row
        # gave: a sample of 300 000 allows 14 884 words, and cost 0.017 R@1 and 0.028 photo→catalogue at 100 k
        # (bench/results/catalogue-100k.md)
        take = min(len(order), -(-max(TRAIN_DESCRIPTORS, BRANCH_MAX ** 2 * TRAIN_PER_WORD) // per))
        if take < len(order):
            order = sorted(rng.choice(np.asarray(order), take, replace=False).tolist())
    parts = []
    for i in order:
        f = features(*rows[i])
        if f is None or not len(f.descriptors):
            continue
        d = f.descriptors
        if len(d) > per:
            d = d[np.sort(rng.choice(len(d), per, replace=False))]
        parts.append(d)  # (SIFT's bytes: RootSIFT's float32 is 4× larger, made once below)
    n = sum(len(p) for p in parts)
    if n < 4 * TRAIN_PER_WORD:
        return None
    out, at = np.empty((n, parts[0].shape[1]), np.float32), 0
    for d in parts:
        out[at:at + len(d)] = _root(d)
        at += len(d)
    return out


def _train(rows: dict[int, tuple[str, str]], features, seed: int = 0) -> Vocabulary | None:
    """A vocabulary (and projection) from a seeded sample of the rows' descriptors (None: too few)."""
    sample = _sample(rows, features, seed)
    return None if sample is None else Vocabulary.train(sample, seed)


def sync(store: "IndexStore", verifier: "Verifier", save: bool = True, whole: bool = False,
         progress: Callable[[int, int], None] | None = None) -> WordIndex | None:
    """The word index of ``store``, equal to its rows: loaded, or (trained and) built again where the rows or the
    file's format changed, written by the index's writer when ``save`` (:func:`save_as_writer`), else in a private
    temporary folder. None when the collection has too few descriptors. The file's postings are memory-mapped
    (:meth:`WordIndex.load`) and each word is checked against its CRC-32 as it is read: by a search, the words of its
    query; by a build, every word it copies (retrieval/match/wordfile.py); by a writer whose rows did not change,
    every word. ``whole``: read and check the file whole first (a search that found a mapped word damaged).
    ``progress(done, total)``: the rows quantised so far, of those to quantise."""
    sig = signature(verifier)
    writer = getattr(store, "writable", False)
    wi = WordIndex.load(store.directory, sig, mapped=not whole)
    rows = features = None
    quantise_all = False  # every row quantised again in the file's vocabulary (a writer found a word damaged)
    if (wi is not None and wi.format == FORMAT and len(wi.shas) < RETRAIN_GROWTH * max(wi.trained_on, 1)
            and store.row_hashes() == wi.shas):  # the rows' content hashes are the file's (their paths are not read)
        fitted = False
        if wi.vocab.projection is None:  # a file written before projections: the vocabulary's own sample adds one
            rows, features = _rows(store), _features(verifier)
            sample = _sample(rows, features)
            wi.vocab.projection = None if sample is None else fit_projection(sample)
            fitted = wi.vocab.projection is not None
        if not fitted:  # nothing to make
            if not writer:
                return wi
            try:
                wi._check_words()  # a writer leaves no damaged file behind it
                return wi
            except DamagedWords:
                quantise_all = True
    rows = rows if rows is not None else _rows(store)
    features = features or _features(verifier)
    if wi is None or len(rows) >= RETRAIN_GROWTH * max(wi.trained_on, 1):
        vocab = _train(rows, features)
        if vocab is None:
            return None
        old, trained_on = None, len(rows)
    else:
        vocab, trained_on, old = wi.vocab, wi.trained_on, None if quantise_all else wi
        if vocab.projection is None:
            sample = _sample(rows, features)
            vocab.projection = None if sample is None else fit_projection(sample)
    built = None

    def write(directory: Path) -> None:
        nonlocal built
        try:
            wordfile.build(directory, vocab, trained_on, sig, rows, features, old, progress)
        except DamagedWords:  # a word of the file it copies from is damaged: every row quantised again
            wordfile.build(directory, vocab, trained_on, sig, rows, features, None, progress)
        built = WordIndex.load(directory, sig, mapped=True)  # (read back before another writer may replace it)

    if save and save_as_writer(store, write):
        return built
    from retrieval.scratch import ScratchDir

    try:
        with ScratchDir(SCRATCH_PREFIX) as tmp:  # (the mapping outlives the folder; a killed search's goes next time)
            write(tmp)
    except OSError:
        return None  # nowhere to build it (a full or unwritable temporary folder): no visual words this time
    return built


def save_as_writer(store: "IndexStore", write: Callable[[Path], None]) -> bool:
    """``write(directory)`` the word index into the index directory as its writer, or not at all (False). A store
    opened for writing holds the writer lock; a reader (a search, the web app) takes the lock without waiting and
    writes only while it holds it. While ``retrieve index`` or another writer runs, or where the directory is
    read-only, the reader writes nothing there (it builds in a temporary folder; the writer's run ends by bringing
    the file up to date). Not "readers only compute": an index whose searches use words without its runs writing
    them (a catalogue searched without ``words``), or a file from an older version, would be built by every search."""
    if getattr(store, "writable", False):
        try:
            write(store.directory)
        except OSError:  # (a full or unwritable directory: the index run goes on without the file)
            return False
        return True
    from retrieval.errors import RetrieveError
    from retrieval.index.lock import WriterLock

    lock = WriterLock(store.directory)
    try:
        lock.acquire(f"a search writing {WORDS_NAME}")
    except (RetrieveError, OSError):  # being written, or not ours to write
        return False
    try:
        write(store.directory)
    except OSError:  # (an unwritable directory: built in a temporary folder instead)
        return False
    finally:
        lock.release()
    return True


def _described(directory: Path, signature: str) -> tuple[Path, dict] | None:
    """``words.npz`` and its fingerprint when the fingerprint describes this very file (format, SIFT settings,
    size), else None; OSError or ValueError when either cannot be read."""
    path = Path(directory) / WORDS_NAME
    meta = json.loads((Path(directory) / META_NAME).read_text())
    if (not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS or meta.get("features") != signature
            or meta.get("bytes") != path.stat().st_size):
        return None
    return path, meta


def stored_projection(directory: Path, signature: str) -> np.ndarray | None:
    """The matching subspace (128 × d) in the index's ``words.npz``, read without the rest of the file (the
    bags and the inverted file); None when there is no whole file of this fingerprint, or it holds none."""
    try:
        described = _described(directory, signature)
        if described is None:
            return None
        with np.load(described[0], allow_pickle=False) as z:  # (one member read, its CRC checked)
            if "projection" not in z.files:
                return None
            p = z["projection"]
    except Exception:  # noqa: BLE001 - missing, truncated, damaged: as WordIndex.load
        return None
    return p if p.ndim == 2 and p.shape[0] == 128 and p.dtype == np.float32 else None


def index_verifier(store: "IndexStore") -> "Verifier":
    """The verifier a default search of ``store`` verifies with: in the subspace stored with its visual words
    when its searches use them (words or a catalogue by default; Searcher.words), else in all 128 dimensions —
    so that ``retrieve explain --index --verify`` and the web app's pair page count the inliers the search
    reported for the same pair."""
    from retrieval.index.catalogue import default_depth
    from retrieval.match.verify import Verifier

    v = Verifier.for_index(store.settings)
    search = store.settings.search
    if int(search.get("words", 0)) > 0 or default_depth(store, int(search.get("verify", 0))) > 0:
        v.projection = stored_projection(store.directory, signature(v))
    return v


def file_state(store: "IndexStore", verifier: "Verifier") -> str:
    """``ok``, ``missing``, ``damaged`` (its fingerprint describes it, but it does not read back whole: CRC, shapes,
    postings) or ``stale`` (another fingerprint, or behind the rows): ``retrieve check``'s words line."""
    if not (store.directory / WORDS_NAME).exists():
        return "missing"
    sig = signature(verifier)
    wi = WordIndex.load(store.directory, sig)
    if wi is None:
        try:
            return "damaged" if _described(store.directory, sig) is not None else "stale"
        except (OSError, ValueError):
            return "stale"
    rows = _rows(store)
    same = len(rows) == len(wi.shas) and all(wi.shas.get(i) == sha for i, (_, sha) in rows.items())
    return "ok" if same else "stale"


def update_index(store: "IndexStore", progress: Callable[[int, int], None] | None = None) -> WordIndex | None:
    """The indexer's hook (end of a run, holding the writer lock): temporaries of a killed writer go, then
    :func:`sync` brings the stored word index up to date (only new or changed rows are quantised; ``progress``)."""
    from retrieval.index.vectors import clean_temporaries
    from retrieval.match.verify import Verifier

    clean_temporaries(store.directory, TEMPORARY_GLOBS)
    for left in store.directory.glob(wordfile.BUILD_PREFIX + "*"):  # a killed build's temporary folder
        shutil.rmtree(left, ignore_errors=True)
    return sync(store, Verifier.for_index(store.settings), progress=progress)
