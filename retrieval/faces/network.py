"""A PyTorch port of dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

The weights are read from dlib's own serialisation (no dlib needed for that):

- integers: one header byte (low nibble = number of little-endian bytes that follow, bit 7 = negative);
- floats (layer settings): an integer mantissa and an integer exponent, ``m · 2^e``;
- strings: an integer length and the bytes;
- tensors: a version, four integer dimensions (n, k, nr, nc) and the values as raw float32 little-endian;
- the network: the loss layer's name and settings, then one version number per nested layer (outermost
  first), then each layer's details in *forward* order (its name, parameters and settings) followed by
  three flag characters and three (empty) state tensors. Tag and skip layers (the residual wiring) leave
  nothing in that stream, so the wiring is the published architecture (dlib's dnn_face_recognition_ex):

    loss_metric<fc_no_bias<128, avg_pool_everything<
        alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>

  with ``ares<N>`` = relu(x + block(x)), ``ares_down<N>`` = relu(avgpool2x2(x) ⊕ block_s2(x)), ``block`` =
  affine(con3x3(relu(affine(con3x3/s(x))))), and ``⊕`` dlib's add_prev: the larger of the two shapes, the
  smaller tensor added at its top-left corner (zeros elsewhere: channel counts and map sides differ).

The descriptor is ``fc_no_bias`` over the global average of the last feature map, a linear map: folded into
a 1×1 convolution on that map (:class:`DlibFaceFeatures`), the descriptor is the global average of a
128-channel feature map, so SFAM's CIS decomposes the L2 similarity of two faces exactly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import RetrieveError, WeightsUnavailable
from retrieval.models.registry import FACE_MODEL

MODEL_NAME = FACE_MODEL
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's default padding around the 5 landmarks (compute_face_descriptor)
SAME_PERSON = 0.6  # dlib's documented threshold: descriptors closer than this are the same person
EXTRA_HINT = "pip install -e '.[faces]' (dlib-bin and face-recognition-models)"

_FILES = {
    "resnet": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "cnn": "mmod_human_face_detector.dat",
}


def model_file(which: str) -> Path:
    """The path of one of the model files the ``face-recognition-models`` package ships (found without
    importing it: its ``__init__`` needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise WeightsUnavailable(f"the face models are not installed; {EXTRA_HINT}")
    p = Path(spec.origin).parent / "models" / _FILES[which]
    if not p.is_file():
        raise WeightsUnavailable(f"{p}: missing from the face-recognition-models package; reinstall it")
    return p


# -- dlib's serialisation ---------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, where: str):
        self.b, self.i, self.where = data, 0, where

    def fail(self, what: str):
        raise WeightsUnavailable(f"{self.where}: not a dlib face ResNet file ({what} at byte {self.i})")

    def int(self) -> int:
        if self.i >= len(self.b):
            self.fail("unexpected end")
        h = self.b[self.i]
        n = h & 0x0F
        if n > 8 or self.i + 1 + n > len(self.b):
            self.fail("bad integer")
        v = int.from_bytes(self.b[self.i + 1:self.i + 1 + n], "little")
        self.i += 1 + n
        return -v if h & 0x80 else v

    def str(self) -> str:
        n = self.int()
        if n < 0 or n > 256:
            self.fail("bad string")
        s = self.b[self.i:self.i + n]
        self.i += n
        try:
            return s.decode("ascii")
        except UnicodeDecodeError:
            self.fail("bad string")

    def float(self) -> float:
        m, e = self.int(), self.int()
        return float(m) * 2.0 ** e

    def tensor(self) -> np.ndarray:
        self.int()  # version
        shape = [self.int() for _ in range(4)]
        n = int(np.prod(shape))
        if min(shape) < 0 or self.i + 4 * n > len(self.b):
            self.fail("bad tensor")
        a = np.frombuffer(self.b, dtype="<f4", count=n, offset=self.i).astype(np.float32).reshape(shape)
        self.i += 4 * n
        return a

    def alias(self) -> list[int]:
        return [self.int() for _ in range(5)]  # version, n, k, nr, nc

    def trailer(self) -> None:
        flags = self.b[self.i:self.i + 3]
        if len(flags) != 3 or any(c not in b"01" for c in flags):
            self.fail("bad layer trailer")
        self.i += 3
        for _ in range(3):
            self.tensor()


def read_layers(path: str | os.PathLike) -> tuple[dict, list[tuple[str, dict]]]:
    """(input settings, [(layer name, details)...] in forward order) from a dlib face ResNet file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsUnavailable(f"{path}: cannot read it ({e.strerror or e})") from None
    r = _Reader(data, str(path))
    r.int()
    if r.str() != "loss_metric_2":
        r.fail("no loss_metric_2 layer")
    r.float(), r.float()  # margin, distance threshold
    while True:  # the nested layers' version numbers, up to the input layer's name
        if r.i + 2 > len(data):
            r.fail("no input layer")
        if data[r.i + 1:r.i + 2] == b"\x15" and data[r.i + 2:r.i + 7] == b"input":
            break
        r.int()
    if r.str() != "input_rgb_image_sized":
        r.fail("unexpected input layer")
    inp = {"mean": (r.float(), r.float(), r.float()), "size": (r.int(), r.int())}
    layers: list[tuple[str, dict]] = []
    first = True
    while r.i < len(data):
        name = r.str()
        d: dict = {}
        if name == "con_4":
            p = r.tensor().reshape(-1)
            nf, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
            _, n, k, _, _ = r.alias()
            r.alias()
            for _ in range(4):
                r.float()
            w = p[:nf * k * nr * nc].reshape(nf, k, nr, nc)
            d = {"weight": w, "bias": p[nf * k * nr * nc:nf * k * nr * nc + nf], "stride": (sy, sx), "padding": (py, px)}
        elif name == "affine_":
            p = r.tensor().reshape(-1)
            g = r.alias()
            r.alias()
            r.int()  # mode (0: per channel)
            c = g[2]
            d = {"gamma": p[:c], "beta": p[c:2 * c]}
        elif name in ("relu_", "add_prev_"):
            pass
        elif name in ("max_pool_2", "avg_pool_2"):
            nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
            d = {"size": (nr, nc), "stride": (sy, sx), "padding": (py, px)}
        elif name == "fc_2":
            n_out, n_in = r.int(), r.int()
            p = r.tensor().reshape(-1)
            r.alias(), r.alias()
            mode = r.int()
            for _ in range(4):
                r.float()
            if mode != 1:
                r.fail("fc layer with a bias")
            d = {"weight": p[:n_in * n_out].reshape(n_in, n_out)}
        else:
            r.fail(f"unknown layer {name!r}")
        r.trailer()
        if first:
            r.int()  # the input layer's sample expansion factor
            first = False
        layers.append((name, d))
    return inp, layers


# -- the network ------------------------------------------------------------------------------------
def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the larger shape, each tensor added at the top-left corner (zero elsewhere)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))
    return (F.pad(a, (0, w - a.shape[3], 0, h - a.shape[2], 0, c - a.shape[1]))
            + F.pad(b, (0, w - b.shape[3], 0, h - b.shape[2], 0, c - b.shape[1])))


class Affine(nn.Module):
    """dlib's affine layer (batch norm frozen into a per-channel scale and shift)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class Block(nn.Module):
    """One residual unit: relu(x + block(x)), or with ``down`` relu(avgpool(x) ⊕ block_s2(x))."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        s = 2 if down else 1
        self.conv1 = nn.Conv2d(cin, cout, 3, s, 0 if down else 1)
        self.aff1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.aff2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(dlib_add(y, skip) if self.down else y + skip)


#: (channels, down) of each residual unit in forward order: alevel4 … alevel0.
UNITS = ([(32, False)] * 3 + [(64, True)] + [(64, False)] * 3 + [(128, True)] + [(128, False)] * 2
         + [(256, True)] + [(256, False)] * 2 + [(256, True)])


class DlibFaceResNet(nn.Module):
    """The 29-convolution ResNet; ``forward`` returns the last feature map (256×2×2 for a 150×150 chip)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 32, 7, 2, 0)
        self.aff0 = Affine(32)
        units, cin = [], 32
        for c, down in UNITS:
            units.append(Block(cin, c, down))
            cin = c
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.aff0(self.conv0(x))), 3, 2)
        return self.units(x)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward(x).mean((2, 3)))

    def load_dlib(self, path: str | os.PathLike) -> dict:
        """Copy the weights of a dlib file into this module; returns the input layer's settings."""
        inp, layers = read_layers(path)
        convs = [d for n, d in layers if n == "con_4"]
        affs = [d for n, d in layers if n == "affine_"]
        fcs = [d for n, d in layers if n == "fc_2"]
        mine_c = [self.conv0] + [c for u in self.units for c in (u.conv1, u.conv2)]
        mine_a = [self.aff0] + [a for u in self.units for a in (u.aff1, u.aff2)]
        if len(convs) != len(mine_c) or len(affs) != len(mine_a) or len(fcs) != 1:
            raise WeightsUnavailable(f"{path}: not the 29-layer face ResNet ({len(convs)} convolutions)")
        with torch.no_grad():
            for m, d in zip(mine_c, convs):
                if tuple(d["weight"].shape) != tuple(m.weight.shape) or tuple(d["padding"]) != tuple(m.padding) \
                        or tuple(d["stride"]) != tuple(m.stride):
                    raise WeightsUnavailable(f"{path}: a convolution of shape {d['weight'].shape} does not fit")
                m.weight.copy_(torch.from_numpy(d["weight"]))
                m.bias.copy_(torch.from_numpy(d["bias"]))
            for m, d in zip(mine_a, affs):
                m.weight.copy_(torch.from_numpy(d["gamma"]))
                m.bias.copy_(torch.from_numpy(d["beta"]))
            self.fc.weight.copy_(torch.from_numpy(fcs[0]["weight"].T))
        return inp


