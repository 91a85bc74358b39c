"""The visual-words file ``words.npz`` (retrieval/match/words.py): its names and format, the check that a mapped file
was found damaged, and its writer, which works with bounded memory: the rows' bags quantised many images at a time,
the inverted file written a range of words at a time.

Building the inverted file of a 100 k-image collection in memory held every row's bag and then every posting
twice over (72 M postings: a 4 GB peak, most of a 100 k run's), and quantised one image at a time (one Python
step per top-level cluster and image: 9 min 41 s on one core; bench/results/catalogue-100k.md). Here:

1. **Quantise in chunks.** The rows whose bags are new (new rows, rows whose content changed, or every row after
   the vocabulary is trained) are read :data:`CHUNK_DESCRIPTORS` descriptors at a time and bagged together
   (:meth:`Vocabulary.bags`), a chunk per BLAS thread. Their postings go to one temporary file per bucket of
   :data:`BUCKET_WORDS` words, in row order.
2. **Invert by bucket.** For each bucket, in word order: the unchanged rows' postings are read from the old file
   (each word's CRC-32 checked: a writer never copies damaged postings), their rows renumbered, and merged with
   the new postings of the bucket (sorted by word, then row). Each bucket is written straight into the zip
   member ``post_img``; its signatures go to a temporary file that becomes ``post_sig``. The words' document
   frequencies, the rows' norms (√Σ idf: a word's idf is known once its bucket is done) and the words' CRC-32s
   build up as the buckets go.
3. The small members (vocabulary, ids, hashes, pointers, norms, counts, CRCs), then the fingerprint, each
   renamed into place as :meth:`WordIndex.save` does.

Memory: the chunks being bagged (:data:`MAX_WORKERS` at most, ~80 MB of temporaries each) or one bucket's
postings (1/16 of the collection's at 16 k words, 16 bytes each, sorted), plus the rows' small arrays. Disk: the
new rows' postings spooled (16 bytes each) and the signatures (8) beside the old file and the new one. The file
is the one :meth:`WordIndex.save` writes for the same bags, up to the floating-point order of the rows' norms
(tests/test_wordfile.py).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from retrieval.errors import RetrieveError

WORDS_NAME = "words.npz"
META_NAME = "words.json"
FORMAT = 3  # 3: the postings alone (rows and signatures; the bags and weights follow from them), a third of 2's
# size; 2: per-word residual signatures (ASMK*) with the bags and the postings (still read, written again as 3);
# a file of format 1 is rebuilt

CHUNK_DESCRIPTORS = 1 << 15  # descriptors bagged together (one product per top-level cluster for all of them; ~45
# images, ~80 MB of temporaries)
MAX_WORKERS = 4  # chunks bagged at once, at most (each its temporaries)
BUCKET_WORDS = 1024  # words inverted together: one bucket's postings in memory (16 buckets at 16 k words)
READ_AHEAD = 64  # rows whose features are read ahead of the chunk being bagged
BUILD_PREFIX = ".words-build."  # the temporary folder of a build (a killed writer's is removed by the next one)
_RECORD = np.dtype([("row", "<i4"), ("word", "<i4"), ("sig", "<u8")])  # a new posting in a bucket file


class DamagedWords(RetrieveError):
    """A memory-mapped ``words.npz`` whose postings, as a search reads them, do not fit the file."""


def release(arr: np.ndarray, a: int, b: int) -> None:
    """Let go of the resident pages of elements ``a``..``b`` of a memory-mapped array (they stay in the page cache and
    are read again if touched), so that a pass over a mapped file leaves the process's memory as it found it: a
    writer checks or copies all 873 MB of postings at 100 k images. A no-op for an array in memory."""
    import mmap

    m = arr.base if isinstance(arr.base, np.memmap) else None
    mm = getattr(m, "_mmap", None)
    if mm is None or b <= a or not hasattr(mm, "madvise"):
        return
    skew = m.offset % mmap.ALLOCATIONGRANULARITY  # (where the array starts in its mapping)
    start, end = skew + a * arr.itemsize, skew + b * arr.itemsize
    start -= start % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        pass


class _Old:
    """The rows of an existing word index whose postings are copied as they are (same vocabulary, same content):
    the old file's postings by word, each old row's new position (−1: not copied) and its posting count."""

    def __init__(self, wi, new_pos: np.ndarray):  # wi: a retrieval.match.words.WordIndex
        ids, self.img, _, self.ptr, _, _, self.sig = wi._inverted()
        self.wi, self.new_pos = wi, new_pos
        self.counts = wi._row_postings[1] if wi._row_postings is not None and wi._row_postings[0] is wi._ivf \
            else np.bincount(self.img, minlength=len(ids))

    def bucket(self, w0: int, w1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(words, new rows, signatures) of the copied postings of words ``w0``..``w1`` − 1, by word then row."""
        self.wi._check_words(np.arange(w0, w1))  # (a file read whole was checked as it was read)
        a, b = int(self.ptr[w0]), int(self.ptr[w1])
        img = np.asarray(self.img[a:b])
        if len(img) and (img.min() < 0 or img.max() >= len(self.new_pos)):
            raise DamagedWords(f"{self.wi.path or WORDS_NAME}: damaged (a posting names a row past the "
                               f"{len(self.new_pos)})")
        words = np.repeat(np.arange(w0, w1, dtype=np.int32), np.diff(self.ptr[w0:w1 + 1]))
        row = self.new_pos[img]
        keep = row >= 0
        out = words[keep], row[keep].astype(np.int32), np.asarray(self.sig[a:b])[keep]
        release(self.img, a, b)  # (copied: a mapped file's pages are let go of, bucket by bucket)
        release(self.sig, a, b)
        return out


