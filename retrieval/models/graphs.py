"""The ONNX graphs a backbone runs through on the CPU: exported once, checked against eager PyTorch, cached on disk,
and run by ONNX Runtime without importing torch.

**One graph per remainder class.** A graph with dynamic batch, height and width serves every input shape whose sides
have the same remainders mod 32 -- every shape an index uses at the default sizes (squashed squares and aspect-kept
sides are multiples of the stride) -- instead of one 13.5 MB graph per shape. Why mod 32: TF "same" padding
(EfficientNet-Lite) depends on the parity of the map at each of the five stride-2 layers, which the remainder mod 32
fixes, and the exporter records that padding as constants. Each (graph, input shape) is compared once with eager on a
random input before it is used, and the verdict is kept beside the graph (``<graph>.ok-HxW``); where a graph does not
reproduce eager (a user's model with other shape-dependent code), that shape gets a graph exported at exactly that
shape. Graphs are keyed by the weights, retrieve's and torch's versions and the network's source files
(:func:`onnx_cache_key`); an export killed half-way leaves only a temporary file, removed later
(:func:`remove_stale_exports`).

**The manifest.** For a registry backbone, a small JSON file beside the graphs (:class:`Manifest`) records the graph
per (precision, input remainder class, tap layer), the fp32 graph whose check files vouch for it, what the graphs
depend on (retrieve's and torch's versions, the sha256 of the network's source files) and the backbone's identity.
A backbone made from an index's settings reads it (:func:`read_manifest`) and runs the recorded graphs with ONNX
Runtime alone -- no torch import, no network built, no weights read (~1-2 s of a search's start-up) -- as long as
everything it records still holds; for any other shape it builds the network (retrieval/models/backbone.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.models.preprocess import STRIDE, cache_dir

#: Input pixels per ONNX Runtime run (4 images at 224 px, 1 at 448): a batch is run in slices of this size. The
#: runtime's memory arena keeps the largest activations it has seen (Lite0's first expanded layer alone is 4.8 MB per
#: 224-px image), so a whole batch of 32 grew the process by ~880 MB, slices of 4 by ~120 MB, at the same speed
#: (bench/results/footprint.md).
ORT_RUN_PIXELS = 4 * 224 * 224
MANIFEST_SUFFIX = ".fast.json"
GRAPH_RECIPE = "pads-folded"  # how an exported graph is post-processed (fold_pads): part of its cache key


def folder() -> Path:
    """The graph cache: ``$XDG_CACHE_HOME/retrieve/onnx``."""
    return cache_dir() / "onnx"


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


# -- running a graph (no torch) ------------------------------------------------------------------------------
def session_options():
    """ONNX Runtime session options: ``RETRIEVE_THREADS`` (else every core) intra-op threads, no spinning (idle
    cores go to decoding). ``RETRIEVE_ORT_ARENA=0`` turns the CPU memory arena off (bench/footprint.py measures
    both); ``same`` grows it by what is asked rather than by doubling."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = inference_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    arena = os.environ.get("RETRIEVE_ORT_ARENA", "").strip()
    if arena in ("0", "off", "false", "no"):
        opts.enable_cpu_mem_arena = False
    elif arena == "same":
        opts.add_session_config_entry("session.arena_extend_strategy", "kSameAsRequested")
    return opts


