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

if TYPE_CHECKING:  # torch is imported only when a backbone is built (``retrieve check`` does without it)
    from retrieval.models.backbone import Backbone
    from retrieval.index.settings import IndexSettings

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
    from retrieval.models.registry import is_user_code

    if not is_user_code(model) or models_trusted():
        return
    if ":" in model and not Path(model).expanduser().exists():
        what = f"the Python function {model!r}: loading it imports module {model.partition(':')[0]!r}"
    else:
        what = f"the TorchScript program {model}: loading it runs that file's code"
    raise UntrustedModel(f"this index's model is {what}, named by the index folder; if you trust that index, run "
                         f"the command again with --trust-model (or set {TRUST_ENV}=1)")


def apply_threads() -> None:
    """torch's intra-op threads from ``RETRIEVE_THREADS`` (``--threads``), for a command that imports torch only
    when it needs it (``retrieve index`` through the cached graphs: retrieval/models/runtime.py)."""
    threads = os.environ.get("RETRIEVE_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        import torch

        if torch.get_num_threads() != int(threads):
            torch.set_num_threads(int(threads))


def backbone_for_settings(settings: IndexSettings, device: str | None = None,
                          input_size: int | None = None) -> Backbone:
    """The backbone an index was built with: same model, weights (verified by hash before they are
    loaded) and preprocessing. A user's program as the model needs :func:`trust_models` (see above).

    ``input_size`` overrides the input side (explanations may run at a higher resolution than search).
    """
    from retrieval.models.loading import load_backbone

    apply_threads()
    check_trusted(settings.model)
    src = Path(settings.weights_source)
    weights = src if settings.weights_source not in ("", "random") and src.is_file() else None
    size = input_size or settings.preprocess.get("size")
    random = settings.weights_id == "random"
    bb = load_backbone(settings.model, weights, input_size=size, device=device, random_weights=random,
                       resize=settings.preprocess.get("resize", "squash"), pooling=settings.pooling,
                       expected_sha256=None if random else settings.weights_id)
    bb.precision = getattr(settings, "precision", "fp32") or "fp32"  # search and explain as the index was built
    if bb.weights_id != settings.weights_id:
        raise SettingsMismatch(f"the weights of {settings.model} ({bb.weights_source}) differ from the ones the "
                               "index was built with; restore those weights, or index into another --index "
                               "directory")
    return bb


def search_backbone_for_settings(settings: IndexSettings) -> Backbone:
    """For searching an index: the same embeddings as :func:`backbone_for_settings`, through the index's cached
    ONNX graph without importing torch when that graph is known (retrieval/models/runtime.py), else the full one."""
    from retrieval.models.runtime import fast_backbone

    # no trust check needed for the cached graph: only registry models are recorded (backbone_for_settings,
    # the fallback, checks a user's model before loading it)
    return fast_backbone(settings, lambda: backbone_for_settings(settings)) or backbone_for_settings(settings)