def _chunks(todo: Sequence[tuple[int, str, str]], features: Callable) -> Iterator[tuple[np.ndarray, list]]:
    """(new row positions, their descriptors) of ``todo`` ((position, path, sha256) each), about
    :data:`CHUNK_DESCRIPTORS` descriptors at a time; a thread reads the next rows' features (at most
    :data:`READ_AHEAD` of them) while a chunk is bagged."""
    pos, descs, n = [], [], 0
    pool = ThreadPoolExecutor(1)  # (reading a cache file and bagging overlap: both release the GIL)
    ahead: deque = deque()
    try:
        for t in [*todo, None]:
            if t is not None:
                ahead.append((t[0], pool.submit(features, t[1], t[2])))
                if len(ahead) < READ_AHEAD:
                    continue
            while ahead and (t is None or len(ahead) >= READ_AHEAD):
                p, fut = ahead.popleft()
                f = fut.result()
                pos.append(p)
                descs.append(f.descriptors if f is not None else np.zeros((0, 128), np.uint8))
                n += len(descs[-1])
                if n >= CHUNK_DESCRIPTORS:
                    yield np.asarray(pos, np.int32), descs
                    pos, descs, n = [], [], 0
    finally:
        pool.shutdown(cancel_futures=True)  # (an error or an interrupt: the reads queued behind it are dropped)
    if pos:
        yield np.asarray(pos, np.int32), descs


def _npy_header(out, dtype, n: int) -> None:
    """The .npy header of a 1-d array of ``n`` ``dtype`` values, whose bytes the caller then writes."""
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)})


def publish(directory: Path, tmp: Path, tmp_meta: Path, meta: dict) -> None:
    """Put the written file ``tmp`` in place as ``words.npz`` and its fingerprint ``meta`` (its size added) as
    ``words.json``: each synced, then renamed (the file first), then the directory synced."""
    from retrieval.index.files import fsync, fsync_dir

    fsync(tmp)
    tmp_meta.write_text(json.dumps({**meta, "bytes": tmp.stat().st_size}))
    fsync(tmp_meta)
    os.replace(tmp, directory / WORDS_NAME)
    os.replace(tmp_meta, directory / META_NAME)
    fsync_dir(directory)


def fingerprint(vocab, trained_on: int, signature: str, count: int) -> dict:
    """What ``words.json`` records of a file (its size is added by :func:`publish`)."""
    return {"format": FORMAT, "features": signature, "vocabulary": list(vocab.sub.shape[:2]),
            "trained_on": trained_on, "count": count, "bytes": 0}


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as out:
        np.lib.format.write_array(out, np.ascontiguousarray(arr), allow_pickle=False)


