"""A backbone: one network with its preprocessing and pooling, shared by indexing, search and explanation.

A :class:`Backbone` knows its weights, its preprocessing and which layer is "the feature map", and returns both the
feature map ``A`` (N×C×H×W) and the pooled embedding from one forward pass, through the fastest path that gives eager
PyTorch's numbers: ONNX Runtime on the CPU (a graph exported once, checked and cached: retrieval/models/graphs.py),
else a frozen TorchScript graph, else eager (retrieval/models/networks.py).

A backbone made from an index's settings (retrieval/models/loader.py) does not build its network while the graphs
cached for it serve: a search or an indexing run then never imports torch. The network is built -- torch imported,
weights read and verified -- the first time something needs it: an input shape no cached graph was checked at, a
tapped layer without its graph, gradients (:meth:`Backbone.eager_features`). Arrays (numpy) are the interface;
:meth:`features`, :meth:`features_and_tap` and :meth:`embed` take and give torch tensors for the explanations.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import RetrieveError
from retrieval.models.pooling import GAP, Pooling
from retrieval.models.preprocess import Preprocess, group_by_shape


class _Network:
    """The torch network of a backbone and of its copies at other input sizes: built once, on first use."""

    def __init__(self, net=None, load: Callable[[], object] | None = None, device=None):
        self.module, self.load, self.wanted = None, load, device
        self.device = None
        self.lock = threading.Lock()
        if net is not None:
            self.set(net)

    def set(self, net) -> None:
        from retrieval.models.networks import pick_device

        self.device = pick_device(self.wanted) if not hasattr(self.wanted, "type") else self.wanted
        net = net.eval().to(self.device)
        for p in net.parameters():
            p.requires_grad_(False)
        self.module = net

    def get(self):
        with self.lock:
            if self.module is None:
                if self.load is None:
                    raise RetrieveError("this backbone has no network to build")
                self.set(self.load())
            return self.module

    def __getstate__(self):
        return {"module": self.module, "load": self.load, "wanted": self.wanted, "device": self.device}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()


#: ``Backbone(tap=...)`` left out: the stride-16 layer is found when first asked (:attr:`Backbone.tap`).
FIND_TAP = "<find>"


class Backbone:
    """A feature extractor with its preprocessing and pooling; see the module docstring.

    ``name`` is the registry name or the user's model; ``weights_id`` identifies the exact weights (a sha256) so that
    an index can refuse to mix embeddings of different weights. ``net`` is the feature-map network, or None with
    ``load_net`` building it when first needed; ``manifest`` (retrieval/models/graphs.py) names the cached graphs that
    serve without it. ``fast``: "auto" (the fastest path), "onnx", "jit" or "eager"; ``precision``: "fp32" or "int8"
    (the ONNX Runtime graph's arithmetic, retrieval/models/precision.py). ``tap``: the stride-16 layer (see
    :attr:`tap`); left out, it is found when first asked.
    """

    def __init__(self, name: str, net, preprocess: Preprocess, feature_dim: int, weights_source: str,
                 weights_id: str, device=None, fast: str = "auto", pooling: Pooling = GAP, precision: str = "fp32",
                 *, load_net: Callable[[], object] | None = None, manifest=None, tap: str | None = FIND_TAP):
        self.name = name
        self._tap = tap
        self.preprocess = preprocess
        self.feature_dim = int(feature_dim)
        self.weights_source = weights_source
        self.weights_id = weights_id
        self.fast = fast
        self.pooling = pooling
        self.precision = precision
        self.manifest = manifest
        self.more_graphs = None  # () -> a manifest with more shapes checked, made without torch here (an index run)
        self._network = _Network(net, load_net, device)
        self._runners: dict = {}
        self._lock = threading.Lock()

    # -- identity and copies --------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, {self.preprocess.size} px {self.preprocess.resize}, {self.pooling}, "
                f"{self.precision})")

    def replace(self, **changes) -> "Backbone":
        """A copy with some attributes changed (``preprocess``, ``pooling``, ``precision``, ``fast``, ``manifest``)
        and paths of its own; the network is shared (built once for all copies)."""
        other = copy.copy(self)  # (through __getstate__, which leaves out what is this process's own)
        other.more_graphs = self.more_graphs  # shared: the explain reference's copy checks every shape once, too
        for k, v in changes.items():
            setattr(other, k, v)
        other._runners, other._lock = {}, threading.Lock()
        return other

    def at_size(self, size: int) -> "Backbone":
        """The same network and weights with another input side (no reload; its own paths)."""
        return self if size == self.preprocess.size else self.replace(preprocess=self.preprocess.replace(size=size))

    def __getstate__(self):  # pickles (Ray ships it to its workers) without the paths built here
        state = dict(self.__dict__)
        state["_runners"], state["_lock"], state["more_graphs"] = {}, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def net(self):
        """The feature-map network (torch), built on first use."""
        return self._network.get()

    @property
    def tap(self) -> str | None:
        """The stride-16 layer (a submodule name of :attr:`net`) the default map fuses with the final map and the
        indexer samples μ_tap of, or None (the final layer only): a registry backbone's own, known without torch
        (retrieval/models/registry.py); else found on the network when first asked (retrieval/models/taps.py; a
        TorchScript model has none)."""
        if self._tap == FIND_TAP:
            from retrieval.models.registry import REGISTRY

            spec = REGISTRY.get(self.name)
            if spec is not None and spec.tap:
                self._tap = spec.tap
            else:
                from retrieval.models.taps import find_tap

                self._tap = find_tap(self.net, self.preprocess.size)
        return self._tap

    @property
    def device(self):
        self._network.get()
        return self._network.device

    def to(self, device) -> "Backbone":
        """Move the network to ``device`` (a torch device or its name); paths are made again."""
        from retrieval.models.networks import pick_device

        self._network.wanted = pick_device(device) if not hasattr(device, "type") else device
        if self._network.module is not None:
            self._network.set(self._network.module)
        self._runners = {}
        return self

    # -- arrays in, arrays out ----------------------------------------------------------------------------------
    def run(self, x: np.ndarray, tap: str | None = None) -> list[np.ndarray]:
        """The feature map of the batch ``x`` (N×3×h×w float32), and with ``tap`` the output of that layer too."""
        return self._runner(tuple(x.shape[-2:]), tap)(x)

    def features_arrays(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

    def features_and_tap_arrays(self, x: np.ndarray, tap: str) -> tuple[np.ndarray, np.ndarray]:
        a, t = self.run(x, tap)
        return a, t

    def pool_arrays(self, a: np.ndarray) -> np.ndarray:
        """The index's pooling of feature maps ``a`` (N×C×h×w), in ``a``'s dtype."""
        return self.pooling.pool(a)

    def embed_arrays(self, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Pooled embeddings (N×C float32, in order) of preprocessed arrays of any mix of input shapes."""
        out = np.zeros((len(arrays), self.feature_dim), np.float32)
        for idx in group_by_shape(arrays):
            for i in range(0, len(idx), batch_size):
                part = idx[i:i + batch_size]
                out[part] = self.pool_arrays(self.features_arrays(np.stack([arrays[j] for j in part])))
        return out

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pooled embeddings (N×C float32) of RGB images."""
        return self.embed_arrays([self.preprocess.array(im) for im in images])

    # -- tensors (the explanations) ------------------------------------------------------------------------------
    def features(self, x):
        """Feature map ``A`` (N×C×h×w float32 tensor, on the CPU) of the tensor batch ``x``."""
        import torch

        return torch.from_numpy(self.features_arrays(x.detach().cpu().numpy()))

    def features_and_tap(self, x, layer: str):
        """(feature map ``A``, the output of the network's submodule ``layer``) from one forward pass, through the
        same kind of path as :meth:`features` (a graph of its own). Explanations use it for a finer (stride-16) map."""
        import torch

        a, t = self.features_and_tap_arrays(x.detach().cpu().numpy(), layer)
        return torch.from_numpy(a), torch.from_numpy(t)

    def embed(self, x):
        """(feature map ``A``, pooled embedding) tensors from one forward pass."""
        a = self.features(x)
        return a, self.pooling.pool(a)

    def eager_features(self, x):
        """Differentiable feature map (gradient-based methods): the network itself, no other path."""
        return self.net(x.to(self.device))

    # -- paths ------------------------------------------------------------------------------------------------
    def ready(self, hw: tuple[int, int], tap: str | None = None) -> bool:
        """Whether a cached graph serves input ``hw`` (and ``tap``) without building the network."""
        return self.manifest is not None and self.manifest.graph(self.precision, hw, tap) is not None

    def fast_path_name(self) -> str:
        """The path the backbone takes at its default input size."""
        return self._runner(self.preprocess.input_shape).kind

    def _runner(self, hw: tuple[int, int], tap: str | None = None):
        key = (self.precision, tuple(hw), tap)
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = self._build_runner(tuple(hw), tap)
            return runner

    def _graph_runner(self, graph):
        """The session of ``graph`` that a runner of another input shape already holds, else a new one: an
        aspect-kept index meets up to 27 shapes of one graph, and a session each held 27 copies of the network
        (2.4 GB of RSS indexing 100 catalogue photos of 84 sizes). Called holding ``_lock``."""
        from retrieval.models.graphs import GraphRunner

        for r in self._runners.values():
            if isinstance(r, GraphRunner) and r.serves(graph):
                return r
        return GraphRunner(graph)

    def _build_runner(self, hw: tuple[int, int], tap: str | None):
        from retrieval.models.graphs import GraphRunner

        ort_ok = self.fast in ("auto", "onnx") or self.precision != "fp32"
        cpu = self._network.wanted in (None, "auto", "cpu") or getattr(self._network.wanted, "type", "") == "cpu"
        if ort_ok and cpu and self.manifest is not None:  # a cached graph: no network, no torch
            graph = self.manifest.graph(self.precision, hw, tap)
            if graph is None and self.more_graphs is not None and self._network.module is None:
                m = self.more_graphs()  # every shape of the index's inputs, checked in a child (torch there)
                if m is not None:
                    self.manifest = m
                    graph = m.graph(self.precision, hw, tap)
            if graph is not None:
                try:
                    return self._graph_runner(graph)
                except Exception:  # noqa: BLE001  (unreadable now: made again below)
                    pass
        from retrieval.models.graphs import prepare_graph
        from retrieval.models.networks import EagerRunner, JitRunner, Tapped

        net = self.net if tap is None else Tapped(self.net, tap)
        device = self.device
        if self.precision != "fp32":  # the ONNX Runtime path at this precision; there is no other
            from retrieval.models.precision import check_precision

            check_precision(self.precision)
            if device.type != "cpu":
                raise RetrieveError(f"--precision {self.precision} runs on the CPU (ONNX Runtime); this backbone is "
                                    f"on {device}")
            try:
                return self._graph_runner(prepare_graph(self, hw, net, tap))
            except RetrieveError:
                raise
            except Exception as e:
                raise RetrieveError(f"{self.name}: --precision {self.precision} needs the ONNX Runtime path, which is "
                                    f"unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if device.type != "cpu":
            return EagerRunner(net, device)  # cuDNN is the fast path on a GPU
        if self.fast in ("auto", "onnx"):
            try:
                return self._graph_runner(prepare_graph(self, hw, net, tap))
            except Exception as e:  # onnxruntime missing or the model does not export: the next best path
                if self.fast == "onnx":
                    raise RetrieveError(f"{self.name}: ONNX fast path unavailable: {e}") from e
        if self.fast in ("auto", "jit", "onnx"):
            try:
                return JitRunner(net, hw)
            except Exception as e:
                if self.fast == "jit" and tap is None:
                    raise RetrieveError(f"{self.name}: TorchScript fast path unavailable: {e}") from e
        return EagerRunner(net, device)
