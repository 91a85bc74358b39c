"""Numeric precision of the CPU fast path: fp32 (the default) or int8 (ONNX Runtime static quantisation).

``int8`` turns the cached fp32 ONNX graph (retrieval/backbone.py) into a QDQ graph -- weights int8 per output
channel, activations uint8 -- calibrated (min/max) on the photos shipped in ``data/samples`` and their
mirror images, at a fixed input shape per graph, so the same machine always builds the same graph and an
index's embeddings stay comparable between runs. The quantised graph is cached beside the fp32 one.

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

from .errors import RetrieveError

PRECISIONS = ("fp32", "int8", "bf16")
DEFAULT_PRECISION = "fp32"
SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
_CAL_EXT = (".jpg", ".jpeg", ".png")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


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
    Runtime's version (its quantiser) and the calibration photos."""
    import onnxruntime

    h = hashlib.sha256(onnxruntime.__version__.encode())
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

    from .images import load_image

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


def quantize_graph(src: Path, dst: Path, batches: list[np.ndarray]) -> None:
    """Write ``src`` (an fp32 ONNX graph with input ``x``) quantised to int8 QDQ at ``dst`` (atomically)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    try:
        quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"])
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
