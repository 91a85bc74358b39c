"""What a new index is built for (``--preset``) and how its explanations are made by default."""
from __future__ import annotations

PRESETS = {
    # What a new index is built for; every value can be overridden by its own option. Chosen by measurement
    # (bench/results/quality.md): "general" is the best of the cheap settings on faces and categories;
    # "instance" finds the same object photographed elsewhere (R@1 0.14 → 0.88 on the instance set with the
    # global top 60 verified) for about 6.5x the indexing time (448 px input, SIFT keypoints extracted while
    # indexing); on faces and categories it costs a little R@1 (Caltech 0.86 → 0.84). Its searches verify the
    # global top 8 and the visual words' top 25 (ASMK*, retrieval/words.py): on the instance set R@1 0.96,
    # mAP@10 0.858 for ~37 pairs a query, the same as the global top 10 and the words' top 30 for ~48 (and 0.95,
    # 0.827 for ~142 with the global top 60 and tf-idf words' top 30 before; bench/results/quality.md, "Photo →
    # catalogue"); W 20 misses one more catalogue image in a catalogue-only index (0.94), K 5 costs mAP@10 (0.855;
    # att_faces 0.768 → 0.763, bench/results/candidates-check.md).
    "general": {"input_size": None, "resize": "squash", "pooling": "gap", "head": None, "search": {}},
    "instance": {"input_size": 448, "resize": "long", "pooling": "gem", "head": "pca-whiten:128",
                 "search": {"verify": 8, "words": 25}},
}

# ``--preset faces`` (kept out of PRESETS: it is not a set of backbone options but its own pipeline, indexer/faces.py):
# detect every face (dlib HOG, or its CNN detector), align on 5 landmarks, embed with dlib's face ResNet (the
# PyTorch port, retrieval/dlib_face.py), one row per face; L2 metric, and dlib's documented same-person distance.
FACES = {"model": "dlib_face_resnet", "metric": "l2", "detector": "hog", "upsample": 1, "threshold": 0.6}
