"""CUDA against the CPU: the same embeddings, search results and explanation maps?

    python bench/cuda_check.py   (on a machine with an NVIDIA GPU; writes bench/results/cuda-check.md)

The product targets the CPU, but where CUDA is present torch's device is picked automatically
(retrieval.models.backbone.pick_device), so an index built on a laptop may be searched, or a match explained, on a GPU
machine. Checked here, on the bundled samples (data/samples):

1. **Embeddings** of the default backbone at the general preset (224 px squashed, GAP) and at the instance
   preset's input (448 px aspect kept, GeM): the CPU's (as `retrieve` computes them: the ONNX Runtime fast path)
   against CUDA eager with TF32 as PyTorch leaves it for cuDNN convolutions (allowed) and with TF32 off:
   the worst cosine and the largest absolute difference over the images.
2. **The CLI end to end**, run twice, once with CUDA hidden (``CUDA_VISIBLE_DEVICES=``) and once on the GPU:
   `retrieve index data/samples` (each run its own index), then `retrieve search` of every sample (k 5) against
   both indexes: identical top-5 lists, largest score difference.
3. **SFAM**: `retrieve explain` of three pairs on both: the score's and the maps' largest differences.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import _common

SAMPLES = _common.ROOT / "data" / "samples"
PAIRS = [("chelsea.png", "chelsea_crop_flipped.jpg"), ("coffee.png", "coffee_crop_dark.jpg"), ("astronaut.png", "rocket.jpg")]


def _cli(*args, cpu: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    p = subprocess.run([sys.executable, str(_common.ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                       env=env)
    if p.returncode:
        raise SystemExit(f"retrieve {' '.join(map(str, args[:2]))}: {p.stderr.strip()[-800:]}")
    return p.stdout


def embeddings() -> list[list]:
    import torch

    from retrieval.images import load_image
    from retrieval.models.loading import load_backbone

    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    rows = []
    for label, size, resize, pooling in (("general (224, squash, GAP)", None, "squash", "gap"),
                                         ("instance (448, long, GeM)", 448, "long", "gem")):
        def embed(device: str, fast: str, tf32: bool = False) -> np.ndarray:
            bb = load_backbone(input_size=size, device=device, fast=fast, resize=resize, pooling=pooling)
            torch.backends.cudnn.allow_tf32 = tf32  # (after load_backbone, which turns it off on CUDA)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            arrays = [bb.preprocess.array(load_image(p, min_side=bb.preprocess.size)) for p in paths]
            out = np.concatenate([bb.embed_arrays([a]) for a in arrays])  # one at a time: shapes differ (long)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

        cpu = embed("cpu", "auto")
        for tf32 in (True, False):
            gpu = embed("cuda", "auto", tf32)
            cos = (cpu * gpu).sum(1)
            rows.append([label, f"CUDA eager, TF32 {'allowed (PyTorch default)' if tf32 else 'off (retrieve)'}", len(paths),
                         f"{cos.min():.6f}", f"{np.abs(cpu - gpu).max():.2e}"])
            print(rows[-1], flush=True)
    return rows


def cli() -> tuple[list[list], list[list]]:
    rows, maps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        idx = {}
        for name, cpu in (("cpu", True), ("cuda", False)):
            idx[name] = Path(tmp) / name
            _cli("index", SAMPLES, "--index", idx[name], "--json", cpu=cpu)
        res = {}
        for index_of in ("cpu", "cuda"):
            for name, cpu in (("cpu", True), ("cuda", False)):
                out = _cli("search", SAMPLES, "--index", idx[index_of], "-k", "5", "--json", cpu=cpu)
                res[index_of, name] = [json.loads(line) for line in out.splitlines()]
        for label, x, y in (("index built on the CPU: searched with CUDA hidden / on the GPU", ("cpu", "cpu"), ("cpu", "cuda")),
                            ("index built on the GPU: searched with CUDA hidden / on the GPU", ("cuda", "cpu"), ("cuda", "cuda")),
                            ("index built with CUDA hidden / on the GPU, both searched on the GPU", ("cpu", "cuda"), ("cuda", "cuda"))):
            same = sum([h["path"] for h in a["results"]] == [h["path"] for h in b["results"]]
                       for a, b in zip(res[x], res[y]))
            diff = max(abs(p["score"] - q["score"]) for a, b in zip(res[x], res[y])
                       for p, q in zip(a["results"], b["results"]))
            rows.append([label, len(res[x]), f"{same} of {len(res[x])}", f"{diff:.2e}"])
            print(rows[-1], flush=True)
        for a, b in PAIRS:
            got = {}
            for name, cpu in (("cpu", True), ("cuda", False)):
                out = Path(tmp) / f"ex-{name}-{a}"
                doc = json.loads(_cli("explain", SAMPLES / a, SAMPLES / b, "--out", out, "--json", cpu=cpu))
                got[name] = (doc["score"], np.load(out / "query_map.npy"), np.load(out / "result_map.npy"))
            (s1, q1, r1), (s2, q2, r2) = got["cpu"], got["cuda"]
            scale = max(np.abs(q1).max(), np.abs(r1).max(), 1e-12)
            maps.append([f"{a} / {b}", f"{s1:.6f}", f"{s2:.6f}", f"{abs(s1 - s2):.2e}",
                         f"{max(np.abs(q1 - q2).max(), np.abs(r1 - r2).max()) / scale:.2e}"])
            print(maps[-1], flush=True)
    return rows, maps


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/cuda_check.py: no CUDA device here (it compares CUDA with the CPU)")
    emb = embeddings()
    rows, maps = cli()
    text = (f"`python bench/cuda_check.py` on {torch.cuda.get_device_name(0)}, torch {torch.__version__}: the CPU's "
            "results (ONNX Runtime fast path, as `retrieve` computes them; CUDA hidden) against CUDA's.\n\n")
    text += _common.table(["embedding", "CUDA", "images", "worst cosine with the CPU's", "max |difference|"], emb)
    text += "\n\n`retrieve index data/samples` and `retrieve search` of every sample (k 5), with CUDA hidden and on the GPU:\n\n"
    text += _common.table(["compared", "queries", "identical top-5 lists", "max score difference"], rows)
    text += "\n\n`retrieve explain` (SFAM), CPU against CUDA:\n\n"
    text += _common.table(["pair", "score CPU", "score CUDA", "|difference|", "max map difference / map's max"], maps)
    _common.save("cuda-check", text)


if __name__ == "__main__":
    main()
