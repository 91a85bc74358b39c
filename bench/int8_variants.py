"""Which int8 graph is fastest on this CPU, and how close it stays to fp32: quantisation variants of the
cached fp32 Lite0 graph side by side (ONNX Runtime, CPU).

    python bench/int8_variants.py [--threads 2] [--batch 16] [--rounds 7] [--variants NAME ...] [--profile]

Each variant is made from the same fp32 dynamic graph and the same calibration batches (retrieval/models/precision.py),
into bench/.cache/int8-variants/. For each: the ops left after ONNX Runtime's optimisation (saved through
``SessionOptions.optimized_model_filepath``), the forward speed at 224 and 448 px (all sessions interleaved,
median of the rounds, one batch of real Caltech photos) and the cosine of its pooled embeddings to fp32's.
``--profile`` adds each session's time per op type (``SessionOptions.enable_profiling``).
Saves bench/results/int8-variants.md.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import _common
import numpy as np
import torch

from retrieval.models.backbone import ORT_RUN_PIXELS
from retrieval.images import load_image
from retrieval.models.loading import load_backbone

CACHE = _common.ROOT / "bench" / ".cache" / "int8-variants"


def _convs(model) -> tuple[list[str], list[str]]:
    """(depthwise conv names, other conv names) of an ONNX model."""
    dw, other = [], []
    for n in model.graph.node:
        if n.op_type == "Conv":
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            (dw if g > 1 else other).append(n.name)
    return dw, other


def variants(fp32: Path) -> dict[str, dict]:
    """name → quantize_static keyword arguments (beyond the model, the reader and the calibration method)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType

    from retrieval.models.precision import has_vnni

    dw, other = _convs(onnx.load(str(fp32)))
    base = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=not has_vnni(),
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {
        "product (QOperator, pads folded)": None,  # retrieval/models/precision.py quantize_graph
        "fp32, pads folded (not the product)": "fp32-fold",  # what the same folding would give fp32
        "before (QDQ, per-channel, 7-bit)": base,
        "QOperator": {**base, "quant_format": QuantFormat.QOperator},
        "per-tensor": {**base, "per_channel": False},
        "8-bit weights": {**base, "reduce_range": False},
        "depthwise fp32": {**base, "nodes_to_exclude": dw},
        "QOperator, depthwise fp32": {**base, "quant_format": QuantFormat.QOperator, "nodes_to_exclude": dw},
        "stem+head fp32": {**base, "nodes_to_exclude": [other[0], other[-1]]},
        "stem+head+dw fp32": {**base, "nodes_to_exclude": dw + [other[0], other[-1]]},
        "s8 activations": {**base, "activation_type": QuantType.QInt8,
                           "extra_options": {"ActivationSymmetric": True}},
    }


