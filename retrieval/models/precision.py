"""Numeric precision of the CPU fast path: fp32 (the default) or int8 (ONNX Runtime static quantisation).

``int8`` turns the cached fp32 ONNX graph (retrieval/models/backbone.py) into a QOperator graph -- QLinearConv and
QLinearAdd, weights int8 per output channel, activations uint8 from the input's QuantizeLinear to the output's
DequantizeLinear, paddings folded into the convolutions -- calibrated (min/max) on the photos shipped in
``data/samples`` and their mirror images, at a fixed input shape per graph, so the same machine always builds
the same graph and an index's embeddings stay comparable between runs. The quantised graph is cached beside
the fp32 one, under a name that changes with how it is made (:data:`QUANT_RECIPE`). It computes exactly what
the earlier QDQ graph computed (max |Δ| 0 on real photos), about 1.4x faster (bench/results/precision.md).

Chosen per machine at run time: without AVX-512 VNNI / AVX-VNNI, ONNX Runtime multiplies uint8 by int8
with ``vpmaddubsw``, whose 16-bit sums saturate; weights are then quantised to 7 bits (``reduce_range``),
as ONNX Runtime advises for such CPUs (measured here: mean cosine to fp32 0.87 with 8 bits, 0.97 with 7).

``bf16`` is refused with its reason: ONNX Runtime's CPU provider has no bf16 convolutions on x86, and the
quality/speed of a torch bf16 path was not measured (bench/results/precision.md).

An index records its precision when it is created (``retrieve index --precision``); search and explain use
the recorded one, and a different ``--precision`` for an existing index is refused.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from retrieval.errors import RetrieveError

PRECISIONS = ("fp32", "int8", "bf16")
DEFAULT_PRECISION = "fp32"
SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
_CAL_EXT = (".jpg", ".jpeg", ".png")


# Flags hidden by ``RETRIEVE_ISA=avx2``: an AVX-512 machine then takes the paths an AVX2-only one takes (CI runs
# the suite both ways on one machine; .ci/run's CI_ISA=avx2 sets this with the libraries' own switches).
_BEYOND_AVX2 = ("avx512", "avx_vnni", "amx")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere), less those above AVX2 when the
    environment says ``RETRIEVE_ISA=avx2``."""
    flags: frozenset = frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = os.environ.get("RETRIEVE_ISA", "").lower()
    if isa == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(_BEYOND_AVX2))
    elif isa not in ("", "native"):
        raise RetrieveError(f"RETRIEVE_ISA={isa!r} is not understood (native or avx2)")
    return flags


def has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def auto_precision() -> str:
    """A new index's precision where its preset leaves the choice to the machine (``--preset instance``): int8 where
    the CPU multiplies uint8 by int8 exactly (VNNI: 8-bit weights, about twice fp32's speed at 448 px, the same
    retrieval quality: bench/results/pipeline-instance.md), else fp32 (without VNNI, int8 needs 7-bit weights). The
    choice is recorded in the index (``IndexSettings.precision``), so its searches use it on any machine."""
    return "int8" if has_vnni() else "fp32"


def check_precision(precision: str | None) -> str:
    """``precision`` validated (None → the default); bf16 and unknown names are one-line errors."""
    p = (precision or DEFAULT_PRECISION).lower()
    if p == "bf16":
        have = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or ["none"]
        raise RetrieveError("--precision bf16 is not available: ONNX Runtime's CPU provider has no bf16 "
                            f"convolutions on x86 (this CPU's bf16 instructions: {', '.join(have)}); use "
                            "--precision int8 or fp32")
    if p not in PRECISIONS:
        raise RetrieveError(f"unknown precision {precision!r} (fp32 or int8)")
    return p


def quant_variant() -> str:
    """What the int8 graph depends on besides the fp32 graph: bits of the weights (per machine), ONNX
    Runtime's version (its quantiser), how it is made (:data:`QUANT_RECIPE`) and the calibration photos."""
    import onnxruntime

    h = hashlib.sha256(f"{onnxruntime.__version__} {QUANT_RECIPE}".encode())
    for p in calibration_files():
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return f"int8{'' if has_vnni() else 'r7'}-{h.hexdigest()[:12]}"


def calibration_files() -> list[Path]:
    files = sorted(p for p in SAMPLES.glob("*") if p.suffix.lower() in _CAL_EXT)
    if not files:
        raise RetrieveError(f"--precision int8 needs its calibration photos in {SAMPLES} (part of retrieve's "
                            "source tree); reinstall retrieve from its source, or use --precision fp32")
    return files


