"""Building a backbone: the network of a registry name (retrieval/models/registry.py) or a user's model, its
weights verified by hash before they are parsed.

Registry backbones get their weights from their package (``efficientnet_lite0``, ``efficientnet_lite2``) or
torchvision's weights API (its download cache), or from a local state dict (``weights=PATH``); offline without a
file is a one-line error saying what to do. A user's model is a TorchScript file whose forward returns the feature
map N×C×H×W, or ``package.module:function`` returning ``(nn.Module, layer_name)`` (the layer's output is the map).
"""
from __future__ import annotations

import hashlib
import importlib
import io
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from retrieval.errors import RetrieveError, SettingsMismatch, UnknownModel, WeightsUnavailable
from retrieval.models.backbone import Backbone
from retrieval.models.networks import LayerOutput, pick_device
from retrieval.models.pooling import Pooling, parse_pooling
from retrieval.models.preprocess import Preprocess
from retrieval.models.registry import (DEFAULT_MODEL, EMBEDDED, IMAGENET, REGISTRY, ModelSpec, embedded_weights_file,
                                       model_kind, unknown_model)
from retrieval.models.taps import find_tap

def _torchvision_weights(name: str):
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def _hub_file(name: str) -> Path:
    url = _torchvision_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def weights_location(name: str) -> tuple[str, bool]:
    """(where the weights come from, whether they are on this machine now) for a registry name."""
    if name in EMBEDDED:
        package = EMBEDDED[name][0].replace("_", "-")
        return (f"package {package}", embedded_weights_file(name) is not None)
    f = _hub_file(name)
    return (f"torchvision weights API ({f.name})", f.exists())


#: torch.load(weights_only=True) can be made to run code below torch 2.6 (CVE-2025-32434).
SAFE_TORCH = (2, 6)


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return SAFE_TORCH  # a development build: assume it is recent


def _read_verified(path: Path, expected_sha256: str | None, what: str) -> tuple[bytes, str]:
    """The bytes of a weights or model file and their sha256, refused *before* anything parses them when
    ``expected_sha256`` (what an index recorded) differs."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsUnavailable(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise WeightsUnavailable(f"{path}: is a directory, not a {what} file") from None
    except OSError as e:
        raise WeightsUnavailable(f"{path}: cannot read it ({e.strerror or e})") from None
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise SettingsMismatch(
            f"{path}: not the {what} file the index was built with (its sha256 differs); refused without loading "
            "it: restore that file, or index into another --index directory")
    return data, sha


def _load_state(path: Path, what: str, expected_sha256: str | None = None) -> tuple[dict, str]:
    """(state dict, sha256 of the file) of a weights file; see :func:`_read_verified`."""
    if _torch_version() < SAFE_TORCH:
        raise WeightsUnavailable(
            f"torch {torch.__version__} cannot load weights files safely (CVE-2025-32434: weights_only=True is "
            "bypassable below torch 2.6); upgrade: pip install 'torch>=2.6'")
    data, sha = _read_verified(path, expected_sha256, "weights")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailable(f"{path}: not a loadable state dict for {what} ({type(e).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsUnavailable(f"{path}: expected a state dict for {what}")
    return obj, sha


def _registry_weights(spec: ModelSpec, weights: str | os.PathLike | None) -> Path:
    if weights is not None:
        return Path(weights).expanduser().resolve()
    if spec.name in EMBEDDED:
        f = embedded_weights_file(spec.name)
        if f is None:
            raise WeightsUnavailable(
                f"{spec.name}: weights not found; {EMBEDDED[spec.name][2]}, or pass --weights PATH (a state dict)")
        return f
    f = _hub_file(spec.name)
    if f.exists():
        return f
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub announces the download on stderr
            _torchvision_weights(spec.name).get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsUnavailable(
            f"{spec.name}: cannot download its weights ({type(e).__name__}); download "
            f"{_torchvision_weights(spec.name).url} elsewhere and pass --weights PATH") from None
    return f


def apply_threads() -> None:
    """torch's intra-op threads from ``RETRIEVE_THREADS`` (``--threads``, which the CLI only puts in the
    environment): applied where a network is built (:func:`load_backbone`, the faces preset). Here, not beside the
    network classes in networks.py, whose source is part of the cached graphs' key."""
    threads = os.environ.get("RETRIEVE_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def load_backbone(name: str = DEFAULT_MODEL, weights: str | os.PathLike | None = None, *,
                  input_size: int | None = None, device: str | None = None, fast: str = "auto",
                  random_weights: bool = False, resize: str | None = None,
                  pooling: str | Pooling | None = None, expected_sha256: str | None = None) -> Backbone:
    """Build a :class:`Backbone` by registry name or user spec (see the module docstring).

    ``resize`` ("squash" or "long", see :class:`Preprocess`) and ``pooling`` ("gap", "gem[:p]") override
    the model's defaults.

    ``random_weights`` skips loading (shapes-only tests, sanity checks of explanations).
    ``expected_sha256``: the weights (or TorchScript) file must have this hash, checked before it is parsed
    (an index records it); a mismatch raises :class:`SettingsMismatch`.
    """
    apply_threads()  # (--threads: torch's intra-op threads, for every command that builds a network)
    dev = pick_device(device)
    if name in REGISTRY:
        spec = REGISTRY[name]
        net = spec.build()
        if random_weights:
            source, wid = "random", "random"
        else:
            path = _registry_weights(spec, weights)
            state, wid = _load_state(path, name, expected_sha256)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as e:
                first = str(e).splitlines()[0] if str(e) else "key mismatch"
                raise WeightsUnavailable(f"{path}: does not fit {name}: {first}") from None
            source = str(path)
        pre = spec.preprocess if input_size is None else spec.preprocess.replace(size=input_size)
        # its stride-16 layer: Backbone.tap (the spec's, else found on the network when first asked)
        bb = Backbone(name, spec.to_features(net).eval(), pre, spec.feature_dim, source, wid, dev, fast)
    else:
        bb = _load_user_model(name, input_size, dev, fast, expected_sha256)
    if resize is not None:
        bb.preprocess = bb.preprocess.replace(resize=resize)
    if pooling is not None:
        bb.pooling = pooling if isinstance(pooling, Pooling) else parse_pooling(pooling)
    return bb