class DlibFaceFeatures(nn.Module):
    """The feature map whose global average *is* the 128-d descriptor: ``fc`` as a 1×1 convolution on the
    last map (linear maps commute with averaging), 128×2×2 for a 150×150 chip."""

    def __init__(self, net: DlibFaceResNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.net(x)
        return torch.einsum("oc,nchw->nohw", self.net.fc.weight, a)


_CACHE: dict[str, tuple[DlibFaceResNet, dict, str]] = {}


def load_net(path: str | os.PathLike | None = None) -> tuple[DlibFaceResNet, dict, str]:
    """(network, input settings, sha256 of the file), parsed once per process."""
    path = Path(path) if path is not None else model_file("resnet")
    key = str(path.resolve())
    if key not in _CACHE:
        net = DlibFaceResNet()
        inp = net.load_dlib(path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        _CACHE[key] = (net.eval(), inp, sha)
    return _CACHE[key]


def load_backbone(weights: str | os.PathLike | None = None, *, device: str | None = None, fast: str = "auto",
                  expected_sha256: str | None = None):
    """The port as a :class:`retrieval.models.backbone.Backbone`: 150×150 chips, dlib's input scaling
    (``(pixel − mean) / 256`` as mean/std over [0, 1] pixels), the 128-channel map of
    :class:`DlibFaceFeatures` (GAP = the descriptor)."""
    from retrieval.models.backbone import Backbone
    from retrieval.models.networks import pick_device
    from retrieval.models.preprocess import Preprocess
    from retrieval.errors import SettingsMismatch

    net, inp, sha = load_net(weights)
    if expected_sha256 is not None and sha != expected_sha256:
        raise SettingsMismatch(f"{model_file('resnet') if weights is None else weights}: not the face model "
                               "the index was built with (its sha256 differs); reinstall face-recognition-models "
                               "0.3.0, or index into another --index directory")
    mean = tuple(float(m) / 255.0 for m in inp["mean"])
    std = (256.0 / 255.0,) * 3
    pre = Preprocess(CHIP_SIZE, mean, std, "bilinear", "squash")
    src = str(Path(weights) if weights is not None else model_file("resnet"))
    return Backbone(MODEL_NAME, DlibFaceFeatures(net), pre, 128, src, sha, pick_device(device), fast)


#: The finer layer SFAM's default map fuses with the last one (128 channels, 8×8 on a chip; a name in Backbone.net).
TAP = "net.units.9"
#: The index value holding μ_tap, the mean of ``TAP``'s spatially averaged map over a sample of indexed faces:
#: SFAM centres that layer on it, as the general preset centres its stride-16 layer (retrieval/index/reference.py).
REFERENCE_KEY = "faces_explain_reference"
REFERENCE_SAMPLE = 128  # faces of an indexing run whose chips are kept for it


def tap_reference(backbone, chips: list[np.ndarray], images: int) -> dict:
    """{"tap", "mean_tap", "sampled", "images"} from 150×150 chips (``images``: faces in the index)."""
    from PIL import Image

    total = None
    for i in range(0, len(chips), 32):
        x = backbone.preprocess.batch([Image.fromarray(c) for c in chips[i:i + 32]])
        part = backbone.features_and_tap(x, TAP)[1].double().mean((2, 3)).sum(0).numpy()
        total = part if total is None else total + part
    return {"tap": TAP, "mean_tap": (total / len(chips)).tolist(), "sampled": len(chips), "images": int(images)}


def refresh_tap_reference(store, backbone, chips: list[np.ndarray]) -> None:
    """Store μ_tap from ``chips`` (faces of this indexing run) when the index has none, or the collection has
    halved or doubled since it was sampled (the rule of retrieval/index/reference.py)."""
    n = store.count()
    old = store.get_value(REFERENCE_KEY)
    if not n or not chips:
        return
    if old and old.get("tap") == TAP and old["images"] / 2 <= n <= 2 * max(old["images"], 1):
        return
    store.set_value(REFERENCE_KEY, tap_reference(backbone, chips, n))


def stored_tap_mean(store) -> np.ndarray | None:
    """The index's μ_tap (None for an index built before it was stored: SFAM then leaves that layer uncentred)."""
    ref = store.get_value(REFERENCE_KEY)
    if not ref or ref.get("tap") != TAP or ref.get("mean_tap") is None:
        return None
    return np.asarray(ref["mean_tap"], np.float64)


def chip_tensor(chips: list[np.ndarray]) -> torch.Tensor:
    """150×150×3 uint8 RGB chips → the network's input, exactly as dlib scales it."""
    net, inp, _ = load_net()
    x = torch.from_numpy(np.stack(chips).astype(np.float32)).permute(0, 3, 1, 2)
    m = torch.tensor(inp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / 256.0


def mean_face() -> tuple[np.ndarray, float]:
    """(μ, t): the mean face descriptor the faces preset measures its cosine from, and the threshold at which that
    cosine says "the same person" (retrieval/faces/mean_face.json: chosen across two sets of faces, ORL and public
    figures' photos, each checked on the other: bench/results/faces-metric.md)."""
    import json

    d = json.loads((Path(__file__).with_name("mean_face.json")).read_text())
    return np.asarray(d["mu"], np.float64), float(d["threshold"])


def need_dlib():
    """The dlib module, or a one-line error naming the extra."""
    try:
        import dlib
    except ImportError:
        raise RetrieveError(f"the faces preset needs dlib; {EXTRA_HINT}") from None
    return dlib