def make(name: str, kw: dict, fp32: Path, batches: list[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_static

    dst = CACHE / (name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "").replace("+", "-")
                   + ".onnx")
    if dst.exists():
        return dst

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    CACHE.mkdir(parents=True, exist_ok=True)
    if kw is None:
        from retrieval.models.precision import quantize_graph

        quantize_graph(fp32, dst, batches)
        return dst
    if kw == "fp32-fold":
        import onnx

        from retrieval.models.precision import fold_pads

        model = onnx.load(str(fp32))
        print(f"{name}: {fold_pads(model, ('Conv',))} pads folded")
        onnx.save(model, str(dst))
        return dst
    quantize_static(str(fp32), str(dst), Reader(), calibrate_method=CalibrationMethod.MinMax,
                    calibration_providers=["CPUExecutionProvider"], **kw)
    return dst


def session(path: Path, threads: int, profile: str | None = None, optimised: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the product runs
    if optimised is not None:
        opts.optimized_model_filepath = str(optimised)
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_counts(path: Path, threads: int) -> str:
    import onnx

    out = path.with_suffix(".opt.onnx")
    session(path, threads, optimised=out)
    c = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    keep = ("Conv", "QLinearConv", "ConvInteger", "NchwcConv", "FusedConv", "QuantizeLinear", "DequantizeLinear",
            "QLinearAdd", "Add", "Transpose", "Pad", "ReorderInput", "ReorderOutput")
    return ", ".join(f"{k} {c[k]}" for k in keep if c[k])


def _layer(node_name: str) -> str:
    """Which of Lite0's kinds of layer a node belongs to, from its name (fp32's fused nodes lose theirs)."""
    return next((k for k in ("depthwise", "expand", "project", "stem", "head") if k in node_name), "other")


def profile_ops(path: Path, x: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Mean ms per run: convolutions by kind of layer, paddings, (de)quantisation, layout changes, the rest."""
    prefix = str(CACHE / f"prof-{path.stem}")
    s = session(path, threads, profile=prefix)
    for _ in range(runs + 1):
        s.run(None, {"x": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    per = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            group = ("convolutions: " + _layer(e["name"]) if "Conv" in op
                     else "Pad" if op == "Pad"
                     else "Quantize / Dequantize" if op in ("QuantizeLinear", "DequantizeLinear")
                     else "layout (Reorder*, Transpose)" if op.startswith(("Reorder", "Transpose"))
                     else "other")
            per[group] += e["dur"] / 1000
    return {k: v / (runs + 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--name", default="int8-variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from precision import caltech_photos

    from retrieval.models.precision import calibration_batches

    bb = load_backbone()
    fp32 = bb._runner((224, 224)).graph
    batches = calibration_batches(bb.preprocess, (224, 224))
    specs = variants(fp32)
    names = args.variants or list(specs)
    graphs = {"fp32": fp32, **{n: make(n, specs[n], fp32, batches) for n in names}}
    ops = {n: op_counts(p, args.threads) for n, p in graphs.items()}
    photos = caltech_photos(40)
    rows, prof = [], {}
    for size in args.sizes:
        pre = bb.preprocess.replace(size=size)
        x = np.stack([pre.array(load_image(p, min_side=size)) for p in photos[:args.batch]])
        sess = {n: session(p, args.threads) for n, p in graphs.items()}
        outs = {n: s.run(None, {"x": x})[0] for n, s in sess.items()}  # warm-up
        e32 = outs["fp32"].mean((2, 3))
        cos = {}
        for n in sess:
            e = outs[n].mean((2, 3))
            cos[n] = (e * e32).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(e32, axis=1)
        # the whole batch in one run, and in the product's slices (retrieval/models/backbone.py ORT_RUN_PIXELS)
        for step in sorted({args.batch, max(1, ORT_RUN_PIXELS // (size * size))}, reverse=True):
            med, loads = _common.interleaved_runs(sess, x, step, args.rounds)
            for n in sess:
                rows.append([size, step, n, round(args.batch / med[n], 1), f"{med['fp32'] / med[n]:.2f}x",
                             f"{min(loads):.1f}-{max(loads):.1f}", round(float(cos[n].min()), 4),
                             round(float(cos[n].mean()), 4)])
                print(" | ".join(map(str, rows[-1])), flush=True)
        if args.profile:
            for n, p in graphs.items():
                prof[(size, n)] = profile_ops(p, x, args.threads)
    text = (f"int8 variants of efficientnet_lite0's fp32 ONNX graph, {args.threads} threads, batch {args.batch} "
            f"Caltech photos, in one run and in the product's slices (4 images at 224 px, 1 at 448), median of {args.rounds} interleaved rounds (`python bench/int8_variants.py`)."
            " Load = 1-min load average over the rounds. cos: pooled (GAP) embedding vs fp32's, same photos.\n\n")
    text += _common.table(["input", "images per run", "graph", "img/s", "vs fp32", "load", "cos min", "cos mean"], rows)
    text += "\n\n## Ops after ONNX Runtime's graph optimisation\n\n" + _common.table(
        ["graph", "ops"], [[n, o] for n, o in ops.items()])
    if prof:
        kinds = sorted({k for v in prof.values() for k in v})
        text += ("\n\n## ms per run by kind of node (profiling, mean of 4 runs, the batch in one run; fp32's fused "
                 "convolutions lose their layer names: 'other')\n\n" + _common.table(
                     ["input", "graph", "total"] + kinds,
                     [[s, n, round(sum(v.values()), 1)] + [round(v.get(k, 0), 1) for k in kinds]
                      for (s, n), v in prof.items()]))
    _common.save(args.name, text)


if __name__ == "__main__":
    main()
