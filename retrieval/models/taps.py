"""The stride-16 layer of any feature network: the layer the default map fuses with the final map (explain/methods.py
SFAM), found by one probe forward pass instead of written by hand per backbone.

The tap is the end of the stride-16 stage: among the submodules whose output is a 4-D map at input side / 16, the one
that finishes last, leaving out the insides of a module that takes a stride-16 map in and gives something else out
(the first block of the next stage: its expansion convolution still runs at stride 16, but it is not the end of a
stage). Containers finish after their children, so a stage (ResNet's ``layer3``) wins over its last block.

A network whose own output is already at stride 16 or finer has no finer layer to fuse: no tap. Neither has a
TorchScript module: ScriptModules take no forward hooks (and ``Tapped`` taps through one), so a TorchScript model
gets the final layer only.
"""
from __future__ import annotations

import threading

import torch
from torch import nn


def _side(n: int, stride: int) -> set[int]:
    return {n // stride, -(-n // stride)}  # floor (torchvision's paddings) or ceil (TensorFlow's "same")


def _at(t, size: int, stride: int) -> bool:
    """Whether ``t`` is an N×C×h×w map at ``stride`` of a ``size``×``size`` input."""
    return isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[-2] in _side(size, stride) \
        and t.shape[-1] in _side(size, stride)


def find_tap(net: nn.Module, input_size: int = 224) -> str | None:
    """The name (as ``net.get_submodule`` takes it) of ``net``'s stride-16 layer, or None: a TorchScript module, a
    network whose output is not coarser than stride 16, or none of its submodules outputs a stride-16 map. One forward
    pass of a zeros batch at ``input_size`` px, with hooks; ``net`` is left as it was (mode, no hooks)."""
    if isinstance(net, torch.jit.ScriptModule) or input_size < 32:
        return None
    names = {id(m): name for name, m in net.named_modules() if name}
    parent_of = {}
    for name, m in net.named_modules():
        for child in m.children():
            parent_of.setdefault(id(child), id(m))
    ended: dict[int, int] = {}  # module id → the order in which its last call ended
    out16: dict[int, bool] = {}  # module id → whether its last call gave a stride-16 map
    transitions: set[int] = set()  # modules taking a stride-16 map in and giving something else out
    order = [0]
    me = threading.get_ident()  # another thread running the same network meanwhile is not the probe

    def hook(m, args, out):
        if threading.get_ident() != me:
            return
        order[0] += 1
        ended[id(m)] = order[0]
        out16[id(m)] = _at(out, input_size, 16)
        if args and _at(args[0], input_size, 16) and not out16[id(m)]:
            transitions.add(id(m))

    handles = []
    training = net.training
    param = next(net.parameters(), None)
    try:
        for m in net.modules():
            if id(m) in names:
                try:
                    handles.append(m.register_forward_hook(hook))
                except RuntimeError:  # a ScriptModule inside: no hooks there
                    return None
        with torch.inference_mode():
            out = net.eval()(torch.zeros(1, 3, input_size, input_size,
                                         device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        net.train(training)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not (isinstance(out, torch.Tensor) and out.ndim == 4) or out.shape[-1] >= min(_side(input_size, 16)):
        return None  # not a map, or already as fine as the tap would be

    def inside_a_transition(i: int) -> bool:
        i = parent_of.get(i)
        while i is not None and i in names:
            if i in transitions:
                return True
            i = parent_of.get(i)
        return False

    found = [i for i in ended if out16[i] and not inside_a_transition(i)]
    return names[max(found, key=ended.__getitem__)] if found else None
