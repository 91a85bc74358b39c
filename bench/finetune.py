"""A user's own metric-learning model, for the explanations to be measured on a backbone their defaults never saw.

    python bench/finetune.py [--epochs 3] [--out bench/.cache/finetuned]

Fine-tunes EfficientNet-Lite0 (ImageNet weights, the registry's) with Proxy-Anchor loss (Kim et al., 2020; α 32,
δ 0.1, one proxy per category) on the average-pooled, L2-normalised final map, as a user debugging their own
metric-learning model would: the Caltech-101 photos of the tuning categories only (../shared/data/caltech101, the
categories sorted by name, even indices; the odd ones are held out for the explanations' bench), 224 px, random
resized crops (scale 0.6-1) and flips, the stem and the first eight blocks frozen (BatchNorm kept in eval mode),
AdamW (network 1e-4, proxies 1e-2), one thread.

Saves, in ``--out``:
- ``lite0_metric.pt``: TorchScript (traced at 224 px, valid at sides that are multiples of 32) whose forward takes a
  batch normalised with ImageNet's mean/std (what retrieve gives a TorchScript model) and returns the feature map
  N×1280×H/32×W/32: ``--model PATH/lite0_metric.pt``. Its default map uses the final layer only (ScriptModules take
  no hooks, retrieval/models/taps.py).
- ``lite0_metric.pth``: the same weights as a state dict, for ``--model bench.finetune:lite0_metric`` (this module's
  :func:`lite0_metric`, with the repository root on PYTHONPATH and ``FINETUNE_OUT`` naming ``--out`` when it is not
  the default): the same network as an nn.Module, whose stride-16 layer is found for the default map.

Reports leave-one-out recall@1 (cosine of the average-pooled map, 224 px, retrieve's preprocessing of a TorchScript
model) on the held-out categories and on the tuning ones, before and after, the after row also through the saved
TorchScript file as retrieve loads it. Saves bench/results/finetune.md.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

if __package__ == "bench":  # --model bench.finetune:lite0_metric, imported from the repository root
    from bench import _common
else:  # python bench/finetune.py, or imported with bench/ on sys.path
    import _common
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from retrieval.models.efficientnet_lite import EfficientNetLite0

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_OUT = _common.ROOT / "bench" / ".cache" / "finetuned"
FROZEN_BLOCKS = 8  # the stem and blocks 0-7 (up to the first stride-16 blocks) keep their ImageNet weights


class Lite0Metric(nn.Module):
    """Lite0 taking ImageNet-normalised input (retrieve's preprocessing of a user's model) and returning its final
    map; ``fmap`` names that map for module:function loading (``(model, "fmap")``)."""

    def __init__(self):
        super().__init__()
        self.net = EfficientNetLite0()
        # Lite0 was trained on (x − 0.5)/0.5 of pixels in [0, 1]; x_imagenet·std + mean gives the pixel back
        std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("scale", std / 0.5)
        self.register_buffer("shift", (mean - 0.5) / 0.5)
        self.fmap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmap(self.net.forward_features(x * self.scale + self.shift))


def out_dir() -> Path:
    return Path(os.environ.get("FINETUNE_OUT") or DEFAULT_OUT)


def lite0_metric():
    """``--model bench.finetune:lite0_metric``: the fine-tuned network and the layer whose output is the map."""
    from retrieval.errors import WeightsUnavailable

    f = out_dir() / "lite0_metric.pth"
    if not f.is_file():
        raise WeightsUnavailable(f"{f}: no fine-tuned weights; run python bench/finetune.py (FINETUNE_OUT: its --out)")
    model = Lite0Metric()
    model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), "fmap"


def export_torchscript(model: nn.Module, path: Path) -> None:
    """``model`` traced at 224 px and saved, as a user would (its MBConv blocks do not script). The trace keeps the
    TF-"same" paddings computed at 224 px, which are the same at every side that is a multiple of 32 (retrieve's
    inputs at 224 and 448 px, squashed or aspect-kept): checked against the eager network at three such shapes."""
    import warnings

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, 224, 224), check_trace=False)
        for hw in ((224, 224), (448, 448), (320, 448)):
            x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
            ref = model(x)
            assert (traced(x) - ref).abs().max() <= 1e-4 * ref.abs().max(), f"the trace differs at {hw}"
    traced.save(str(path))


def caltech_split(root: Path) -> tuple[list[str], list[str]]:
    """(tuning, held-out) categories: sorted by name, even indices tune, odd ones are held out."""
    cats = sorted(p.name for p in root.iterdir() if p.is_dir())
    return cats[0::2], cats[1::2]


def load_photos(root: Path, cats: list[str]) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = [], []
    for i, c in enumerate(cats):
        for f in sorted((root / c).iterdir()):
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
            labels.append(i)
    return images, np.asarray(labels)


def embed(model: nn.Module, arrays: np.ndarray, batch: int = 50) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(arrays), batch):
            out.append(model(torch.from_numpy(arrays[i:i + batch])).mean((2, 3)))
    return F.normalize(torch.cat(out), dim=1).numpy()


def recall_at_1(e: np.ndarray, labels: np.ndarray) -> float:
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return float((labels[s.argmax(1)] == labels).mean())


def proxy_anchor(e: torch.Tensor, y: torch.Tensor, proxies: torch.Tensor, alpha: float = 32.0,
                 delta: float = 0.1) -> torch.Tensor:
    """Proxy-Anchor loss (Kim et al., CVPR 2020) of unit embeddings ``e`` with labels ``y``."""
    cos = e @ F.normalize(proxies, dim=1).T  # B×P
    pos = F.one_hot(y, proxies.shape[0]).bool()
    with_pos = pos.any(0)
    pos_term = torch.log1p(torch.where(pos, torch.exp(-alpha * (cos - delta)), 0).sum(0))[with_pos].mean()
    neg_term = torch.log1p(torch.where(~pos, torch.exp(alpha * (cos + delta)), 0).sum(0)).mean()
    return pos_term + neg_term


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    root = _common.shared_dataset("caltech101")
    if root is None:
        return
    from torchvision import transforms

    from retrieval.models.loading import load_backbone
    from retrieval.models.preprocess import Preprocess
    from retrieval.models.registry import embedded_weights_file

    tune_cats, held_cats = caltech_split(root)
    tune_imgs, tune_y = load_photos(root, tune_cats)
    held_imgs, held_y = load_photos(root, held_cats)
    pre = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD)  # what retrieve gives a TorchScript model
    tune_x = np.stack([pre.array(im) for im in tune_imgs])
    held_x = np.stack([pre.array(im) for im in held_imgs])

    model = Lite0Metric()
    model.net.load_state_dict(torch.load(embedded_weights_file("efficientnet_lite0"), weights_only=True), strict=True)
    model.eval()
    t0 = time.perf_counter()
    before = {"held-out": recall_at_1(embed(model, held_x), held_y),
              "tuning": recall_at_1(embed(model, tune_x), tune_y)}
    t_eval = time.perf_counter() - t0
    print(f"before: R@1 held-out {before['held-out']:.3f}, tuning {before['tuning']:.3f} ({t_eval:.0f} s)", flush=True)

    frozen = [model.net._conv_stem, model.net._bn0, *model.net._blocks[:FROZEN_BLOCKS]]
    for m in frozen:
        m.requires_grad_(False)
    proxies = nn.Parameter(torch.randn(len(tune_cats), 1280) * (2 / 1280) ** 0.5)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-4},
                             {"params": [proxies], "lr": 1e-2}], weight_decay=1e-4)
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    aug = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.6, 1.0)), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), norm])
    steps, epoch_loss = 0, []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = np.random.permutation(len(tune_imgs))
        losses = []
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            x = torch.stack([aug(tune_imgs[j]) for j in idx])
            y = torch.from_numpy(tune_y[idx])
            e = F.normalize(model(x).mean((2, 3)), dim=1)  # BatchNorm in eval mode: ImageNet's statistics kept
            loss = proxy_anchor(e, y, proxies)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
        epoch_loss.append(float(np.mean(losses)))
        print(f"epoch {epoch + 1}: loss {epoch_loss[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t_train = time.perf_counter() - t0
    model.eval()
    after = {"held-out": recall_at_1(embed(model, held_x), held_y), "tuning": recall_at_1(embed(model, tune_x), tune_y)}

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    torch.save(state, args.out / "lite0_metric.pth")
    export_torchscript(model, args.out / "lite0_metric.pt")
    bb = load_backbone(str(args.out / "lite0_metric.pt"), fast="eager")
    via_file = recall_at_1(F.normalize(torch.from_numpy(bb.embed_arrays(list(held_x))), dim=1).numpy(), held_y)
    print(f"saved {args.out / 'lite0_metric.pt'} and {args.out / 'lite0_metric.pth'}")

    shown_out = os.path.relpath(args.out, _common.ROOT) if args.out.is_absolute() else args.out
    rows = [["EfficientNet-Lite0, ImageNet (before)", before["held-out"], before["tuning"]],
            ["fine-tuned, Proxy-Anchor (after)", after["held-out"], after["tuning"]],
            ["fine-tuned, through the saved TorchScript file (load_backbone)", via_file, "–"]]
    text = (f"# A user-style fine-tuned model (bench/finetune.py)\n\n"
            f"`python bench/finetune.py --epochs {args.epochs} --threads {args.threads} --out {shown_out}`: Lite0 (ImageNet) fine-tuned "
            f"with Proxy-Anchor loss on the Caltech-101 tuning categories ({len(tune_cats)} categories sorted by name, "
            f"even indices, {len(tune_imgs)} photos), {args.epochs} epochs of batch {args.batch} ({steps} steps, "
            f"{t_train:.0f} s on {args.threads} thread(s)), stem and blocks 0-{FROZEN_BLOCKS - 1} frozen. Leave-one-out "
            f"recall@1 of the cosine of the average-pooled final map at 224 px (ImageNet mean/std, as retrieve "
            f"preprocesses a TorchScript model), on the held-out categories (odd indices, {len(held_imgs)} photos, never "
            f"trained on) and on the tuning ones.\n\n"
            + _common.table(["model", "R@1 held-out", "R@1 tuning"], rows)
            + f"\n\nMean loss per epoch: {', '.join(f'{v:.3f}' for v in epoch_loss)}. The saved files: "
              "`lite0_metric.pt` (TorchScript, `--model PATH --trust-model`; final layer only for the default map) "
              "and `lite0_metric.pth` (`--model bench.finetune:lite0_metric`, the stride-16 layer found).\n")
    _common.save("finetune", text)


if __name__ == "__main__":
    main()
