"""Searching an existing index with ONNX Runtime alone: no torch import, no network built, no weights read.

When retrieval/models/backbone.py has exported, checked against eager and cached a graph for a registry model, it
records it in a small manifest beside the graphs (:func:`record_graph`): the graph per (precision, input
remainder class), the fp32 graph whose per-shape check files (``.ok-HxW``) vouch for it, and what the
graph depends on (retrieve's and torch's versions, the sha256 of the network's source files).
:func:`fast_backbone` rebuilds, from an index's settings alone, an object that embeds like the index's
:class:`~retrieval.models.backbone.Backbone` -- the same cached graph, the same preprocessing and pooling -- as
long as everything the manifest records still holds (versions read from package metadata, sources
and the weights file re-hashed); otherwise, and for any input shape not checked yet, it hands over to the full backbone
(``full()``), which imports torch. Saves the ~1-2 s of importing torch and building the model.

Indexing goes the same way (:func:`index_backbone`, :func:`new_index_identity`): through the cached graphs,
including the two-output (feature map, stride-16 tap) graph the explain reference runs at 448 px, so that
``retrieve index`` never imports torch (~400 MiB of RSS before any work, bench/results/footprint.md). When
a graph is not cached yet, a short-lived child process (``python -m retrieval.models.runtime``) builds the
backbone, exports, checks and records the graphs, and exits: torch lives and dies there. Aspect-kept inputs
(``resize="long"``) are prepared at the common photo shapes (:meth:`Preprocess.common_shapes`).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from retrieval.models.pooling import GEM_EPS
from retrieval.models.preprocess import STRIDE, Preprocess, cache_dir, group_by_shape
from retrieval.models.registry import (DEFAULT_MODEL, MODEL_NAMES, REGISTRY, TORCHSCRIPT_SUFFIXES, is_registry_name,
                                       tap_layer, unknown_model)

MANIFEST_SUFFIX = ".fast.json"
#: Input pixels per ONNX Runtime run, as retrieval/models/backbone.py's ORT_RUN_PIXELS (which imports torch): the
#: runtime's arena keeps the largest activations it has seen, so a batch runs in slices of 4 images at 224 px.
ORT_RUN_PIXELS = 4 * 224 * 224


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


def _key(precision: str, hw: tuple[int, int], tap: str | None = None) -> str:
    return f"{precision}:{hw[0] % STRIDE}x{hw[1] % STRIDE}" + (f":tap={tap}" if tap else "")


def record_graph(folder: Path, bb, hw: tuple[int, int], graph: Path, ok_name: str, net,
                 tap: str | None = None) -> None:
    """Note in the manifest that ``graph`` serves ``bb`` at ``bb.precision`` for ``hw``'s remainder class
    (``tap``: the two-output graph of features_and_tap for that layer)."""
    import torch

    from retrieval import __version__
    from retrieval.models.backbone import source_hashes

    path = _manifest_path(folder, bb.name, bb.weights_id)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    deps = {"retrieve": __version__, "torch": torch.__version__, "sources": source_hashes(net)}
    if {k: doc.get(k) for k in deps} != deps:
        doc = dict(deps, graphs={})
    key = _key(bb.precision, hw, tap)
    entry = {"graph": graph.name, "checked": ok_name.rsplit(".ok-", 1)[0]}
    if doc["graphs"].get(key) == entry:
        return
    doc["graphs"][key] = entry
    _write(path, doc)


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _record_identity(folder: Path, bb, identity: dict) -> None:
    """Note beside ``bb``'s graphs what a new index records about it (:func:`new_index_identity`)."""
    path = _manifest_path(folder, bb.name, bb.weights_id)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no graph recorded: nothing to find it by
    if doc.get("identity") != identity:
        doc["identity"] = identity
        _write(path, doc)