def build(directory: Path, vocab, trained_on: int, signature: str, rows: dict[int, tuple[str, str]],
          features: Callable, old=None,
          progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``words.npz`` and ``words.json`` in ``directory`` for ``rows`` (id → (path, sha256)), each row's bag
    from ``features(path, sha)`` (None: an empty bag) quantised in ``vocab`` (a words.Vocabulary) — or, for a row
    whose content ``old`` (a words.WordIndex of the same vocabulary) already holds, copied from it. Rows keep
    ``old``'s order, new ones follow in ``rows``' order (what :meth:`WordIndex.reconcile` then :meth:`WordIndex.save`
    give). DamagedWords when a word copied from ``old`` fails its checksum (the caller builds again without it);
    OSError when the directory cannot be written (nothing is left behind). ``progress(done, total)``: rows quantised so far, of those to be."""
    directory = Path(directory)
    V = vocab.size
    old_ids = old._inverted()[0] if old is not None else np.zeros(0, np.int64)  # (a format-2 file: made from its bags)
    kept = [int(i) for i in old_ids.tolist() if int(i) in rows]
    kept_set = set(kept)
    ids = np.array(kept + [i for i in rows if i not in kept_set], np.int64)
    position = {int(i): p for p, i in enumerate(ids.tolist())}
    same = np.array([old is not None and old.shas.get(int(i)) == rows[int(i)][1] for i in ids.tolist()], bool)
    copied = _Old(old, np.array([position[int(i)] if int(i) in kept_set and same[position[int(i)]] else -1
                                 for i in old_ids.tolist()], np.int64)) if old is not None else None
    todo = [(p, *rows[int(i)]) for p, i in enumerate(ids.tolist()) if not same[p]]
    n = len(ids)
    counts = np.zeros(n, np.int64)
    if copied is not None:
        at = copied.new_pos >= 0
        counts[copied.new_pos[at]] = copied.counts[at]
    buckets = -(-V // BUCKET_WORDS)
    work = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=directory))
    tmp = directory / f".{WORDS_NAME}.{os.getpid()}.tmp"
    tmp_meta = directory / f".{META_NAME}.{os.getpid()}.tmp"
    try:
        # 1. the new bags, by bucket of words, in row order
        parts = []
        done = 0

        def put(pos: np.ndarray, bagged) -> None:
            nonlocal done
            img, words, _, sigs = bagged.result()
            rec = np.empty(len(img), _RECORD)
            rec["row"], rec["word"], rec["sig"] = pos[img], words, sigs
            counts[pos] = np.bincount(img, minlength=len(pos))
            b_of = words // BUCKET_WORDS
            order = np.argsort(b_of, kind="stable")  # (each bucket's postings stay in row order)
            rec, b_of = rec[order], b_of[order]
            bounds = np.searchsorted(b_of, np.arange(buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                rec[bounds[b]:bounds[b + 1]].tofile(parts[b])
            done += len(pos)
            if progress is not None:
                progress(done, len(todo))

        from retrieval.match.verify import blas_threads, one_blas_thread

        workers = max(1, min(blas_threads(), MAX_WORKERS))  # chunks bagged side by side (NumPy releases the GIL),
        try:  # written in order, each on one BLAS thread (threadpoolctl's limit is the process's: set once, here)
            for b in range(buckets):
                parts.append(open(work / f"{b}.new", "wb"))
            with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
                pending: deque = deque()
                for pos, descs in _chunks(todo, features):
                    pending.append((pos, pool.submit(vocab.bags, descs)))
                    if len(pending) >= workers:
                        put(*pending.popleft())
                while pending:
                    put(*pending.popleft())
        finally:
            for f in parts:
                f.close()
        total = int(counts.sum())
        # 2. the inverted file, a bucket of words at a time
        df = np.zeros(V, np.int64)
        norm2 = np.zeros(n, np.float64)
        crc = np.zeros(V, np.uint32)
        with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("post_img.npy", "w", force_zip64=True) as out, open(work / "sig", "wb") as sig_out:
                _npy_header(out, np.int32, total)
                written = 0
                for b in range(buckets):
                    w0, w1 = b * BUCKET_WORDS, min(V, (b + 1) * BUCKET_WORDS)
                    new = np.fromfile(work / f"{b}.new", _RECORD)
                    (work / f"{b}.new").unlink()
                    if copied is not None:
                        ow, orow, osig = copied.bucket(w0, w1)
                        words = np.concatenate([ow, new["word"]])
                        row = np.concatenate([orow, new["row"]])
                        sig = np.concatenate([osig, new["sig"]])
                    else:
                        words, row, sig = new["word"], new["row"], new["sig"]
                    del new
                    order = np.argsort(words.astype(np.int64) * n + row, kind="stable")
                    words, row, sig = words[order], row[order], sig[order]
                    bdf = np.bincount(words - w0, minlength=w1 - w0)
                    df[w0:w1] = bdf
                    idf = np.log((n + 1) / (bdf.astype(np.float32) + 1)).astype(np.float32)  # (as WordIndex's)
                    norm2 += np.bincount(row, idf[words - w0].astype(np.float64), minlength=n)
                    row = row.astype(np.int32)
                    ends = np.cumsum(bdf)
                    for j, (a, e) in enumerate(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist())):
                        crc[w0 + j] = zlib.crc32(row[a:e])
                    out.write(row.tobytes())
                    sig.astype(np.uint64).tofile(sig_out)
                    written += len(row)
                if written != total:
                    raise DamagedWords(f"{(old.path if old is not None else None) or WORDS_NAME}: the postings do "
                                       f"not add up to the rows' counts ({written} against {total})")
            ptr = np.zeros(V + 1, np.int64)
            np.cumsum(df, out=ptr[1:])
            with zf.open("post_sig.npy", "w", force_zip64=True) as out, open(work / "sig", "rb") as sig_in:
                _npy_header(out, np.uint64, total)
                for w0 in range(0, V, BUCKET_WORDS):  # the signatures' bytes, each word's CRC-32 completed
                    w1 = min(V, w0 + BUCKET_WORDS)
                    sig = np.fromfile(sig_in, np.uint64, int(ptr[w1] - ptr[w0]))
                    for w in range(w0, w1):
                        crc[w] = zlib.crc32(sig[ptr[w] - ptr[w0]:ptr[w + 1] - ptr[w0]], int(crc[w]))
                    out.write(sig.tobytes())
            for name, arr in (("top", vocab.top), ("sub", vocab.sub), ("ids", ids),
                              ("shas", np.array([rows[int(i)][1] for i in ids.tolist()], dtype="S64")),
                              ("post_ptr", ptr), ("row_norm", np.sqrt(norm2).astype(np.float32)),
                              ("row_postings", counts.astype(np.int32)), ("post_crc", crc)) + \
                    ((("projection", vocab.projection),) if vocab.projection is not None else ()):
                _write_npy(zf, name, arr)
        publish(directory, tmp, tmp_meta, fingerprint(vocab, trained_on, signature, n))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
