"""``retrieve index --engine ray``: the embedding step of an index run on a Ray cluster (or a local Ray).

The driver (this process) scans, plans and commits as the local engine does (indexer/run.py, indexer/plan.py,
``indexer/rows.py``'s ``commit_embedded``), in transactions of at least a batch that grow with the rate the cluster
delivers (``indexer/rows.py``'s :class:`Commits`); only reading, decoding and embedding move out, into a Ray Data
pipeline:

    from_items(files to do) → map_batches(read, hash, decode, preprocess)        Ray tasks
                            → map_batches(embed)                                an actor pool: each actor
                                                                                holds the backbone, loaded once
                            → streamed back to the driver → commit batch by batch

The actors get the driver's own :class:`Backbone` (same network, weights and preprocessing, shipped once
through the object store), so the vectors are the local engine's. A file whose content hash the index
already knows (touched, moved or copied: indexer/plan.py) is not decoded by the workers; the driver
reuses its vector as the local engine does. Files must be readable at the same paths on every node (a
shared filesystem) and ``retrieve`` installed there with its ``ray`` extra.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval.errors import ImageError, RetrieveError

NEEDS_EXTRA = "the Ray engine needs the ray extra: pip install -e '.[ray]'"
_FORWARDED_ENV = ("RETRIEVE_MAX_FILE_MB", "RETRIEVE_MAX_MEGAPIXELS", "RETRIEVE_TRUST_MODEL")


def require_ray():
    """The ``ray`` module with Ray Data, or :class:`RetrieveError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra lacks pyarrow/pandas)
    except ImportError:
        raise RetrieveError(NEEDS_EXTRA) from None
    return ray


def ray_runner(address: str | None) -> Callable:
    """The engine hook for ``indexer.run.index_paths``: same signature as ``indexer.run._run``."""
    require_ray()

    def run(store, bb, files, trees, report, batch_size, workers, progress, on_skip, stop, prune_missing=False):
        _run_ray(store, bb, files, trees, report, batch_size, workers, progress, on_skip, stop, address, prune_missing)

    return run


# -- the cluster --------------------------------------------------------------------------------
def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


DECODE_CPUS = 0.5  # the logical CPUs a decoding task asks for


@dataclasses.dataclass
class PoolShape:
    workers: int  # embedding actors
    threads: int  # torch/ONNX Runtime threads in each actor
    cpus: float  # CPUs of the cluster (logical)
    actor_cpus: float = 0.0  # the logical CPUs each actor asks for (0: ``threads``)


def pool_shape(workers: int | None, cluster_cpus: float, node_cpus: float, smallest_node: float | None = None) -> PoolShape:
    """Actors and threads per actor. By default one single-threaded actor per CPU the decoding leaves free
    (it keeps one CPU of a small cluster, a quarter of a large one); ``workers`` actors share those CPUs
    (at most one node's worth per actor). An actor asks for at most its ``smallest_node``'s CPUs less a decoding
    task's, so that any one node can run an actor and the decoding beside it: a cluster that loses nodes mid-run,
    down to a single small one, keeps going instead of waiting for CPUs that are gone."""
    usable = max(1, int(cluster_cpus * 3 // 4) if cluster_cpus >= 4 else int(cluster_cpus) - 1)
    n = workers or usable
    threads = max(1, min(int(node_cpus), usable // n))
    small = node_cpus if smallest_node is None else smallest_node
    return PoolShape(n, threads, cluster_cpus, min(float(threads), max(DECODE_CPUS, small - DECODE_CPUS)))


@contextmanager
def ray_session(address: str | None, workers: int | None):
    """Ray connected (to ``address``, to the session this process already has, or to a new local one on this
    machine's CPUs); yields the :class:`PoolShape`. A Ray started here is shut down on the way out.

    A local Ray gets this machine's cores for ``workers`` actors (default: one per core, threads sharing the
    cores) plus one logical CPU for the decoding tasks, which run beside inference as the local engine's
    decoding threads do."""
    ray = require_ray()
    _quiet_logs()
    started = False
    shape = None
    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if address:
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            try:
                ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                         **({} if address.startswith("ray://") else quiet))
            except Exception as e:  # ConnectionError, ValueError … one line naming the address
                raise RetrieveError(f"--ray-address {address}: cannot connect to a Ray cluster "
                                    f"({_first_line(e)})") from None
        else:
            cpus = _local_cpus()
            n = workers or cpus
            threads = max(1, cpus // n)
            root = str(Path(__file__).resolve().parent.parent)  # the workers import this very tree
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=n * threads + 1, object_store_memory=_object_store_bytes(),
                     runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)
            shape = PoolShape(n, threads, float(n * threads + 1))
        started = True
    try:
        if shape is None:
            cpus = float(ray.cluster_resources().get("CPU", 1))
            nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            nodes = [c for c in nodes if c > 0] or [cpus]
            shape = pool_shape(workers, cpus, max(nodes), min(nodes))
        yield shape
    finally:
        if started:
            ray.shutdown()


def _quiet_logs() -> None:
    """Ray's and Ray Data's INFO lines and notices (progress, token authentication) off the terminal; Ray
    Data's log file under the session folder keeps everything."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__:
            h.setLevel(logging.ERROR)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _object_store_bytes() -> int:
    """A local Ray's object store: enough for the pipeline's blocks in flight, not a third of the RAM."""
    return int(os.environ.get("RETRIEVE_RAY_OBJECT_STORE_MB", "1024")) * 1_000_000


# -- the pipeline's stages (run in Ray workers) ---------------------------------------------------
def _resolved(value):
    """An argument Ray Data passed on as an object reference, fetched (from this node's object store)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _hash_prefix(sha256: str) -> int:
    return int(sha256[:16], 16)


def known_prefixes(hashes) -> np.ndarray:
    """Sorted 64-bit prefixes of the content hashes the index holds: the workers skip decoding those files
    (a prefix collision only sends a file back to the driver, which then embeds it itself)."""
    return np.unique(np.fromiter((_hash_prefix(h) for h in hashes), np.uint64))


def decode_batch(batch: dict, known: np.ndarray, preprocess, min_side: int, verify: dict | None) -> dict:
    """Ray task: read, hash, decode and preprocess each file (the local engine's ``decode``, row by row)."""
    from retrieval.images import decode_image, read_image_bytes

    known = _resolved(known)
    verifier = None
    if verify:
        from retrieval.match.verify import Verifier

        verifier = Verifier(cache=False, **verify)  # the index's side and budget (retrieval.match.verify.local_options)
    out = {k: [] for k in ("status", "reason", "sha256", "width", "height", "array", "h", "w", "feats")}

    def put(status, reason="", sha="", width=0, height=0, array=b"", h=0, w=0, feats=b""):
        for k, v in zip(out, (status, reason, sha, width, height, array, h, w, feats)):
            out[k].append(v)

    for path in batch["path"]:
        path = str(path)
        try:
            data = read_image_bytes(path)
        except ImageError as exc:
            put("error", exc.reason)
            continue
        sha = hashlib.sha256(data).hexdigest()
        p = np.uint64(_hash_prefix(sha))
        i = int(np.searchsorted(known, p))
        if i < len(known) and known[i] == p:
            put("known", sha=sha)  # touched, moved or copied: the driver decides (plan.classify)
            continue
        try:
            img = decode_image(data, path, min_side=min_side)
        except ImageError as exc:
            put("error", exc.reason, sha)
            continue
        feats = b""
        if verifier is not None:
            f = verifier.extract(img)
            buf = io.BytesIO()
            np.savez(buf, points=f.points, descriptors=f.descriptors, size=np.int64(f.size))
            feats = buf.getvalue()
        arr = preprocess.array(img)
        put("embed", "", sha, img.size[0], img.size[1], arr.tobytes(), arr.shape[1], arr.shape[2], feats)
    res = {k: batch[k] for k in ("path", "size", "mtime_ns")}
    for k, v in out.items():
        res[k] = np.array(v, dtype=object if k in ("status", "reason", "sha256", "array", "feats") else np.int64)
    return res


class Embedder:
    """Ray actor: the backbone, received once, embeds the decoded rows of each batch."""

    def __init__(self, backbone, threads: int):
        import torch

        from retrieval.models.networks import pick_device

        torch.set_num_threads(threads)  # before the fast path is built: ONNX Runtime takes the same count
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        self.bb = _resolved(backbone).to(pick_device(None))

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        vecs = np.zeros((n, self.bb.feature_dim), np.float32)
        idx = [i for i in range(n) if batch["status"][i] == "embed"]
        if idx:
            arrays = [np.frombuffer(batch["array"][i], np.float32).reshape(3, int(batch["h"][i]), int(batch["w"][i]))
                      for i in idx]
            vecs[idx] = self.bb.embed_arrays(arrays, batch_size=len(arrays))
        out = {k: v for k, v in batch.items() if k not in ("array", "h", "w")}
        out["vector"] = vecs
        return out


def portable(bb):
    """A copy of ``bb`` that pickles with its network (built here) and without this machine's graph cache (ONNX
    sessions and their paths stay behind: Backbone.__getstate__)."""
    bb = bb.replace(manifest=None)
    bb.net  # built before it travels
    return bb


# -- the driver -----------------------------------------------------------------------------------
def _run_ray(store, bb, files, trees, report, batch_size, workers, progress, on_skip, stop, address,
             prune_missing=False) -> None:
    from retrieval.images import decode_image, read_image_bytes
    from retrieval.scan import FileEntry

    from retrieval.match.verify import decode_side, local_options

    from .rows import Commits, Decoded, by_path, drop_vanished, plan_run, record_skip, reuse

    plan = plan_run(store, files, trees, report)
    todo = plan.todo
    progress.start(len(todo))

    verifier = None
    if store.settings.search.get("verify"):
        from retrieval.match.verify import LocalFeatures, Verifier

        verifier = Verifier.for_index(store.settings)
    min_side = decode_side(store.settings)  # one decode rule for every embedding (retrieval/presets.py)

    commits = Commits(store, plan.rows, report, batch_size, progress.advance)

    def skip(d) -> None:
        record_skip(store, d, plan.rows)
        report.skipped += 1
        report.skipped_files.append({"path": d.entry.path, "reason": d.error})
        on_skip(d.entry.path, d.error)
        progress.advance(1)

    def embed_here(d):
        """The rare file the workers passed back but that must be embedded after all: embedded here."""
        try:
            img = decode_image(read_image_bytes(d.entry.path), d.entry.path, min_side=min_side)
        except ImageError as exc:
            d.error = exc.reason
            return d, None
        if verifier is not None:
            verifier.save(d.sha256, verifier.extract(img))
        d.width, d.height = img.info.get("original_size", img.size)  # the photo's own size, not the reduced decode's
        return d, bb.embed_arrays([bb.preprocess.array(img)], batch_size=1)[0]

    if todo:
        with ray_session(address, workers) as shape:
            import ray

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            known = ray.put(known_prefixes(r.sha256 for r in plan.rows.values()))
            model = ray.put(portable(bb))
            items = [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in todo]
            per_block = max(4, min(batch_size, -(-len(items) // (2 * shape.workers))))
            blocks = max(1, -(-len(items) // per_block))
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            ds = ds.map_batches(decode_batch, batch_size=per_block, batch_format="numpy", num_cpus=DECODE_CPUS,
                                fn_args=(known, bb.preprocess, min_side,
                                         local_options(store.settings) if verifier is not None else None))
            ds = ds.map_batches(Embedder, batch_size=batch_size, batch_format="numpy",
                                num_cpus=shape.actor_cpus or shape.threads,
                                fn_constructor_args=(model, shape.threads),
                                compute=ray.data.ActorPoolStrategy(size=min(shape.workers, blocks)))
            stream = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
            try:
                for b in stream:
                    for i in range(len(b["path"])):
                        if stop.is_set():
                            raise KeyboardInterrupt
                        e = FileEntry(str(b["path"][i]), int(b["size"][i]), int(b["mtime_ns"][i]))
                        d = Decoded(e, sha256=str(b["sha256"][i]))
                        status = b["status"][i]
                        v = None
                        if status == "error":
                            d.error = str(b["reason"][i])
                        elif status == "known":
                            kind, _ = plan.classify(e.path, d.sha256)
                            d.reuse = kind if kind != "embed" else None
                            if d.reuse is not None and reuse(store, d, plan, report):
                                progress.advance(1)
                                continue
                            d.reuse = None
                            d, v = embed_here(d)
                        else:
                            d.width, d.height = int(b["width"][i]), int(b["height"][i])
                            v = b["vector"][i]
                            if verifier is not None and len(b["feats"][i]):
                                with np.load(io.BytesIO(b["feats"][i])) as z:
                                    verifier.save(d.sha256, LocalFeatures(z["points"], z["descriptors"],
                                                                          tuple(int(x) for x in z["size"])))
                        if d.error:
                            skip(d)
                            continue
                        commits.add(d, np.asarray(v, np.float32))
                commits.flush()
            except ray.exceptions.RayError as e:
                if stop.is_set():  # Ctrl-C reached a local Ray's workers too: an interruption, not a failure
                    raise KeyboardInterrupt from None
                raise RetrieveError(f"the Ray engine failed ({_first_line(e)}); what was committed is kept, run "
                                    "the same command again to continue") from e
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
    drop_vanished(store, by_path(plan.removed()), [e.path for e in files], report, prune_missing)
