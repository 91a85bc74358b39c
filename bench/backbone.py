"""Backbone throughput: eager vs the fast inference paths, side by side in one run.

    python bench/backbone.py [--model efficientnet_lite0] [--batch 32] [--size 224] [--threads 2] [--rounds 5]

Prints img/s per path, the ratio to eager and the max abs difference of the feature map from eager,
and saves the table to bench/results/backbone.md.
"""
from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (sets sys.path)
import torch

from retrieval.models.loading import load_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)

    paths = {"eager": None}
    for fast in ("eager", "jit", "onnx"):
        bb = load_backbone(args.model, input_size=args.size, fast=fast)
        bb.features(x[:2])  # build and warm up
        paths[fast] = bb
    ref = paths["eager"].features(x)
    # channels_last eager as another candidate (same network, other memory layout)
    import copy

    cl_net = copy.deepcopy(paths["eager"].net).to(memory_format=torch.channels_last)

    def run_cl(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return cl_net(t.contiguous(memory_format=torch.channels_last)).contiguous()

    runners = {"eager": paths["eager"].features, "eager channels_last": run_cl,
               "torchscript (trace+freeze)": paths["jit"].features, "onnxruntime": paths["onnx"].features}
    times = {k: [] for k in runners}
    diffs = {k: float((f(x) - ref).abs().max()) for k, f in runners.items()}
    for _ in range(args.rounds):  # interleaved rounds: noise hits every path alike
        for k, f in runners.items():
            t = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t)
    base = args.batch / min(times["eager"])
    rows = []
    for k in runners:
        ips = args.batch / min(times[k])
        rows.append([k, round(ips, 1), f"{ips / base:.2f}x", f"{diffs[k]:.1e}"])
    from _common import save, table

    text = (f"Backbone {args.model}, batch {args.batch}, {args.size}px, {args.threads} threads, "
            f"best of {args.rounds} interleaved rounds; the default (auto) path here: "
            f"{load_backbone(args.model, input_size=args.size).fast_path_name()}\n\n")
    text += table(["path", "img/s", "vs eager", "max |Δ| vs eager"], rows)
    save("backbone", text)


if __name__ == "__main__":
    main()