def inference_threads() -> int:
    """The threads inference runs on: ``RETRIEVE_THREADS`` (``--threads``), else the cores this process may use."""
    threads = os.environ.get("RETRIEVE_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


class GraphRunner:
    """One cached graph in an ONNX Runtime session: a batch (N×3×h×w float32) in, its outputs (the feature map, and
    with a tap the tapped layer's map) out as float32 arrays, run in slices of :data:`ORT_RUN_PIXELS`."""

    kind = "onnxruntime"

    def __init__(self, graph: Path):
        import onnxruntime as ort

        self.graph = Path(graph)
        self.stamp = graph_stamp(self.graph)
        self.session = ort.InferenceSession(str(self.graph), session_options(), providers=["CPUExecutionProvider"])

    def serves(self, graph: Path) -> bool:
        """Whether this session is of ``graph`` as the file is now (one session serves every input shape of its
        graph: ONNX Runtime sessions take any shape, and each holds its own copy of the weights and its buffers)."""
        return self.graph == Path(graph) and self.stamp == graph_stamp(graph)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        step = max(1, ORT_RUN_PIXELS // (x.shape[-2] * x.shape[-1]))
        parts = [self.session.run(None, {"x": x[i:i + step]}) for i in range(0, len(x), step)]
        return parts[0] if len(parts) == 1 else [np.concatenate(o) for o in zip(*parts)]


def graph_stamp(graph: Path) -> tuple[int, int] | None:
    """The graph file as it is now (modified time, size); None when it is gone."""
    try:
        st = os.stat(graph)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# -- what a graph depends on ------------------------------------------------------------------------------------
_SOURCE_HASHES: dict[str, str] = {}


def source_hashes(net) -> dict[str, str]:
    """{source file: sha256} of every module class in ``net`` (a torch module), sorted by path."""
    import inspect

    files = set()
    for m in net.modules():
        try:
            files.add(inspect.getsourcefile(type(m)) or "")
        except TypeError:  # a built-in class
            pass
    out = {}
    for f in sorted(files - {""}):
        if f not in _SOURCE_HASHES:
            try:
                _SOURCE_HASHES[f] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
            except OSError:
                _SOURCE_HASHES[f] = "unreadable"
        out[f] = _SOURCE_HASHES[f]
    return out


def onnx_cache_key(net) -> str:
    """A hash of what an exported graph depends on besides the weights: this retrieve's version, torch's (the
    exporter's) and the source files of every module class in ``net`` (the network's code)."""
    import torch

    from retrieval import __version__

    h = hashlib.sha256(f"retrieve {__version__}; torch {torch.__version__}; {GRAPH_RECIPE}".encode())
    for f, digest in source_hashes(net).items():
        h.update(f"{os.path.basename(f)} {digest}".encode())
    return h.hexdigest()


def torch_version() -> str:
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


# -- the manifest ---------------------------------------------------------------------------------------------
def manifest_path(where: Path, name: str, weights_id: str) -> Path:
    here = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:8]  # per installation
    return where / f"{safe_name(name)}-{weights_id[:16]}-{here}{MANIFEST_SUFFIX}"


def graph_key(precision: str, hw: tuple[int, int], tap: str | None = None) -> str:
    return f"{precision}:{hw[0] % STRIDE}x{hw[1] % STRIDE}" + (f":tap={tap}" if tap else "")


class Manifest:
    """What the cache holds for one backbone (name, weights): its checked graphs and its identity."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc

    @classmethod
    def load(cls, name: str, weights_id: str) -> "Manifest | None":
        path = manifest_path(folder(), name, weights_id)
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def valid(self) -> bool:
        """Made by this retrieve with this torch from these network sources (re-hashed)."""
        from retrieval import __version__

        doc = self.doc
        if doc.get("retrieve") != __version__ or doc.get("torch", "").split("+")[0] != torch_version().split("+")[0]:
            return False
        for f, digest in (doc.get("sources") or {}).items():
            try:
                if hashlib.sha256(Path(f).read_bytes()).hexdigest() != digest:
                    return False
            except OSError:
                return False
        return bool(doc.get("sources"))

    def graph(self, precision: str, hw: tuple[int, int], tap: str | None = None) -> Path | None:
        """The recorded graph for ``hw`` (and ``tap``) at ``precision`` when it has been checked against eager at
        exactly ``hw``; None otherwise."""
        entry = (self.doc.get("graphs") or {}).get(graph_key(precision, hw, tap))
        if not entry:
            return None
        where = self.path.parent
        if (where / f"{entry['checked']}.ok-{hw[0]}x{hw[1]}").exists() and (where / entry["graph"]).is_file():
            return where / entry["graph"]
        return None

    def write(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.doc, indent=1))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)


def record_graph(bb, hw: tuple[int, int], graph: Path, checked: str, net, tap: str | None = None) -> None:
    """Note in ``bb``'s manifest that ``graph`` serves it at ``bb.precision`` for ``hw``'s remainder class
    (``checked``: the fp32 graph whose ``.ok-HxW`` files vouch for it; ``tap``: the two-output graph)."""
    import torch

    from retrieval import __version__

    m = Manifest.load(bb.name, bb.weights_id) or Manifest(manifest_path(folder(), bb.name, bb.weights_id), {})
    deps = {"retrieve": __version__, "torch": torch.__version__, "sources": source_hashes(net)}
    if {k: m.doc.get(k) for k in deps} != deps:
        m.doc = dict(deps, graphs={})
    key = graph_key(bb.precision, hw, tap)
    entry = {"graph": graph.name, "checked": checked}
    if m.doc["graphs"].get(key) != entry:
        m.doc["graphs"][key] = entry
        m.write()


def record_identity(bb, identity: dict) -> None:
    """Note beside ``bb``'s graphs what a new index records about it (retrieval/models/prepare.py)."""
    m = Manifest.load(bb.name, bb.weights_id)
    if m is not None and m.doc.get("identity") != identity:
        m.doc["identity"] = identity
        m.write()


# -- making a graph (torch) --------------------------------------------------------------------------------------
def prepare_graph(bb, hw: tuple[int, int], net, tap: str | None = None) -> Path:
    """The checked graph of ``net`` (``bb``'s network, or it wrapped to also return layer ``tap``) for input ``hw`` at
    ``bb.precision``: exported and checked against eager when first needed (see the module docstring), quantised once
    for int8 (retrieval/models/precision.py), recorded in the manifest for a registry backbone."""
    where = folder()
    where.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(where)
    names = ["fmap", "tap"] if tap else ["fmap"]
    tail = f"-tap-{safe_name(tap)}" if tap else ""
    base = f"{safe_name(bb.name)}-{bb.weights_id[:16]}-{onnx_cache_key(net)[:16]}"
    graph = where / f"{base}-mod32-{hw[0] % STRIDE}x{hw[1] % STRIDE}{tail}.onnx"
    if not graph.exists():
        export(net, hw, graph, True, names)
    verified = graph.with_name(f"{graph.stem}.ok-{hw[0]}x{hw[1]}")
    if not verified.exists():
        if matches_eager(net, graph, hw):
            verified.touch()
        else:  # this shape gets a graph of its own
            graph = where / f"{base}-{hw[0]}x{hw[1]}{tail}.onnx"
            if not graph.exists():
                export(net, hw, graph, False, names)
            if not matches_eager(net, graph, hw):
                raise RetrieveError(f"the ONNX export of {bb.name} does not reproduce it at {hw[0]}x{hw[1]}")
    checked = graph.stem
    if bb.precision == "int8":  # the verified fp32 graph, quantised once and cached beside it
        from retrieval.models.precision import calibration_batches, calibration_shape, quant_variant, quantize_graph

        q = graph.with_name(f"{graph.stem}-{quant_variant()}.onnx")
        if not q.exists():
            cal = calibration_shape(hw) if "-mod32-" in graph.name else hw
            quantize_graph(graph, q, calibration_batches(bb.preprocess, cal))
        graph = q
    from retrieval.models.registry import REGISTRY

    if "-mod32-" in graph.name and bb.name in REGISTRY:  # searches and indexing can then run it without torch
        record_graph(bb, hw, graph, checked, net, tap)
    return graph


def matches_eager(net, graph: Path, hw: tuple[int, int]) -> bool:
    """The graph reproduces ``net`` on a random input of ``hw`` (to 1e-3 of the largest output)."""
    import torch

    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = net(x)
    got = GraphRunner(graph)(x.numpy())
    refs = ref if isinstance(ref, tuple) else (ref,)
    return all(o.shape == tuple(r.shape) and bool(np.abs(o - r.float().numpy()).max() <= 1e-3 * r.float().abs().max().item() + 1e-6)
               for o, r in zip(got, refs))


def export(net, hw: tuple[int, int], path: Path, dynamic: bool, names: list[str], fold: bool = True) -> None:
    """Export ``net`` traced at ``hw`` to ``path``: written to a temporary file named with this process's id, then
    renamed, so a crash leaves only the temporary file (:func:`remove_stale_exports` removes it)."""
    import copy
    import warnings

    import torch

    dims = {0: "n", 2: "h", 3: "w"} if dynamic else {0: "n"}
    axes = {"x": dims, **{o: {0: "n", 2: f"{o}_h", 3: f"{o}_w"} if dynamic else {0: "n"} for o in names}}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # A copy: the exporter puts the module it exports back into that module's training mode, for every
            # submodule, so a new wrapper around the network (training, as new modules are) left the shared network
            # training (BatchNorm on batch statistics); the eager network must stay as it was.
            torch.onnx.export(copy.deepcopy(net), (torch.zeros(1, 3, *hw),), str(tmp), dynamo=False,
                              input_names=["x"], output_names=names, dynamic_axes=axes, opset_version=17)
        if fold:  # (False: the graph as exported, for bench/precision.py's comparison)
            fold_pads(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fold_pads(path: Path) -> None:
    """Fold the exported graph's zero Pads into the convolutions they feed (retrieval/models/precision.py fold_pads):
    EfficientNet-Lite's TF-"same" paddings are separate Pad nodes, which ONNX Runtime runs as copies of the feature
    map with layout conversions around them; the convolution's own ``pads`` give the same sums (max |Δ| 8e-6)
    1.2-1.7x faster (bench/results/int8-variants.md, "fp32, pads folded"). Graphs are still checked against eager at
    every shape before use (:func:`prepare_graph`)."""
    import onnx

    from retrieval.models.precision import fold_pads as fold

    model = onnx.load(str(path))
    if fold(model, ("Conv",)):
        onnx.save(model, str(path))


def remove_stale_exports(where: Path) -> list[Path]:
    """Delete the temporary export files in ``where`` whose process is gone (killed or crashed while exporting);
    those of running processes are left alone. Returns what was removed."""
    removed = []
    for f in where.glob("*.tmp*"):
        pid = f.name.rpartition(".tmp")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


class Background:
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
