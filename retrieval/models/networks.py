"""The torch side of a backbone: the device, the wrappers that make a network return its feature map (and a tapped
layer's), and the two paths besides ONNX Runtime -- a frozen TorchScript graph and eager PyTorch."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from retrieval.errors import RetrieveError


def pick_device(device: str | None = None) -> torch.device:
    """``None``/"auto" → CUDA when present, else CPU. On CUDA, TF32 is turned off for convolutions and matrix
    products: PyTorch allows it for cuDNN's convolutions by default, which moved embeddings by up to 7e-4 and SFAM
    maps by up to 10 % of their peak against the CPU's on an H200; in fp32 they agree to 1e-6
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


class Tapped(nn.Module):
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


class LayerOutput(Tapped):
    """``net`` returning only the output of its submodule ``layer``: a user's ``module:function`` model, whose
    feature map is that layer's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[1]


class EagerRunner:
    """The network itself (any device); float32 arrays on the CPU out."""

    kind = "eager"

    def __init__(self, net: nn.Module, device: torch.device):
        self.net, self.device = net, device

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.net(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
        return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]


class JitRunner:
    """A frozen TorchScript trace of the network at one input shape (where ONNX Runtime is unavailable)."""

    kind = "torchscript"

    def __init__(self, net: nn.Module, hw: tuple[int, int]):
        import warnings

        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            self.module = torch.jit.freeze(torch.jit.trace(net, torch.zeros(1, 3, *hw), check_trace=False).eval())

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
