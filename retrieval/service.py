"""Builds the objects a command needs from an index's recorded settings (one place, so tests can substitute)."""
from __future__ import annotations

from pathlib import Path

from .backbone import Backbone
from .errors import SettingsMismatch
from .models import load_backbone
from .store import IndexSettings


def backbone_for_settings(settings: IndexSettings, device: str | None = None,
                          input_size: int | None = None) -> Backbone:
    """The backbone an index was built with: same model, weights (verified by hash) and preprocessing.

    ``input_size`` overrides the input side (explanations may run at a higher resolution than search).
    """
    src = Path(settings.weights_source)
    weights = src if settings.weights_source not in ("", "random") and src.is_file() else None
    size = input_size or settings.preprocess.get("size")
    bb = load_backbone(settings.model, weights, input_size=size, device=device,
                       random_weights=settings.weights_id == "random",
                       resize=settings.preprocess.get("resize", "squash"), pooling=settings.pooling)
    if bb.weights_id != settings.weights_id:
        raise SettingsMismatch(f"the weights of {settings.model} ({bb.weights_source}) differ from the ones the "
                               "index was built with; rebuild the index or restore those weights")
    return bb
