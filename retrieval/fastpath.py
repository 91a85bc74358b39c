"""Searching an existing index with ONNX Runtime alone: no torch import, no network built, no weights read.

When retrieval/backbone.py has exported, checked against eager and cached a graph for a registry model, it
records it in a small manifest beside the graphs (:func:`record_graph`): the graph per (precision, input
remainder class), the fp32 graph whose per-shape check files (``.ok-HxW``) vouch for it, and what the
graph depends on (retrieve's and torch's versions, the sha256 of the network's source files).
:func:`fast_backbone` rebuilds, from an index's settings alone, an object that embeds like the index's
:class:`~retrieval.backbone.Backbone` -- the same cached graph, the same preprocessing and pooling -- as
long as everything the manifest records still holds (versions read from package metadata, sources
and the weights file re-hashed); otherwise, and for any input shape not checked yet, it hands over to the full backbone
(``full()``), which imports torch. Saves the ~1-2 s of importing torch and building the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .preprocess import STRIDE, Preprocess, cache_dir, group_by_shape

MANIFEST_SUFFIX = ".fast.json"
GEM_EPS = 1e-6  # as retrieval/pooling.py


def _manifest_path(folder: Path, name: str, weights_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]
    here = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:8]  # per installation
    return folder / f"{safe}-{weights_id[:16]}-{here}{MANIFEST_SUFFIX}"


def _torch_version() -> str:
    """torch's ``__version__`` from its ``version.py``, read without importing torch or ``importlib.metadata``
    (which costs ~50 ms of a search's start-up scanning the installed distributions); the metadata otherwise."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.origin:
            text = Path(spec.origin).with_name("version.py").read_text()
            m = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            if m:
                return m.group(1)
    except (OSError, ImportError, ValueError):
        pass
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""


def record_graph(folder: Path, bb, hw: tuple[int, int], graph: Path, ok_name: str, net) -> None:
    """Note in the manifest that ``graph`` serves ``bb`` at ``bb.precision`` for ``hw``'s remainder class."""
    import torch

    from . import __version__
    from .backbone import source_hashes

    path = _manifest_path(folder, bb.name, bb.weights_id)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    deps = {"retrieve": __version__, "torch": torch.__version__, "sources": source_hashes(net)}
    if {k: doc.get(k) for k in deps} != deps:
        doc = dict(deps, graphs={})
    key = f"{bb.precision}:{hw[0] % STRIDE}x{hw[1] % STRIDE}"
    entry = {"graph": graph.name, "checked": ok_name.rsplit(".ok-", 1)[0]}
    if doc["graphs"].get(key) == entry:
        return
    doc["graphs"][key] = entry
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _valid(doc: dict) -> bool:
    from . import __version__

    if doc.get("retrieve") != __version__ or doc.get("torch", "").split("+")[0] != _torch_version().split("+")[0]:
        return False
    for f, digest in (doc.get("sources") or {}).items():
        try:
            if hashlib.sha256(Path(f).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return bool(doc.get("sources"))


class FastBackbone:
    """Embeds like the index's backbone through cached graphs; see the module docstring."""

    kind = "onnxruntime"

    def __init__(self, settings, doc: dict, folder: Path, full: Callable[[], object]):
        self.name = settings.model
        self.weights_id = settings.weights_id
        self.preprocess = Preprocess.from_dict(settings.preprocess)
        self.feature_dim = int(settings.dim)
        self.precision = getattr(settings, "precision", "fp32") or "fp32"
        kind, _, p = str(settings.pooling).partition(":")
        self._p = float(p) if kind == "gem" else 1.0
        self._doc, self._folder, self._full_factory = doc, folder, full
        self._full = None
        self._sessions: dict = {}
        self._lock = threading.Lock()

    def full(self):
        """The full :class:`~retrieval.backbone.Backbone` (imports torch), built once when first needed."""
        with self._lock:
            if self._full is None:
                self._full = self._full_factory()
            return self._full

    def _session(self, hw: tuple[int, int]):
        with self._lock:
            if hw in self._sessions:
                return self._sessions[hw]
            entry = self._doc["graphs"].get(f"{self.precision}:{hw[0] % STRIDE}x{hw[1] % STRIDE}")
            sess = None
            if entry and (self._folder / f"{entry['checked']}.ok-{hw[0]}x{hw[1]}").exists() \
                    and (self._folder / entry["graph"]).is_file():
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = int(os.environ.get("RETRIEVE_THREADS") or 0) or _cores()
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sess = ort.InferenceSession(str(self._folder / entry["graph"]), opts,
                                            providers=["CPUExecutionProvider"])
            self._sessions[hw] = sess
            return sess

    def _pool(self, a: np.ndarray) -> np.ndarray:
        if self._p == 1.0:
            return a.mean(axis=(2, 3))
        return np.power(np.power(np.maximum(a, GEM_EPS), self._p).mean(axis=(2, 3)), 1.0 / self._p)

    def embed_arrays(self, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(arrays), self.feature_dim), np.float32)
        for idx in group_by_shape(arrays):
            hw = tuple(arrays[idx[0]].shape[-2:])
            sess = self._session(hw)
            if sess is None:  # a shape never checked against eager: the full backbone checks it
                out[idx] = self.full().embed_arrays([arrays[j] for j in idx], batch_size)
                continue
            for i in range(0, len(idx), batch_size):
                part = idx[i:i + batch_size]
                a = sess.run(None, {"x": np.ascontiguousarray(np.stack([arrays[j] for j in part]))})[0]
                out[part] = self._pool(a)
        return out

    def embed_images(self, images) -> np.ndarray:
        return self.embed_arrays([self.preprocess.array(im) for im in images])


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def fast_backbone(settings, full: Callable[[], object]):
    """A :class:`FastBackbone` for an index's settings when its graphs are cached and still valid, else None
    (then use ``full()``). Only registry models (recorded by name) with GAP or GeM pooling qualify."""
    if os.environ.get("RETRIEVE_FAST_SEARCH", "1").strip() in ("0", "false", "no", "off"):
        return None  # RETRIEVE_FAST_SEARCH=0: always the full backbone (comparisons, debugging)
    model = str(settings.model)
    if ":" in model or "/" in model or os.sep in model or Path(model).exists():  # a user's model: never
        return None
    if str(settings.pooling).partition(":")[0] not in ("gap", "gem"):
        return None
    folder = cache_dir() / "onnx"
    try:
        doc = json.loads(_manifest_path(folder, settings.model, settings.weights_id).read_text())
    except (OSError, ValueError):
        return None
    # the weights file is hashed (tens of ms; hashlib lets go of the GIL) while ONNX Runtime is imported
    weights = _Background(_weights_unchanged, settings)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        weights.result()
        return None
    if not weights.result() or not _valid(doc):
        return None
    return FastBackbone(settings, doc, folder, full)


class _Background:
    """``fn(*args)`` in a thread; :meth:`result` waits for it (and raises what it raised)."""

    def __init__(self, fn, *args):
        self._out: list = []
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001  (handed to result())
            self._out.append((False, e))

    def result(self):
        self._thread.join()
        ok, value = self._out[0]
        if not ok:
            raise value
        return value


def _weights_unchanged(settings) -> bool:
    """The index's weights file still has the recorded sha256 (else the full path refuses it, in its words)."""
    if settings.weights_id == "random":
        return True
    src = Path(settings.weights_source or "")
    if not src.is_file():
        return False
    with open(src, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() == settings.weights_id