def _load_user_model(name: str, input_size: int | None, dev: torch.device, fast: str,
                     expected_sha256: str | None = None) -> Backbone:
    pre = Preprocess(input_size or 224, **IMAGENET)
    path = Path(name).expanduser()
    kind = model_kind(name)
    if kind == "torchscript":
        if not path.is_file():
            raise UnknownModel(f"{name}: no such TorchScript file")
        data, wid = _read_verified(path, expected_sha256, "TorchScript")
        try:
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as e:
            raise UnknownModel(f"{name}: not a TorchScript file ({type(e).__name__})") from None
        source = str(path.resolve())
        spec_name = str(path.resolve())
    elif kind == "function":
        mod_name, _, fn_name = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UnknownModel(f"{name}: cannot import ({e})") from None
        got = fn()
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], nn.Module)):
            raise UnknownModel(f"{name}: must return (nn.Module, layer_name)")
        model, layer = got
        if layer not in dict(model.named_modules()):
            raise UnknownModel(f"{name}: the model has no layer {layer!r}")
        net = LayerOutput(model, layer)
        source, wid, spec_name = name, _state_hash(model), name
    else:
        raise unknown_model(name)
    with torch.inference_mode():
        probe = net.eval()(torch.zeros(1, 3, pre.size, pre.size))
    if probe.ndim != 4:
        raise UnknownModel(f"{name}: the feature map must be N×C×H×W, got shape {tuple(probe.shape)}")
    # the stride-16 layer of the default map; ScriptModules take no forward hooks: a TorchScript model has none
    tap = find_tap(net, pre.size) if kind == "function" else None
    return Backbone(spec_name, net, pre, int(probe.shape[1]), source, wid, dev, fast, tap=tap)


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def imagenet_classifier(bb: Backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits from a feature map, for registry backbones with an ImageNet head (sanity checks)."""
    net = bb.net
    inner = getattr(net, "net", None)
    if inner is not None and hasattr(inner, "_fc"):
        return lambda a: inner._fc(a.mean((2, 3)))
    raise RetrieveError(f"{bb.name}: no ImageNet head available")
