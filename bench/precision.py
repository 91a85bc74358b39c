"""int8 vs fp32 (ONNX Runtime): forward speed at 224 and 448 px, embedding agreement, and retrieval quality.

    python bench/precision.py [--threads 2] [--batch 16] [--rounds 7] [--skip-quality | --skip-speed]
                              [--datasets att_faces caltech101 instance] [--heads none pca-whiten:128] [--name N]

Speed: the sessions (fp32 and int8 as the product makes them now, pads folded into the convolutions, and for
comparison both as they were made before: the fp32 graph with its Pads as exported, the int8 graph QDQ) run interleaved (A B C D A B C D ...) on the same batch of real photos, as one run and in the
product's slices, median of the rounds after a warm-up; ratios are measured side by side in one run, with the
load average printed beside them. Agreement: cosine between
the int8 and fp32 pooled embeddings of 40 Caltech-101 photos. Quality: bench/quality.py's protocol (every
image queries the rest, exact cosine search; no head, or ``--heads`` fitted on the collection) through the real
indexing path at each precision, for the two presets' embeddings (gap-224-squash: faces, Caltech, instance;
gem-448-long: instance), with the queries whose top-1 is right at one precision only (paired: is a difference
more than noise). Saves bench/results/precision.md (precision-quality.md with --skip-speed).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
from pathlib import Path

import _common
import numpy as np
import torch

from retrieval.images import load_image
from retrieval.models.loading import load_backbone


def caltech_photos(n: int) -> list[Path]:
    root = _common.shared_dataset("caltech101")
    cats = sorted(p for p in root.iterdir() if p.is_dir())
    rnd = random.Random(0)
    return [rnd.choice(sorted(c.iterdir())) for c in cats[:n]]


QDQ_CACHE = _common.ROOT / "bench" / ".cache" / "precision"


def qdq_before(fp32: Path, batches: list[np.ndarray]) -> Path:
    """The int8 graph as the product made it up to 977297a, for comparison: ``fp32`` quantised statically in QDQ
    format, per channel, 7-bit weights on a CPU without VNNI, MinMax calibration on ``batches``; made once into
    bench/.cache/precision (bench/int8_variants.py's "before" variant, that script since removed)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from retrieval.models.precision import has_vnni

    dst = QDQ_CACHE / "int8-before-qdq.onnx"
    if dst.exists():
        return dst

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    QDQ_CACHE.mkdir(parents=True, exist_ok=True)
    quantize_static(str(fp32), str(dst), Reader(), calibrate_method=CalibrationMethod.MinMax,
                    calibration_providers=["CPUExecutionProvider"], quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=not has_vnni(), activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def speed_rows(threads: int, batch: int, rounds: int, photos: list[Path]) -> tuple[list[list], list[list]]:
    import onnxruntime as ort

    from retrieval.models.graphs import ORT_RUN_PIXELS, export as _export
    from retrieval.models.precision import calibration_batches

    bb = load_backbone()
    rows, graph_rows = [], []
    for hw in [(224, 224), (448, 448)]:
        pre = bb.preprocess.replace(size=hw[0])
        x = np.stack([pre.array(load_image(p, min_side=hw[0])) for p in photos[:batch]])
        r32 = bb._runner(hw)
        r8 = dataclasses.replace(bb, precision="int8", _runners={})._runner(hw)
        tmp = Path(tempfile.mkdtemp())
        exported = tmp / f"exported-{hw[0]}.onnx"  # the fp32 graph of a9487a0 and before: Pads as exported
        _export(bb.net, hw, exported, dynamic=True, names=["fmap"], fold=False)
        old8 = qdq_before(exported, calibration_batches(bb.preprocess, (224, 224)))  # int8 of 977297a
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        first = "fp32 before (Pads as exported)"
        sess = {first: ort.InferenceSession(str(exported), opts, providers=["CPUExecutionProvider"]),
                "fp32 now (pads folded)": r32.session,
                "int8 before (QDQ)": ort.InferenceSession(str(old8), opts, providers=["CPUExecutionProvider"]),
                "int8 now (QOperator, pads folded)": r8.session}
        outs = {k: s.run(None, {"x": x})[0] for k, s in sess.items()}  # warm-up
        # the whole batch in one run, and in the slices the product runs (retrieval/models/backbone.py ORT_RUN_PIXELS)
        for step in (batch, max(1, ORT_RUN_PIXELS // (hw[0] * hw[1]))):
            med, loads = _common.interleaved_runs(sess, x, step, rounds)
            base, now = med[first], med["fp32 now (pads folded)"]
            for k in sess:
                rows.append([f"{hw[0]}x{hw[1]}", step, k, round(batch / med[k], 1), f"{base / med[k]:.2f}x",
                             f"{now / med[k]:.2f}x", f"{min(loads):.1f}-{max(loads):.1f}"])
            print(rows[-len(sess):], flush=True)
        d = float(np.abs(outs["fp32 now (pads folded)"] - outs[first]).max())
        d8 = float(np.abs(outs["int8 now (QOperator, pads folded)"] - outs["int8 before (QDQ)"]).max())
        graph_rows.append([f"{hw[0]}x{hw[1]}", f"{d:.1e}", f"{d8:.1e}", f"{os.path.getsize(r32.graph) / 1e6:.1f} MB",
                           f"{os.path.getsize(r8.graph) / 1e6:.1f} MB"])
        print(graph_rows[-1], flush=True)
    return rows, graph_rows


def agreement_rows(photos: list[Path]) -> list[list]:
    rows = []
    for size, resize in ((224, "squash"), (448, "long")):
        bb = load_backbone(input_size=size, resize=resize)
        imgs = [load_image(p, min_side=size) for p in photos]
        e32 = bb.embed_images(imgs)
        e8 = dataclasses.replace(bb, precision="int8", _runners={}).embed_images(imgs)
        cos = (e8 * e32).sum(1) / np.linalg.norm(e8, axis=1) / np.linalg.norm(e32, axis=1)
        rows.append([f"{size} {resize}", len(imgs), round(float(cos.min()), 4), round(float(np.median(cos)), 4),
                     round(float(cos.mean()), 4)])
        print(rows[-1], flush=True)
    return rows


def quality_rows(datasets: list[str], heads: list[str]) -> list[list]:
    import quality

    from retrieval.index.head import fit_head, parse_head

    folders = {n: f for n in ("att_faces", "caltech101")
               if n in datasets and (f := _common.shared_dataset(n)) is not None}
    if "instance" in datasets:
        from instance_set import build

        folders["instance"] = build(_common.shared_dataset("caltech101"),
                                    _common.ROOT / "bench" / ".cache" / "instance")
    plan = [(n, "gap-224-squash") for n in folders] + [("instance", "gem-448-long")] * ("instance" in folders)
    rows = []
    for name, emb in plan:
        got = {}
        for prec in ("fp32", "int8"):
            vecs, labels, paths, secs = quality.labelled_embeddings(folders[name],
                                                                   {**quality.EMBEDDINGS[emb], "precision": prec})
            order = np.argsort(paths)  # the same order at both precisions: hits compared query by query
            vecs, labels, paths = vecs[order], labels[order], [paths[i] for i in order]
            is_ref = np.array([Path(p).stem == "ref" for p in paths]) if name == "instance" else None
            for h in heads:
                head = None if h == "none" else fit_head([vecs], parse_head(h))
                rank = quality.ranking(vecs, "cosine", head)
                m = quality.metrics(rank, labels, is_ref)
                got[prec, h] = m, labels[rank[:, 0]] == labels
                rows.append([name, emb, h, prec, round(m["R@1"], 3), round(m["mAP@R"], 3),
                             round(m["photo→ref R@1"], 3) if "photo→ref R@1" in m else "-", "",
                             round(1000 * secs / len(labels), 1)])
                print(" | ".join(map(str, rows[-1])), flush=True)
        for h in heads:
            (m32, hit32), (m8, hit8) = got["fp32", h], got["int8", h]
            rows.append([name, emb, h, "int8 − fp32", round(m8["R@1"] - m32["R@1"], 3),
                         round(m8["mAP@R"] - m32["mAP@R"], 3), "",
                         f"{int((hit32 & ~hit8).sum())} / {int((hit8 & ~hit32).sum())}", ""])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=["att_faces", "caltech101", "instance"])
    ap.add_argument("--heads", nargs="+", default=["none"], help="heads fitted on the collection: none, pca-whiten:128")
    ap.add_argument("--name", default=None, help="results file name (default precision, or precision-quality "
                                                 "with --skip-speed)")
    args = ap.parse_args()
    if _common.shared_dataset("caltech101") is None:  # the photos timed, and the instance set's source
        return
    torch.set_num_threads(args.threads)
    from retrieval.models.precision import cpu_flags, has_vnni

    photos = caltech_photos(40)
    speed, graphs = ([], []) if args.skip_speed else speed_rows(args.threads, args.batch, args.rounds, photos)
    agree = [] if args.skip_speed else agreement_rows(photos)
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))) or "unknown"
    text = (f"int8 (ONNX Runtime static, QOperator, pads folded) vs fp32, efficientnet_lite0, {args.threads} threads, batch "
            f"{args.batch} real photos, median of {args.rounds} interleaved rounds. CPU flags: {flags}; VNNI: "
            f"{'yes' if has_vnni() else 'no (weights quantised to 7 bits)'}. Load = 1-min load average during "
            "the run (the machine is shared: judge by the ratios).\n\n## Forward speed\n\n")
    text += _common.table(["input", "images per run", "path", "img/s", "vs fp32 before", "vs fp32 now", "load"], speed)
    text += ("\n\n## Graphs\n\n" + _common.table(
        ["input", "fp32: max |Δ| pads folded vs as exported", "int8: max |Δ| QOperator vs QDQ", "fp32 graph",
         "int8 graph"], graphs))
    text += "\n\n## int8 vs fp32 embeddings (40 Caltech-101 photos)\n\n" + _common.table(
        ["input", "photos", "cos min", "cos median", "cos mean"], agree)
    if not args.skip_quality:
        text += "\n\n## Retrieval quality (cosine, exact)\n\n" + _common.table(
            ["dataset", "embedding", "head", "precision", "R@1", "mAP@R", "photo→ref R@1",
             "top-1 hits only fp32 / only int8", "index ms/img"], quality_rows(args.datasets, args.heads))
    _common.save(args.name or "precision" + ("-quality" if args.skip_speed else ""), text)


if __name__ == "__main__":
    main()