def _valid(doc: dict) -> bool:
    from retrieval import __version__

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
        self.weights_source = settings.weights_source
        self.pooling = str(settings.pooling)  # its name: pooled here in numpy (_pool)
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
        """The full :class:`~retrieval.models.backbone.Backbone` (imports torch), built once when first needed."""
        with self._lock:
            if self._full is None:
                self._full = self._full_factory()
            return self._full

    def at_size(self, size: int) -> "FastBackbone":
        """The same graphs with another input side (the explain reference runs at 448 px); sessions shared."""
        if size == self.preprocess.size:
            return self
        other = object.__new__(FastBackbone)
        other.__dict__.update(self.__dict__)
        other.preprocess = self.preprocess.replace(size=size)
        other._full = None
        other._full_factory = lambda: self.full().at_size(size)
        other._lock = threading.Lock()
        return other

    def _entry(self, hw: tuple[int, int], tap: str | None = None) -> dict | None:
        """The manifest's graph for ``hw`` (and ``tap``) when it has been checked against eager at ``hw``."""
        entry = self._doc["graphs"].get(_key(self.precision, hw, tap))
        if entry and (self._folder / f"{entry['checked']}.ok-{hw[0]}x{hw[1]}").exists() \
                and (self._folder / entry["graph"]).is_file():
            return entry
        return None

    def ready(self, hw: tuple[int, int], tap: str | None = None) -> bool:
        return self._entry(hw, tap) is not None

    def _session(self, hw: tuple[int, int], tap: str | None = None):
        with self._lock:
            if (hw, tap) in self._sessions:
                return self._sessions[(hw, tap)]
            entry = self._entry(hw, tap)
            sess = None
            if entry:
                import onnxruntime as ort

                if tap:  # the explain reference runs after the embeddings: their session and its arena (~120 MB
                    # of the largest activations seen) go first; made again (~0.1 s) if asked for again
                    for k in [k for k in self._sessions if k[1] is None]:
                        del self._sessions[k]

                sess = ort.InferenceSession(str(self._folder / entry["graph"]), session_options(),
                                            providers=["CPUExecutionProvider"])
            self._sessions[(hw, tap)] = sess
            return sess

    @staticmethod
    def _run(sess, x: np.ndarray) -> list[np.ndarray]:
        """All outputs for the batch ``x``, run in slices of ORT_RUN_PIXELS (see there)."""
        step = max(1, ORT_RUN_PIXELS // (x.shape[-2] * x.shape[-1]))
        parts = [sess.run(None, {"x": np.ascontiguousarray(x[i:i + step])}) for i in range(0, len(x), step)]
        return parts[0] if len(parts) == 1 else [np.concatenate(o) for o in zip(*parts)]

    def _pool(self, a: np.ndarray) -> np.ndarray:
        if self._p == 1.0:
            return a.mean(axis=(2, 3))
        return np.power(np.power(np.maximum(a, GEM_EPS), self._p).mean(axis=(2, 3)), 1.0 / self._p)

    def pool_arrays(self, a: np.ndarray) -> np.ndarray:
        """The index's pooling of feature maps ``a`` (N×C×h×w) in ``a``'s dtype (float64 for the reference)."""
        return self._pool(a)

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
                out[part] = self._pool(self._run(sess, np.stack([arrays[j] for j in part]))[0])
        return out

    def features_and_tap_arrays(self, x: np.ndarray, tap: str) -> tuple[np.ndarray, np.ndarray]:
        """(feature map, output of layer ``tap``) of the batch ``x`` (N×3×h×w float32), as
        Backbone.features_and_tap, through the cached two-output graph (else the full backbone)."""
        sess = self._session(tuple(x.shape[-2:]), tap)
        if sess is None:
            import torch

            a, t = self.full().features_and_tap(torch.from_numpy(x), tap)
            return a.numpy(), t.numpy()
        a, t = self._run(sess, x)
        return a, t

    def features_arrays(self, x: np.ndarray) -> np.ndarray:
        """The feature map of the batch ``x`` (N×3×h×w float32), as Backbone.features."""
        sess = self._session(tuple(x.shape[-2:]))
        if sess is None:
            import torch

            return self.full().features(torch.from_numpy(x)).numpy()
        return self._run(sess, x)[0]

    def embed_images(self, images) -> np.ndarray:
        return self.embed_arrays([self.preprocess.array(im) for im in images])


def session_options():
    """ONNX Runtime session options of the torch-free path: ``RETRIEVE_THREADS`` (else every core) intra-op
    threads, no spinning (idle cores go to decoding). ``RETRIEVE_ORT_ARENA=0`` turns the CPU memory arena off
    (bench/footprint.py measures both)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("RETRIEVE_THREADS") or 0) or _cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    arena = os.environ.get("RETRIEVE_ORT_ARENA", "").strip()
    if arena in ("0", "off", "false", "no"):
        opts.enable_cpu_mem_arena = False
    elif arena == "same":  # grow the arena by what is asked, not by doubling
        opts.add_session_config_entry("session.arena_extend_strategy", "kSameAsRequested")
    return opts


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def fast_backbone(settings, full: Callable[[], object], env: str = "RETRIEVE_FAST_SEARCH"):
    """A :class:`FastBackbone` for an index's settings when its graphs are cached and still valid, else None
    (then use ``full()``). Only registry models (recorded by name) with GAP or GeM pooling qualify."""
    if _fast_disabled(env):
        return None  # RETRIEVE_FAST_SEARCH=0 (RETRIEVE_FAST_INDEX=0): always the full backbone (comparisons)
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


# -- indexing without torch -------------------------------------------------------------------------------------
def _fast_disabled(var: str) -> bool:
    return os.environ.get(var, "1").strip() in ("0", "false", "no", "off")


def _indexes_without_torch(model: str, pooling) -> bool:
    """Whether indexing with these settings can go through the cached graphs: a registry model, GAP or GeM
    pooling (R-MAC is pooled by the full one), and ``RETRIEVE_FAST_INDEX`` not 0. Aspect-kept inputs
    (``resize="long"``, the instance preset) have one graph (every side a multiple of the stride), checked against
    eager at the common photo shapes in the child (Preprocess.common_shapes); another shape, when first met, by the
    full backbone (which imports torch)."""
    return (not _fast_disabled("RETRIEVE_FAST_INDEX") and is_registry_name(model)
            and str(pooling or "gap").partition(":")[0] in ("gap", "gem"))


def explain_target(model: str, size: int) -> tuple[int, str | None]:
    """(explain input side, stride-16 tap layer) the end-of-run reference uses for a new index of ``model``."""
    from retrieval.index.store import default_explain

    return int(default_explain(size)["input_size"]), tap_layer(model)


def _prepare_in_child(spec: dict) -> dict | None:
    """Run :func:`_prepare` in a short-lived child process (torch is imported there, never here); its answer
    (the backbone's identity, see there), or None when it failed (the caller then builds the backbone here,
    which reports the failure in its own words)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    try:
        r = subprocess.run([sys.executable, "-m", "retrieval.models.runtime", json.dumps(spec)], capture_output=True,
                           text=True, env=env, timeout=1800)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _prepare(spec: dict) -> dict:
    """In the child: build the backbone ``spec`` describes, export/check/record its graph at ``shapes`` and the
    tap graph at ``explain`` ([size, layer]), record its identity; return the settings fields a new index takes
    from it (name, weights_id, weights_source, preprocess, dim, pooling)."""
    import torch

    from retrieval.models.backbone import _Tapped  # noqa: F401  (the tap runner wraps the network itself)
    from retrieval.models.loading import load_backbone

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    weights = spec.get("weights")
    random = spec.get("weights_id") == "random"
    bb = load_backbone(spec["model"], weights, input_size=spec.get("input_size"), resize=spec.get("resize"),
                       pooling=spec.get("pooling"), random_weights=random,
                       expected_sha256=None if random else spec.get("weights_id"))
    bb.precision = spec.get("precision") or "fp32"
    for hw in spec.get("shapes") or bb.preprocess.common_shapes():
        bb._runner(tuple(hw))  # exports, checks against eager and records the graph (retrieval/models/backbone.py)
    folder = cache_dir() / "onnx"
    explain = spec.get("explain")
    if explain == "auto":
        explain = explain_target(bb.name, bb.preprocess.size)
    if explain and not explain[1]:
        e = bb.at_size(int(explain[0]))
        e._runner(e.preprocess.input_shape)  # recorded as any graph of the final map
    elif explain:
        e = bb.at_size(int(explain[0]))
        suffix = ""
        if bb.precision != "fp32":  # the quantised graph is named after the checked fp32 one (retrieval/models/backbone.py)
            from retrieval.models.precision import quant_variant

            suffix = f"-{quant_variant()}"
        for hw in e.preprocess.common_shapes():  # the reference keeps the index's aspect policy
            graph = getattr(e._runner(hw + (explain[1],)), "graph", None)
            stem = graph.stem.removesuffix(suffix) if graph is not None else ""
            ok = f"{stem}.ok-{hw[0]}x{hw[1]}"
            if graph is not None and "-mod32-" in graph.name and (graph.parent / ok).exists():
                record_graph(folder, e, hw, graph, ok, bb.net, tap=explain[1])
    if weights is None and not random and bb.name in REGISTRY:  # found again by name (new_index_identity)
        _record_identity(folder, bb, {"name": bb.name, "weights_id": bb.weights_id,
                                      "weights_source": bb.weights_source, "dim": int(bb.feature_dim),
                                      "default_weights": True,
                                      "preprocess": REGISTRY[bb.name].preprocess.to_dict()})
    return {"model": bb.name, "weights_id": bb.weights_id, "weights_source": bb.weights_source,
            "preprocess": bb.preprocess.to_dict(), "dim": int(bb.feature_dim), "pooling": str(bb.pooling)}


def new_index_identity(model: str | None, weights: str | None, input_size: int | None, resize: str | None,
                       pooling: str | None, precision: str) -> dict | None:
    """The settings a new index takes from its backbone (model, weights_id, weights_source, preprocess, dim,
    pooling) as :func:`retrieval.models.loading.load_backbone` would give them, without importing torch: from the
    manifest of the cached graphs, else from a child process that builds the backbone (and caches its graphs).
    None where indexing keeps the torch path: a user's model, ``RETRIEVE_FAST_INDEX=0``, ONNX Runtime
    missing, or the child failed."""
    model = model or DEFAULT_MODEL
    if is_registry_name(model) and model not in MODEL_NAMES and Path(model).suffix not in TORCHSCRIPT_SUFFIXES:
        raise unknown_model(model)
    if not _indexes_without_torch(model, pooling):
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    if pooling in (None, "gap") and not weights:
        got = _identity_from_manifest(model, input_size, resize)
        if got is not None:
            return got
    return _prepare_in_child({"model": model, "weights": str(Path(weights).expanduser().resolve()) if weights else None,
                              "input_size": input_size, "resize": resize, "pooling": pooling, "precision": precision,
                              "explain": "auto", "threads": os.environ.get("RETRIEVE_THREADS")})


def _identity_from_manifest(model: str, input_size: int | None, resize: str | None) -> dict | None:
    """A registry model with its default weights, GAP pooling: the identity recorded beside its graphs, when
    the weights file still has the recorded hash."""
    folder = cache_dir() / "onnx"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)[-60:]
    here = _manifest_path(folder, model, "x" * 16).name.rsplit("-", 1)[1]
    for path in sorted(folder.glob(f"{safe}-*-{here}")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        ident = doc.get("identity") or {}
        if ident.get("name") != model or not ident.get("default_weights") or not ident.get("preprocess") \
                or not _valid(doc):
            continue
        src = Path(ident.get("weights_source") or "")
        try:
            with open(src, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != ident.get("weights_id"):
                    continue
        except OSError:
            continue
        pre = Preprocess.from_dict(ident["preprocess"])
        if input_size is not None:
            pre = pre.replace(size=int(input_size))
        if resize is not None:
            pre = pre.replace(resize=resize)
        return {"model": model, "weights_id": ident["weights_id"], "weights_source": ident["weights_source"],
                "preprocess": pre.to_dict(), "dim": int(ident["dim"]), "pooling": "gap"}
    return None


def index_backbone(settings, full: Callable[[], object]):
    """For indexing into an index with ``settings``: a :class:`FastBackbone` whose graphs for the index's input
    shape and for the explain reference (448-px tap graph) are cached -- prepared in a child process when they
    are not -- else ``full()`` (imports torch). The common photo shapes of the index's preprocessing must have been
    checked (Preprocess.common_shapes). A user's model, R-MAC pooling and ``RETRIEVE_FAST_INDEX=0`` go the full way."""
    if not _indexes_without_torch(str(settings.model), str(settings.pooling)):  # None pooling: the full one
        return full()
    size = int((settings.explain or {}).get("input_size") or settings.preprocess.get("size"))

    tap = tap_layer(str(settings.model))
    precision = getattr(settings, "precision", "fp32") or "fp32"

    def usable(fb) -> bool:
        if fb is None or not all(fb.ready(hw) for hw in fb.preprocess.common_shapes()):
            return False
        e = fb.at_size(size)
        return all(e.ready(hw, tap) for hw in e.preprocess.common_shapes())

    fb = fast_backbone(settings, full, "RETRIEVE_FAST_INDEX")
    if usable(fb):
        return fb
    if _prepare_in_child({"model": settings.model, "weights": settings.weights_source
                          if settings.weights_id != "random" else None, "weights_id": settings.weights_id,
                          "input_size": settings.preprocess.get("size"), "resize": settings.preprocess.get("resize"),
                          "pooling": settings.pooling, "precision": precision, "explain": [size, tap],
                          "threads": os.environ.get("RETRIEVE_THREADS")}) is not None:
        fb = fast_backbone(settings, full, "RETRIEVE_FAST_INDEX")
        if fb is not None and fb.ready(fb.preprocess.input_shape):
            return fb  # the reference falls back to the full backbone if its graph could not be made
    return full()


if __name__ == "__main__":  # the child of _prepare_in_child
    import sys

    print(json.dumps(_prepare(json.loads(sys.argv[1]))))
