"""The backbone: Lite0 reproduces ImageNet predictions on real photos; fast path ≡ eager; every backbone's shapes."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import skimage_photo
from retrieval.errors import UnknownModel, WeightsUnavailable
from retrieval.models.loading import imagenet_classifier, load_backbone
from retrieval.models.registry import REGISTRY

EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.mark.parametrize("path", ["eager", "fast"])
def test_lite0_top1_on_real_photos(lite0, path):
    # A wrong padding (symmetric instead of TF "same"), BatchNorm eps or normalisation breaks these.
    x = lite0.preprocess.batch([skimage_photo("chelsea"), skimage_photo("coffee")])
    with torch.no_grad():
        a = lite0.eager_features(x) if path == "eager" else lite0.features(x)
    p = imagenet_classifier(lite0)(a).softmax(-1)
    assert p[0].argmax().item() == EGYPTIAN_CAT and p[0, EGYPTIAN_CAT] > 0.7
    assert p[1].argmax().item() == ESPRESSO and p[1, ESPRESSO] > 0.85


def test_lite0_state_dict_loads_strictly(lite0):
    net = lite0.net.net
    n = sum(v.numel() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n == 4_694_024  # every tensor of the package's state dict, loaded with strict=True
    assert net._bn1.eps == 1e-3


def test_fast_path_matches_eager(lite0):
    x = lite0.preprocess.batch([skimage_photo(n) for n in ("chelsea", "rocket", "astronaut")])
    with torch.no_grad():
        ref = lite0.eager_features(x)
    fast, pooled = lite0.embed(x)
    assert lite0.fast_path_name() in ("onnxruntime", "torchscript")
    assert fast.shape == ref.shape == (3, 1280, 7, 7)
    assert (fast - ref).abs().max().item() < 1e-3 * ref.abs().max().item()
    torch.testing.assert_close(pooled, ref.mean((2, 3)), atol=1e-4, rtol=1e-4)


def test_embedding_is_the_pool_of_the_map_from_one_pass(lite0):
    x = lite0.preprocess.batch([skimage_photo("coffee")])
    a, e = lite0.embed(x)
    assert e.shape == (1, 1280)
    assert torch.allclose(e, a.mean((2, 3)))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_backbone_shapes(name):
    bb = load_backbone(name, random_weights=True, fast="eager")
    x = torch.randn(2, 3, 224, 224)
    a, e = bb.embed(x)
    assert a.shape == (2, bb.feature_dim, 7, 7)
    assert e.shape == (2, bb.feature_dim)
    assert bb.preprocess.size == 224


def test_torchvision_backbone_from_local_weights(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    f = tmp_path / "r18.pth"
    torch.save(state, f)
    bb = load_backbone("resnet18", weights=f)
    assert bb.weights_source == str(f.resolve()) and len(bb.weights_id) == 64
    assert bb.embed(torch.randn(1, 3, 224, 224))[0].shape == (1, 512, 7, 7)


def test_wrong_weights_file_is_one_clear_error(tmp_path):
    f = tmp_path / "bad.pth"
    f.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="bad.pth"):
        load_backbone("resnet18", weights=f)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailable, match="does not fit resnet18"):
        load_backbone("resnet18", weights=tmp_path / "other.pth")


def test_offline_without_weights_says_how_to_supply_them(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty download cache

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable, match="--weights PATH"):
        load_backbone("resnet50")


def test_user_torchscript_model(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    f = tmp_path / "mine.pt"
    torch.jit.script(net).save(str(f))
    bb = load_backbone(str(f))
    assert bb.feature_dim == 8
    assert bb.embed(torch.randn(1, 3, 224, 224))[0].shape == (1, 8, 56, 56)


def test_user_module_function_with_layer(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))\n"
        "    return m, '1'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bb = load_backbone("my_models:build", fast="eager")
    a, e = bb.embed(torch.randn(2, 3, 224, 224))
    assert a.shape == (2, 6, 111, 111) and e.shape == (2, 6)


def test_unknown_model_lists_known_ones():
    from retrieval.models.prepare import new_index_identity

    with pytest.raises(UnknownModel, match="efficientnet_lite0"):
        load_backbone("no_such_net")
    with pytest.raises(UnknownModel, match="no such TorchScript file"):
        load_backbone("missing.pt")
    with pytest.raises(UnknownModel, match="unknown model 'no_such_net'"):  # refused without torch, before a child
        new_index_identity("no_such_net", None, None, None, None, "fp32")
    assert new_index_identity("missing.pt", None, None, None, None, "fp32") is None  # the torch path says


def test_at_size_shares_the_weights_and_changes_only_the_input(lite0):
    big = lite0.at_size(448)
    assert big.net is lite0.net and big.weights_id == lite0.weights_id and lite0.at_size(224) is lite0
    assert big.preprocess.size == 448 and lite0.preprocess.size == 224
    a, _ = big.embed(big.preprocess.batch([skimage_photo("coffee")]))
    assert a.shape == (1, 1280, 14, 14)
    with torch.no_grad():
        ref = big.eager_features(big.preprocess.batch([skimage_photo("coffee")]))
    assert (a - ref).abs().max().item() < 1e-3 * ref.abs().max().item()


def test_one_onnx_graph_serves_three_shapes_exactly_and_its_cache_is_kept_clean(tmp_path, monkeypatch):
    import os
    import subprocess

    import retrieval
    from retrieval.models.graphs import onnx_cache_key

    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "retrieve" / "onnx"
    folder.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (folder / f"old.onnx.tmp{gone.pid}").write_bytes(b"half an export, its process killed")
    (folder / f"busy.onnx.tmp{os.getpid()}").write_bytes(b"an export in progress")
    bb = load_backbone("efficientnet_lite0", input_size=448, resize="long")
    cat = skimage_photo("chelsea")
    images = [cat, cat.crop((0, 0, 300, 300)), cat.transpose(Image.Transpose.ROTATE_90)]
    arrays = [bb.preprocess.array(im) for im in images]
    assert [a.shape[1:] for a in arrays] == [(288, 448), (448, 448), (448, 288)]
    for a in arrays:
        x = torch.from_numpy(a)[None]
        fast = bb.features(x)
        with torch.no_grad():
            ref = bb.eager_features(x)
        assert bb._runner(tuple(x.shape[-2:])).kind == "onnxruntime"
        assert fast.shape == ref.shape and (fast - ref).abs().max().item() < 1e-3 * ref.abs().max().item()
    graphs = sorted(p.name for p in folder.glob("*.onnx"))
    key = onnx_cache_key(bb.net)[:16]
    assert graphs == [f"efficientnet_lite0-{bb.weights_id[:16]}-{key}-mod32-0x0.onnx"]  # one graph, not three
    assert not (folder / f"old.onnx.tmp{gone.pid}").exists() and (folder / f"busy.onnx.tmp{os.getpid()}").exists()
    monkeypatch.setattr(retrieval, "__version__", "99.0")
    assert onnx_cache_key(bb.net)[:16] != key  # another retrieve exports its own graphs


def test_an_onnx_export_leaves_the_eager_network_as_it_was(tmp_path):
    from retrieval.models.graphs import export as _export

    class Twice(nn.Module):  # a new wrapper (in training mode, as new modules are) with a layer registered twice
        def __init__(self, net):
            super().__init__()
            self.net, self.layer = net, net.net._blocks[10]

        def forward(self, x):
            return self.net(x)

    bb = load_backbone("efficientnet_lite0", fast="eager")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = bb.eager_features(x)
    _export(Twice(bb.net), (224, 224), tmp_path / "t.onnx", True, ["fmap"])
    with torch.no_grad():
        assert torch.equal(bb.eager_features(x), before)


def test_preprocess_array_is_its_definition_bit_for_bit():
    """Preprocess.array = ((resized pixels / 255) − mean) / std as 3×h×w float32, exactly (the fast in-place
    form must not change a single embedding of an existing index)."""
    import numpy as np
    from PIL import Image

    from retrieval.models.preprocess import Preprocess

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (301, 517, 3), dtype=np.uint8))
    for pre in (Preprocess(), Preprocess(size=448, resize="long"), Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))):
        h, w = pre.shape_for(*img.size)
        a = np.asarray(img.resize((w, h), Image.BICUBIC if pre.interpolation == "bicubic" else Image.BILINEAR))
        expect = ((a.astype(np.float32) * np.float32(1 / 255) - np.asarray(pre.mean, np.float32))
                  / np.asarray(pre.std, np.float32)).transpose(2, 0, 1)
        got = pre.array(img)
        assert got.shape == (3, h, w) and got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
        assert np.array_equal(got, expect)


def test_cuda_is_picked_without_tf32():
    """On CUDA, TF32 moved embeddings by up to 7e-4 and SFAM maps by up to 10 % of their peak against the CPU's
    (bench/results/cuda-check.md): picking a CUDA device turns it off for convolutions and matrix products;
    picking the CPU leaves the settings alone. (torch.device("cuda") needs no GPU.)"""
    import torch

    from retrieval.models.networks import pick_device

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert pick_device("cpu").type == "cpu"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert pick_device("cuda").type == "cuda"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_copy_at_another_size_shares_the_every_shape_check_and_a_pickle_leaves_it_out():
    """An index run's backbone and its copy at the explain size share one :class:`EveryShape` (its child runs once
    for both; copy.copy goes through __getstate__, which drops it for Ray's pickles)."""
    import pickle

    from retrieval.models.backbone import Backbone
    from retrieval.models.preprocess import Preprocess

    bb = Backbone("efficientnet_lite0", None, Preprocess(size=224, resize="long"), 1280, "", "random")
    bb.more_graphs = check = object()
    assert bb.at_size(448).more_graphs is check and bb.replace(precision="int8").more_graphs is check
    assert pickle.loads(pickle.dumps(bb)).more_graphs is None


@pytest.mark.parametrize("size", [448, 300, 224, 64])
def test_every_shape_is_every_input_shape_the_preprocessing_gives(size):
    """Preprocess.every_shape, which an index run's graph child checks ahead, holds every shape shape_for gives
    (aspect kept: the long side at ``size``, the short one a multiple of the stride or ``size``), each once."""
    import random

    from retrieval.models.preprocess import Preprocess

    pre = Preprocess(size=size, resize="long")
    every = pre.every_shape()
    assert len(every) == len(set(every)) and set(pre.common_shapes()) <= set(every)
    rng = random.Random(0)
    got = {pre.shape_for(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(20000)}
    got |= {pre.shape_for(w, h) for w, h in ((size, 1), (1, size), (6000, 6000), (6000, 5999))}
    assert got == set(every)
    assert Preprocess(size=size, resize="squash").every_shape() == [(size, size)]
