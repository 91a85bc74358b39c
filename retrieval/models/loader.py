"""Builds the objects a command needs from an index's recorded settings (one place, so tests can substitute).

An index folder is data, not code: the model it records is loaded from it only when that is safe without
the user's say-so — a registry backbone whose weights file is verified by its hash before it is parsed.
A user's program recorded as the model (``package.module:function``, imported; or a TorchScript file,
run) is loaded only after an explicit opt-in: ``--trust-model`` on the command line
(:func:`trust_models`) or ``RETRIEVE_TRUST_MODEL=1`` in the environment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import RetrieveError, SettingsMismatch

if TYPE_CHECKING:  # torch is imported only when a network is built (``retrieve check`` does without it)
    from retrieval.models.backbone import Backbone

TRUST_ENV = "RETRIEVE_TRUST_MODEL"
_trusted = False


class UntrustedModel(RetrieveError):
    """The index records a user's program as its model, and loading it was not allowed."""


def trust_models(trusted: bool) -> None:
    """Allow (or not) this process to load a user's program an index records as its model (``--trust-model``)."""
    global _trusted
    _trusted = bool(trusted)


def models_trusted() -> bool:
    return _trusted or os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_trusted(model: str) -> None:
    """Raise :class:`UntrustedModel` (naming the code and the opt-in) unless ``model`` may be loaded."""
    from retrieval.models.registry import is_user_code, model_kind

    if not is_user_code(model) or models_trusted():
        return
    if model_kind(model) == "function":
        what = f"the Python function {model!r}: loading it imports module {model.partition(':')[0]!r}"
    else:
        what = f"the TorchScript program {model}: loading it runs that file's code"
    raise UntrustedModel(f"this index's model is {what}, named by the index folder; if you trust that index, run "
                         f"the command again with --trust-model (or set {TRUST_ENV}=1)")


def backbone_for_settings(settings, input_size: int | None = None, *,
                          purpose: str = "search") -> Backbone:
    """The backbone an index was built with: the same model, weights and preprocessing (``input_size``: another
    input side, for the explanations). It runs the index's cached ONNX graphs without importing torch while they
    serve (retrieval/models/graphs.py: a registry model with GAP or GeM pooling, its weights file still the recorded
    one), and builds the network -- weights verified by their hash before they are parsed; a user's program only
    with :func:`trust_models` -- when first needed.

    ``purpose``: ``search`` (also explanations), or ``index``: the graphs the run needs (the index's input shapes and
    the explain reference's) are made first, in a child process, when any is missing (retrieval/models/prepare.py).
    ``RETRIEVE_FAST_SEARCH=0`` / ``RETRIEVE_FAST_INDEX=0`` leave the cached graphs aside (comparisons, tests)."""
    from retrieval.models.backbone import Backbone
    from retrieval.models.pooling import parse_pooling
    from retrieval.models.prepare import ensure_graphs, without_torch
    from retrieval.models.preprocess import Preprocess

    check_trusted(settings.model)
    pre = Preprocess.from_dict(settings.preprocess)
    if input_size is not None:
        pre = pre.replace(size=int(input_size))
    cached = without_torch(settings.model, settings.pooling) and not _disabled(
        "RETRIEVE_FAST_INDEX" if purpose == "index" else "RETRIEVE_FAST_SEARCH")
    bb = Backbone(settings.model, None, pre, settings.dim, settings.weights_source, settings.weights_id,
                  pooling=parse_pooling(settings.pooling), precision=getattr(settings, "precision", "fp32") or "fp32",
                  load_net=lambda: _network(settings), manifest=_manifest(settings) if cached else None)
    if purpose == "index" and cached:
        size = (settings.explain or {}).get("input_size") or pre.size
        ensure_graphs(bb, (int(size), bb.tap))  # a registry model's: known without torch
    return bb


def _network(settings):
    """The feature-map network an index records, its weights verified by hash before they are parsed."""
    from retrieval.models.loading import load_backbone

    check_trusted(settings.model)
    src = Path(settings.weights_source)
    weights = src if settings.weights_source not in ("", "random") and src.is_file() else None
    random = settings.weights_id == "random"
    bb = load_backbone(settings.model, weights, input_size=settings.preprocess.get("size"), random_weights=random,
                       expected_sha256=None if random else settings.weights_id)
    if bb.weights_id != settings.weights_id:
        raise SettingsMismatch(f"the weights of {settings.model} ({bb.weights_source}) differ from the ones the "
                               "index was built with; restore those weights, or index into another --index "
                               "directory")
    return bb.net


def _disabled(var: str) -> bool:
    return os.environ.get(var, "1").strip() in ("0", "false", "no", "off")


def _manifest(settings):
    """The cached graphs' manifest of an index's backbone when it still holds (this retrieve, this torch, these
    network sources, the weights file with the recorded hash) and ONNX Runtime is installed; else None."""
    from retrieval.models.graphs import Background, Manifest

    m = Manifest.load(settings.model, settings.weights_id)
    if m is None:
        return None
    # the weights file is hashed (tens of ms; hashlib lets go of the GIL) while ONNX Runtime is imported
    weights = Background(_weights_unchanged, settings)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        weights.result()
        return None
    return m if weights.result() and m.valid() else None


def _weights_unchanged(settings) -> bool:
    """The index's weights file still has the recorded sha256 (else the network's path refuses it, in its words)."""
    import hashlib

    if settings.weights_id == "random":
        return True
    src = Path(settings.weights_source or "")
    if not src.is_file():
        return False
    with open(src, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() == settings.weights_id