def calibration_batches(preprocess, hw: tuple[int, int], batch: int = 4) -> list[np.ndarray]:
    """The calibration inputs at exactly ``hw``: each shipped photo and its mirror image, normalised as
    ``preprocess`` does (resized onto ``hw``)."""
    from PIL import Image

    from retrieval.images import load_image

    arrays = []
    pre = preprocess.replace(resize="squash", size=max(hw))
    for p in calibration_files():
        img = load_image(p, min_side=max(hw))
        for im in (img, img.transpose(Image.FLIP_LEFT_RIGHT)):
            im = im.resize((hw[1], hw[0]), Image.BILINEAR)
            x = np.asarray(im, dtype=np.float32) * (1.0 / 255.0)
            x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
            arrays.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
    return [np.stack(arrays[i:i + batch]) for i in range(0, len(arrays), batch)]


def calibration_shape(hw: tuple[int, int], stride: int = 32) -> tuple[int, int]:
    """The shape an int8 graph of ``hw``'s remainder class is calibrated at: 224 plus the remainders, so
    every shape of one class gets the same graph, whichever shape came first."""
    return (7 * stride + hw[0] % stride, 7 * stride + hw[1] % stride)


#: How the int8 graph is made; part of its cache name (:func:`quant_variant`), so a graph made another way is
#: never taken for this one. "qop-padfused": QOperator format (QLinearConv, QLinearAdd: the tensors stay uint8
#: between layers) with each zero-padding folded into the convolution that follows it. Before (unnamed): QDQ
#: format, where ONNX Runtime kept a DequantizeLinear -> Pad -> QuantizeLinear round trip in float for each of
#: Lite0's 17 TF-"same" paddings: 1.4-1.5x fp32 instead of 2x (bench/results/int8-variants.md).
QUANT_RECIPE = "qop-padfused"


def quantize_graph(src: Path, dst: Path, batches: list[np.ndarray]) -> None:
    """Write ``src`` (an fp32 ONNX graph with input ``x``) quantised to int8 at ``dst`` (atomically): QOperator
    format, weights int8 per output channel (7 bits without VNNI), activations uint8 calibrated by min/max on
    ``batches``, paddings folded into the convolutions (:func:`fold_pads`)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    try:
        quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"])
        model = onnx.load(str(tmp))
        fold_pads(model)
        onnx.checker.check_model(model)
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def fold_pads(model, ops: tuple[str, ...] = ("QLinearConv",)) -> int:
    """Fold each constant Pad that feeds only a QLinearConv, padding with that convolution's input zero point
    (the quantised 0.0), into the convolution's own ``pads`` (which ONNX Runtime fills with the zero point):
    the same arithmetic without copying the feature map. TF-"same" padding is asymmetric (e.g. 0 before,
    1 after); ``pads`` holds begin and end separately. Pads whose amounts are not constants are left as they
    are. ``ops=("Conv",)`` does the same for float convolutions and zero padding: the product's fp32 graph is
    folded so when exported (retrieval/models/backbone.py _fold_pads), and the int8 graph is made from it. Returns how
    many were folded."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_inputs = {i.name for i in g.input}

    def constant(name: str):
        """The value of ``name`` when it depends on constants only, else None."""
        if name in inits:
            return inits[name]
        nodes, todo, seen = [], [name], set()
        while todo:
            t = todo.pop()
            if t in seen or t in inits or t == "":
                continue
            seen.add(t)
            n = producer.get(t)
            if n is None or t in graph_inputs:
                return None
            nodes.append(n)
            todo.extend(n.input)
        order = [n for n in g.node if n in nodes]  # the graph's node order is topological
        used = {i for n in order for i in n.input}
        sub = onnx.helper.make_graph(order, "c", [], [onnx.helper.make_tensor_value_info(name, 0, None)],
                                     [i for i in g.initializer if i.name in used])
        sub_model = onnx.helper.make_model(sub, opset_imports=model.opset_import)
        return ReferenceEvaluator(sub_model).run(None, {})[0]

    folded, drop = 0, []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or len(users) != 1 or users[0].op_type not in ops \
                or any(o.name == pad.output[0] for o in g.output):
            continue
        conv = users[0]
        amounts = constant(pad.input[1])
        value = constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        if conv.op_type == "QLinearConv":  # pads with its input's zero point
            zero = inits.get(conv.input[2])
            if zero is None or value is None or np.asarray(value).dtype != zero.dtype \
                    or int(np.asarray(value).ravel()[0]) != int(zero.ravel()[0]):
                continue
        elif value is not None and float(np.asarray(value).ravel()[0]) != 0.0:  # Conv pads with 0
            continue
        if amounts is None or len(pad.input) > 3 and pad.input[3]:
            continue
        amounts = [int(v) for v in np.asarray(amounts).ravel()]
        if len(amounts) != 8 or min(amounts) < 0 or any(amounts[i] for i in (0, 1, 4, 5)):
            continue  # only height and width, never cropping
        attrs = {a.name: a for a in conv.attribute}
        if attrs.get("auto_pad") is not None and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        new = [old[0] + amounts[2], old[1] + amounts[3], old[2] + amounts[6], old[3] + amounts[7]]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        drop.append(pad)
        folded += 1
    for n in drop:
        g.node.remove(n)
    # the constants that computed the folded amounts, now unused
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    return folded
