"""The backbone object shared by indexing, search and explanation.

A :class:`Backbone` knows its weights, its preprocessing and which layer is "the feature map", and
returns both the feature map ``A`` (N×C×H×W) and the pooled embedding (global average of ``A``) from
one forward pass. Inference goes through the fastest path that gives eager's numbers (ONNX Runtime on
the CPU when installed, else a frozen TorchScript graph, else eager); :meth:`Backbone.eager_features`
keeps the differentiable path for gradient-based baselines.
"""
from __future__ import annotations

import copy
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from retrieval.errors import RetrieveError
from retrieval.models.pooling import GAP, Pooling
from retrieval.models.preprocess import (_RESAMPLE, STRIDE, Preprocess, cache_dir, file_sha256,  # noqa: F401 (re-exported)
                         group_by_shape)


def pick_device(device: str | None = None) -> torch.device:
    """``None``/"auto" → CUDA when present, else CPU. On CUDA, TF32 is turned off for convolutions and matrix
    products: PyTorch allows it for cuDNN's convolutions by default, which moved embeddings by up to 7e-4 and
    SFAM maps by up to 10 % of their peak against the CPU's on an H200; in fp32 they agree to 1e-6
    (bench/results/cuda-check.md). The product targets the CPU; a GPU must give its results."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


class FeatureNet(nn.Module):
    """Wraps any module whose ``forward_features`` (or plain forward) returns the feature map."""

    def __init__(self, net: nn.Module, method: str = "forward_features"):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.method)(x) if self.method != "forward" else self.net(x)


@dataclass
class Backbone:
    """A feature extractor with its preprocessing; see the module docstring.

    ``name`` is the registry name or user spec; ``weights_id`` identifies the exact weights (a sha256) so
    an index can refuse to mix embeddings from different weights.
    """

    name: str
    net: nn.Module  # forward(x) -> feature map N×C×H×W
    preprocess: Preprocess
    feature_dim: int
    weights_source: str
    weights_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fast: str = "auto"  # "auto" | "onnx" | "jit" | "eager"
    pooling: Pooling = GAP  # feature map → embedding (retrieval/models/pooling.py)
    precision: str = "fp32"  # "fp32" | "int8": the ONNX graph's arithmetic (retrieval/models/precision.py)
    _runners: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.net = self.net.eval().to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def at_size(self, size: int) -> "Backbone":
        """The same network and weights with another input side (no reload; its own fast-path cache)."""
        if size == self.preprocess.size:
            return self
        import dataclasses

        return dataclasses.replace(self, preprocess=self.preprocess.replace(size=size), _runners={},
                                   _lock=threading.Lock())

    # -- forward passes -------------------------------------------------------------------------
    def eager_features(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable feature map (used by gradient-based methods); no fast path."""
        return self.net(x.to(self.device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``A`` (N×C×h×w, float32, on the CPU) through the fastest equivalent path."""
        runner = self._runner(tuple(x.shape[-2:]))
        return runner(x)

    def features_and_tap(self, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map ``A``, the output of ``net``'s submodule ``layer``) from one forward pass, through the
        same kind of fast path as :meth:`features` (a graph of its own; :meth:`features` is unchanged).
        Explanations use it for an intermediate (stride-16) map."""
        return self._runner(tuple(x.shape[-2:]) + (layer,))(x)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map ``A``, pooled embedding) from one forward pass."""
        a = self.features(x)
        return a, self.pooling.pool(a)

    def embed_arrays(self, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Pooled embeddings (N×C float32, in order) of preprocessed arrays of any mix of input shapes."""
        out = np.zeros((len(arrays), self.feature_dim), np.float32)
        for idx in group_by_shape(arrays):
            for i in range(0, len(idx), batch_size):
                part = idx[i:i + batch_size]
                out[part] = self.embed(torch.from_numpy(np.stack([arrays[j] for j in part])))[1].numpy()
        return out

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pooled embeddings (N×C float32) of RGB images."""
        return self.embed_arrays([self.preprocess.array(im) for im in images])

    # -- fast path --------------------------------------------------------------------------------
    def fast_path_name(self) -> str:
        """The path :meth:`features` takes at the default input size."""
        return self._runner(self.preprocess.input_shape).kind

    def _runner(self, hw: tuple) -> "_Runner":
        with self._lock:
            key = (self.precision,) + tuple(hw)
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = self._build_runner(hw)
            return runner

    def _build_runner(self, hw: tuple) -> "_Runner":
        mode = self.fast
        if len(hw) > 2:  # (h, w, layer): features_and_tap
            return self._build_tap_runner(hw[:2], hw[2])
        if self.precision != "fp32":
            return self._quantised_runner(hw)
        if self.device.type != "cpu":
            return _EagerRunner(self)  # cuDNN is the fast path on a GPU
        if mode in ("auto", "onnx"):
            try:
                return _OnnxRunner(self, hw)
            except Exception as e:  # onnxruntime missing or the model does not export: next best path
                if mode == "onnx":
                    raise RetrieveError(f"{self.name}: ONNX fast path unavailable: {e}") from e
        if mode in ("auto", "jit", "onnx"):
            try:
                return _JitRunner(self, hw)
            except Exception as e:
                if mode == "jit":
                    raise RetrieveError(f"{self.name}: TorchScript fast path unavailable: {e}") from e
        return _EagerRunner(self)

    def _quantised_runner(self, hw: tuple[int, int], net: nn.Module | None = None,
                          layer: str | None = None) -> "_Runner":
        """The ONNX Runtime path at ``self.precision`` (retrieval/models/precision.py); there is no other."""
        from retrieval.models.precision import check_precision

        check_precision(self.precision)
        if self.device.type != "cpu":
            raise RetrieveError(f"--precision {self.precision} runs on the CPU (ONNX Runtime); this backbone is on "
                                f"{self.device}")
        try:
            return _OnnxRunner(self, hw, net, layer)
        except RetrieveError:
            raise
        except Exception as e:
            raise RetrieveError(f"{self.name}: --precision {self.precision} needs the ONNX Runtime path, which is "
                                f"unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def _build_tap_runner(self, hw: tuple[int, int], layer: str) -> "_Runner":
        net = _Tapped(self.net, layer)
        if self.precision != "fp32":
            return self._quantised_runner(hw, net, layer)
        if self.device.type == "cpu" and self.fast in ("auto", "onnx"):
            try:
                return _OnnxRunner(self, hw, net, layer)
            except Exception as e:  # as in _build_runner: the next best path
                if self.fast == "onnx":
                    raise RetrieveError(f"{self.name}: ONNX fast path unavailable: {e}") from e
        if self.device.type == "cpu" and self.fast in ("auto", "onnx", "jit"):
            try:
                return _JitRunner(self, hw, net)
            except Exception:
                pass
        return _EagerRunner(self, net)


class _Tapped(nn.Module):
    """``net`` returning (its output, the output of its submodule ``layer``)."""

    def __init__(self, net: nn.Module, layer: str):
        super().__init__()
        self.net = net
        try:
            self.layer = net.get_submodule(layer)
        except AttributeError:
            raise RetrieveError(f"the network has no layer {layer!r}") from None
        # in the wrapped network's mode (eval): torch.onnx.export restores the top module's mode afterwards,
        # recursively, and a new module is in training mode, which would leave the shared network training
        self.train(net.training)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        box = []
        hook = self.layer.register_forward_hook(lambda _m, _i, out: box.append(out))
        try:
            a = self.net(x)
        finally:
            hook.remove()
        return a, box[-1]


class _Runner:
    kind = "eager"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _EagerRunner(_Runner):
    kind = "eager"

    def __init__(self, bb: Backbone, net: nn.Module | None = None):
        self.bb = bb
        self.net = net  # None: the backbone's own network

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.net is None:
                return self.bb.net(x.to(self.bb.device)).float().cpu()
            return tuple(t.float().cpu() for t in self.net(x.to(self.bb.device)))


class _JitRunner(_Runner):
    kind = "torchscript"

    def __init__(self, bb: Backbone, hw: tuple[int, int], net: nn.Module | None = None):
        import warnings

        example = torch.zeros(1, 3, *hw)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            self.module = torch.jit.freeze(torch.jit.trace(net if net is not None else bb.net, example,
                                                           check_trace=False).eval())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x.contiguous())


#: Input pixels per ONNX Runtime run (4 images at 224 px, 1 at 448): a batch is run in slices of this size. The
#: runtime's memory arena keeps the largest activations it has seen (Lite0's first expanded layer alone is
#: 4.8 MB per 224-px image), so a whole batch of 32 grew the process by ~880 MB, slices of 4 by ~120 MB, at
#: the same speed (bench/results/footprint.md).
ORT_RUN_PIXELS = 4 * 224 * 224


class _OnnxRunner(_Runner):
    """ONNX Runtime on the CPU, from a graph exported once and cached on disk (see :func:`onnx_cache_key`).

    One graph with dynamic batch, height and width serves every input shape whose sides have the same
    remainders mod 32 -- every shape an index uses at the default sizes (squashed squares and aspect-kept
    sides are multiples of the stride) -- instead of one 13.5 MB graph per shape. Why mod 32: TF "same"
    padding (EfficientNet-Lite) depends on the parity of the map at each of the five stride-2 layers, which
    the remainder mod 32 fixes, and the exporter records that padding as constants. (Computing the padding
    from traced sizes instead made ``ceil`` a constant and the rest dynamic: other shapes were cropped to the
    exported one.) Each (graph, input shape) is compared once with eager on a random input before it is
    used, and the verdict cached beside the graph; where a graph does not reproduce eager (a user's model
    with other shape-dependent code), that shape gets a graph exported at exactly that shape.
    """

    kind = "onnxruntime"

    def __init__(self, bb: Backbone, hw: tuple[int, int], net: nn.Module | None = None, tap: str | None = None):
        import onnxruntime as ort  # optional dependency: ImportError → next path

        net = net if net is not None else bb.net
        names = ["fmap", "tap"] if tap else ["fmap"]  # tap: features_and_tap, a graph with two outputs
        tail = f"-tap-{_safe(tap)}" if tap else ""
        folder = cache_dir() / "onnx"
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_exports(folder)
        base = f"{_safe(bb.name)}-{bb.weights_id[:16]}-{onnx_cache_key(net)[:16]}"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to decoding

        def session(path: Path, dynamic: bool):
            if not path.exists():
                _export(net, hw, path, dynamic, names)
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        self.graph = folder / f"{base}-mod32-{hw[0] % STRIDE}x{hw[1] % STRIDE}{tail}.onnx"
        self.session = session(self.graph, dynamic=True)
        verified = self.graph.with_name(f"{self.graph.stem}.ok-{hw[0]}x{hw[1]}")
        if not verified.exists():
            if self._matches_eager(net, hw):
                verified.touch()
            else:
                self.graph = folder / f"{base}-{hw[0]}x{hw[1]}{tail}.onnx"
                self.session = session(self.graph, dynamic=False)
                if not self._matches_eager(net, hw):
                    raise RetrieveError(f"the ONNX export of {bb.name} does not reproduce it at {hw[0]}x{hw[1]}")
        self.precision = bb.precision
        if bb.precision == "int8":  # the verified fp32 graph, quantised once and cached beside it
            from retrieval.models.precision import calibration_batches, calibration_shape, quant_variant, quantize_graph

            q = self.graph.with_name(f"{self.graph.stem}-{quant_variant()}.onnx")
            if not q.exists():
                cal = calibration_shape(hw) if "-mod32-" in self.graph.name else hw
                quantize_graph(self.graph, q, calibration_batches(bb.preprocess, cal))
            self.graph = q
            self.session = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
        if not tap and "-mod32-" in self.graph.name and not bb.name.startswith(("/", ".")) and ":" not in bb.name:
            from retrieval.models.runtime import record_graph  # search can then load this graph without torch

            record_graph(folder, bb, hw, self.graph, verified.name, net)

    def _matches_eager(self, net: nn.Module, hw: tuple[int, int]) -> bool:
        x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = net(x)
        got = self(x)
        pairs = zip(got, ref) if isinstance(ref, tuple) else [(got, ref)]
        return all(o.shape == r.shape and bool((o - r.float()).abs().max() <= 1e-3 * r.float().abs().max() + 1e-6)
                   for o, r in pairs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous().numpy()
        step = max(1, ORT_RUN_PIXELS // (x.shape[-2] * x.shape[-1]))
        parts = [self.session.run(None, {"x": x[i:i + step]}) for i in range(0, len(x), step)]
        outs = parts[0] if len(parts) == 1 else [np.concatenate(o) for o in zip(*parts)]
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)


def _export(net: nn.Module, hw: tuple[int, int], path: Path, dynamic: bool, names: list[str], fold: bool = True) -> None:
    """Export ``net`` traced at ``hw`` to ``path``: written to a temporary file named with this process's id,
    then renamed, so a crash leaves only the temporary file (:func:`remove_stale_exports` removes it)."""
    import warnings

    dims = {0: "n", 2: "h", 3: "w"} if dynamic else {0: "n"}
    axes = {"x": dims, **{o: {0: "n", 2: f"{o}_h", 3: f"{o}_w"} if dynamic else {0: "n"} for o in names}}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # A copy: the exporter puts the module it exports back into that module's training mode, for every
            # submodule, so a new wrapper around the network (training, as new modules are) left the shared
            # network training (BatchNorm on batch statistics); the eager network must stay as it was.
            torch.onnx.export(copy.deepcopy(net), (torch.zeros(1, 3, *hw),), str(tmp), dynamo=False,
                              input_names=["x"], output_names=names, dynamic_axes=axes, opset_version=17)
        if fold:  # (False: the graph as exported, for bench/precision.py's comparison)
            _fold_pads(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fold_pads(path: Path) -> None:
    """Fold the exported graph's zero Pads into the convolutions they feed (retrieval/models/precision.py fold_pads):
    EfficientNet-Lite's TF-"same" paddings are separate Pad nodes, which ONNX Runtime runs as copies of the
    feature map with layout conversions around them; the convolution's own ``pads`` give the same sums
    (max |Δ| 8e-6) 1.2-1.7x faster (bench/results/int8-variants.md, "fp32, pads folded"). Graphs are still
    checked against eager at every shape before use (``_OnnxRunner``)."""
    import onnx

    from retrieval.models.precision import fold_pads

    model = onnx.load(str(path))
    if fold_pads(model, ("Conv",)):
        onnx.save(model, str(path))


def remove_stale_exports(folder: Path) -> list[Path]:
    """Delete the temporary export files in ``folder`` whose process is gone (killed or crashed while
    exporting); those of running processes are left alone. Returns what was removed."""
    removed = []
    for f in folder.glob("*.tmp*"):
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


_SOURCE_HASHES: dict[str, str] = {}


GRAPH_RECIPE = "pads-folded"  # how an exported graph is post-processed (_fold_pads): part of its cache key


def onnx_cache_key(net: nn.Module) -> str:
    """A hash of what an exported graph depends on besides the weights: this retrieve's version, torch's
    (the exporter's) and the source files of every module class in ``net`` (the network's code)."""
    from retrieval import __version__

    h = hashlib.sha256(f"retrieve {__version__}; torch {torch.__version__}; {GRAPH_RECIPE}".encode())
    for f, digest in source_hashes(net).items():
        h.update(f"{os.path.basename(f)} {digest}".encode())
    return h.hexdigest()


def source_hashes(net: nn.Module) -> dict[str, str]:
    """{source file: sha256} of every module class in ``net``, sorted by path."""
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]
